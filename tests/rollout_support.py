"""Shared by the rollout tests: tiny random models of six architectures built from configs (nothing is
downloaded; token ids are used directly, no tokenizer), prompts, and the chi-square test of sampled tokens."""

from __future__ import annotations

import math

import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from fastrlhf.config import RolloutConfig
from fastrlhf.rollout import SamplingParams
from fastrlhf.rollout.hf import HFEngine

V = 41
PAD, BOS = 0, 2
_COMMON = dict(vocab_size=V, pad_token_id=PAD, eos_token_id=1, bos_token_id=BOS, initializer_range=0.5)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)  # fmt: skip
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**LLAMA_LIKE, **_COMMON),
    "qwen2": lambda: tf.Qwen2Config(**LLAMA_LIKE, **_COMMON),
    "gemma": lambda: tf.GemmaConfig(**LLAMA_LIKE, head_dim=8, **_COMMON),
    "phi3": lambda: tf.Phi3Config(**LLAMA_LIKE, **_COMMON),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **_COMMON),
    "mistral": lambda: tf.MistralConfig(**LLAMA_LIKE, sliding_window=64, **_COMMON),
}
# Every mechanism of the static backend at tiny sizes: bucketed prompts, compaction checked every step, a
# prefill of one row at a time (8 padded tokens per chunk).
SMALL_BUCKETS = RolloutConfig(
    backend="static", prompt_bucket=4, min_batch_bucket=1, compact_every=1, prefill_tokens=8
)


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation="sdpa").eval()


def common_config(**extra) -> dict:
    return _COMMON | extra


def left_padded(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts with 0..3 left pads per row (row 0 is never padded, so the batch width is real)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pads = row % 4
        ids[row, :pads], mask[row, :pads] = PAD, 0
    return ids, mask


def greedy(max_new: int, eos: int = 1, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD, greedy=True, **kw)


def greedy_probe(model, ids, mask, max_new: int, suppress: tuple[int, ...] = ()) -> torch.Tensor:
    return HFEngine().generate(model, ids, mask, greedy(max_new, suppress_ids=suppress)).tokens


def early_token(tokens: torch.Tensor, avoid: tuple[int, ...] = (), start: int = 2) -> int:
    """A token row 0 emits at step >= ``start`` and not before: as EOS (masked before ``start`` by
    min_new_tokens) it ends row 0 there without changing what came before, so rows end at different steps."""
    row = tokens[0].tolist()
    for j in range(start, len(row)):
        if row[j] not in row[:start] and row[j] not in avoid:
            return row[j]
    raise AssertionError(f"no usable EOS candidate in {row}")


def eos_case(model, ids, mask, max_new: int = 12, min_new: int = 2) -> tuple[SamplingParams, int]:
    """Greedy params with a suppressed id (one row 1 would otherwise emit) and an EOS that ends row 0 at
    step >= ``min_new`` (masked before it by min_new_tokens), so rows end at different steps."""
    suppressed = int(greedy_probe(model, ids, mask, 3)[1, 2])
    probe = greedy_probe(model, ids, mask, max_new, (PAD, suppressed))
    eos = early_token(probe, avoid=(PAD, 1, suppressed), start=min_new)
    return greedy(max_new, eos, min_new_tokens=min_new, suppress_ids=(PAD, suppressed)), suppressed


def assert_hf_semantics(got: torch.Tensor, params: SamplingParams) -> None:
    """What hf does, stated: no EOS before min_new_tokens, suppressed ids never, padding after the first
    EOS, and at least one row ended by EOS."""
    eos = params.eos_token_id
    assert not (got[:, : params.min_new_tokens] == eos).any()
    assert not torch.isin(got, torch.tensor([i for i in params.suppress_ids if i != PAD])).any()
    first = torch.where((got == eos).any(-1), (got == eos).int().argmax(-1), got.shape[1])
    after = torch.arange(got.shape[1])[None, :] > first[:, None]
    assert (got[after] == PAD).all() and bool((got == eos).any())


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs``, cells with < ``min_expected`` pooled."""
    n = counts.sum()
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    # Counts in a cell of probability 0 (outside the nucleus, suppressed) are an outright failure.
    assert obs[~keep].sum() == 0, "samples outside the distribution's support"
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def nucleus_probs(
    logits: torch.Tensor, temperature: float, top_p: float, suppress: list[int]
) -> torch.Tensor:
    """The sampling distribution written out in float64 (HF's TopPLogitsWarper semantics)."""
    z = logits.double() / temperature
    z[..., suppress] = -math.inf
    p = torch.softmax(z, -1)
    sorted_p, order = p.sort(-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    q = torch.where(keep, p, 0.0)
    return q / q.sum(-1, keepdim=True)


FALSE_ALARM = 1e-4
"""Each distribution test rejects a correct sampler with probability 1e-4 (p-value threshold); over the
dozen such tests in the suite, at most ~1e-3 that any fails by chance. The seeds are fixed, so a given
checkout passes or fails deterministically."""


def two_token_p_value(engine, model, n: int, temperature: float = 0.8, top_p: float = 0.85) -> float:
    """p-value of the joint law of the first two sampled tokens (prefill draw, then a decode step through
    the KV cache) against softmax(logits / T) cut to the top-p nucleus, from ``n`` samples of one prompt.
    min_new_tokens keeps EOS (and the suppressed pad) out of both steps."""
    prompt = torch.tensor([[BOS, 7, 11, 5]])
    params = SamplingParams(max_new_tokens=2, min_new_tokens=2, temperature=temperature, top_p=top_p,
                            eos_token_id=1, pad_token_id=PAD, suppress_ids=(PAD,))  # fmt: skip
    tokens = engine.generate(model, prompt.expand(n, -1), torch.ones(n, 4, dtype=torch.long), params).tokens
    assert tokens.shape == (n, 2)
    with torch.no_grad():
        first = model(prompt).logits[0, -1]
        seconds = model(torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)).logits[:, -1]
    suppress = [PAD, 1]
    joint = nucleus_probs(first, temperature, top_p, suppress)[:, None] * nucleus_probs(
        seconds, temperature, top_p, suppress
    )
    counts = torch.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V).double()
    return chi_square_p_value(counts, joint.flatten())


def sgd_step(model, ids, mask, lr: float = 5.0, replace_storage: bool = False) -> None:
    """One optimizer step on a language-model loss; ``replace_storage`` then swaps every parameter's
    storage (``p.data = p.data.clone()``), as an optimizer that builds new tensors would."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr / 50)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if replace_storage:
        for p in model.parameters():
            p.data = p.data.clone()
    model.eval()
