"""Rollout engines against the reference (transformers ``generate``): same tokens where they must be the
same, the right distribution where they sample, and no growth or re-allocation from one rollout to the next.

Tiny random models of six architectures built from configs; token ids are used directly (no tokenizer).
Most tests run the PyTorch path of ``sample_tokens`` (its own tests cover the Triton kernel); one runs the
Triton kernel through the interpreter inside the decode loop.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from fastrlhf.config import RolloutConfig
from fastrlhf.rollout import SamplingParams, engine_for, make_engine, resolve_backend
from fastrlhf.rollout.hf import HFEngine
from fastrlhf.rollout.static import StaticEngine, batch_buckets, prompt_bucket_len, weights_fingerprint

V = 41
PAD, BOS = 0, 2
_COMMON = dict(vocab_size=V, pad_token_id=PAD, eos_token_id=1, bos_token_id=BOS, initializer_range=0.5)
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)  # fmt: skip
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_LLAMA_LIKE, **_COMMON),
    "qwen2": lambda: tf.Qwen2Config(**_LLAMA_LIKE, **_COMMON),
    "gemma": lambda: tf.GemmaConfig(**_LLAMA_LIKE, head_dim=8, **_COMMON),
    "phi3": lambda: tf.Phi3Config(**_LLAMA_LIKE, **_COMMON),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **_COMMON),
    "mistral": lambda: tf.MistralConfig(**_LLAMA_LIKE, sliding_window=64, **_COMMON),
}
# Every mechanism at tiny sizes: bucketed prompts, compaction checked every step, a prefill of one row at
# a time (8 padded tokens per chunk).
SMALL_BUCKETS = RolloutConfig(
    backend="static", prompt_bucket=4, min_batch_bucket=1, compact_every=1, prefill_tokens=8
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is ~10x faster than two on a loaded 2-core machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation="sdpa").eval()


def left_padded(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts with 0..3 left pads per row (row 0 is never padded, so the batch width is real)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pads = row % 4
        ids[row, :pads], mask[row, :pads] = PAD, 0
    return ids, mask


def greedy_probe(model, ids, mask, max_new: int, suppress: tuple[int, ...] = ()) -> torch.Tensor:
    probe = SamplingParams(max_new_tokens=max_new, eos_token_id=1, pad_token_id=PAD, suppress_ids=suppress,
                           greedy=True)  # fmt: skip
    return HFEngine().generate(model, ids, mask, probe).tokens


def early_token(tokens: torch.Tensor, avoid: tuple[int, ...] = (), start: int = 2) -> int:
    """A token row 0 emits at step >= ``start`` and not before: as EOS (masked before ``start`` by
    min_new_tokens) it ends row 0 there without changing what came before, so rows end at different steps."""
    row = tokens[0].tolist()
    for j in range(start, len(row)):
        if row[j] not in row[:start] and row[j] not in avoid:
            return row[j]
    raise AssertionError(f"no usable EOS candidate in {row}")


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_greedy_matches_hf_with_eos_min_tokens_padding_and_compaction(arch, torch_backend):
    model = tiny_model(arch)
    ids, mask = left_padded(5, 7)
    suppressed = int(greedy_probe(model, ids, mask, 3)[1, 2])  # a token row 1 would otherwise emit
    eos = early_token(greedy_probe(model, ids, mask, 12, (PAD, suppressed)), avoid=(PAD, 1, suppressed))
    params = SamplingParams(max_new_tokens=12, min_new_tokens=2, eos_token_id=eos, pad_token_id=PAD,
                            suppress_ids=(PAD, suppressed), greedy=True)  # fmt: skip
    want = HFEngine().generate(model, ids, mask, params).tokens
    engine = StaticEngine(SMALL_BUCKETS)
    got = engine.generate(model, ids, mask, params).tokens
    assert got.shape == want.shape
    assert torch.equal(got, want)
    # What hf does, stated: no EOS before min_new_tokens, suppressed ids never, padding after the first EOS.
    assert not (got[:, :2] == eos).any() and not (got == suppressed).any()
    first = torch.where((got == eos).any(-1), (got == eos).int().argmax(-1), got.shape[1])
    after = torch.arange(got.shape[1])[None, :] > first[:, None]
    assert (got[after] == PAD).all() and bool((got == eos).any())
    # Batch 5 runs in bucket 8; once a row ends, the 4 left fit bucket 4 and are compacted into it.
    assert len({b for b, _ in engine.step_shapes}) >= 2, engine.step_shapes


def test_greedy_matches_hf_through_the_triton_sampling_kernel(triton_backend):
    model = tiny_model("qwen2")
    ids, mask = left_padded(3, 5)
    params = SamplingParams(
        max_new_tokens=5, eos_token_id=1, pad_token_id=PAD, suppress_ids=(PAD,), greedy=True
    )
    want = HFEngine().generate(model, ids, mask, params).tokens
    assert torch.equal(StaticEngine(SMALL_BUCKETS).generate(model, ids, mask, params).tokens, want)


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
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


def _nucleus_probs(
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


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_two_token_samples_follow_the_temperature_top_p_distribution(backend, torch_backend):
    """The joint law of the first two sampled tokens (prefill draw, then a decode step through the KV
    cache) matches softmax(logits / T) cut to the top-p nucleus, by Pearson's chi-square test at a
    false-alarm rate of 1e-4 per backend. The same test on hf's own sampler checks the test."""
    torch.manual_seed(0)
    model = tiny_model("llama", seed=3)
    temperature, top_p, n = 0.8, 0.85, 6000
    prompt = torch.tensor([[BOS, 7, 11, 5]])
    params = SamplingParams(max_new_tokens=2, min_new_tokens=2, temperature=temperature, top_p=top_p,
                            eos_token_id=1, pad_token_id=PAD, suppress_ids=(PAD,))  # fmt: skip
    engine = (
        HFEngine() if backend == "hf" else StaticEngine(RolloutConfig(prompt_bucket=4, min_batch_bucket=8))
    )
    tokens = engine.generate(model, prompt.expand(n, -1), torch.ones(n, 4, dtype=torch.long), params).tokens
    with torch.no_grad():
        first = model(prompt).logits[0, -1]
        seconds = model(torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)).logits[:, -1]
    suppress = [PAD, 1]  # min_new_tokens keeps EOS out of both steps
    joint = _nucleus_probs(first, temperature, top_p, suppress)[:, None] * _nucleus_probs(
        seconds, temperature, top_p, suppress
    )
    counts = torch.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V).double()
    assert _chi_square_p_value(counts, joint.flatten()) > 1e-4


def test_the_same_seed_gives_the_same_samples(torch_backend):
    model = tiny_model("llama")
    ids, mask = left_padded(4, 6)
    params = SamplingParams(max_new_tokens=8, eos_token_id=1, pad_token_id=PAD, temperature=1.3, top_p=0.9)
    engine = StaticEngine(SMALL_BUCKETS)
    torch.manual_seed(5)
    a = engine.generate(model, ids, mask, params).tokens
    torch.manual_seed(5)
    b = engine.generate(model, ids, mask, params).tokens
    torch.manual_seed(6)
    c = engine.generate(model, ids, mask, params).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("replace_storage", [False, True])
def test_after_an_optimizer_step_samples_come_from_the_new_weights(replace_storage, torch_backend):
    """In-place updates (what torch optimizers do) and swapped storage (``p.data = ...``) are both seen by
    the next rollout; the swap changes the fingerprint that makes CUDA graphs re-capture."""
    model = tiny_model("llama")
    ids, mask = left_padded(3, 6)
    params = SamplingParams(max_new_tokens=6, eos_token_id=1, pad_token_id=PAD, greedy=True)
    engine = StaticEngine(SMALL_BUCKETS)
    before = engine.generate(model, ids, mask, params).tokens
    print_before = weights_fingerprint(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    if replace_storage:
        for p in model.parameters():
            p.data = p.data.clone()
    model.eval()
    assert (weights_fingerprint(model) != print_before) == replace_storage
    after = engine.generate(model, ids, mask, params).tokens
    assert torch.equal(after, HFEngine().generate(model, ids, mask, params).tokens)
    assert not torch.equal(after, before)


def test_rollouts_in_a_row_reuse_one_cache_across_prompt_lengths_of_a_bucket(replaying_graphs, torch_backend):
    """20 rollouts with prompt lengths 5..8 and batches 3..4 (one prompt bucket, one batch bucket): one KV
    cache allocation, the same cache memory every time, one decode-step shape and one graph capture."""
    model = tiny_model("llama")
    engine = StaticEngine(RolloutConfig(prompt_bucket=8, min_batch_bucket=4, compact_every=4))
    params = SamplingParams(max_new_tokens=5, eos_token_id=1, pad_token_id=PAD, temperature=1.0)
    addresses = set()
    for i in range(20):
        ids, mask = left_padded(3 + i % 2, 5 + i % 4, seed=i)
        gen = engine.generate(model, ids, mask, params)
        assert gen.tokens.shape[0] == ids.shape[0]
        cache = engine._storage.cache
        addresses.add(tuple(layer.keys.data_ptr() for layer in cache.layers))
    assert engine.allocations == 1 and len(addresses) == 1
    assert engine.step_shapes == {(4, 13)} and engine.captures == 1
    # K and V x layers x batch x kv heads x positions x head dim x 4 bytes (fp32)
    assert gen.kv_cache_bytes == 2 * 2 * 4 * 2 * 13 * 8 * 4


def test_keep_cache_false_frees_the_cache_after_each_rollout(torch_backend):
    model = tiny_model("llama")
    engine = StaticEngine(RolloutConfig(prompt_bucket=8, keep_cache=False))
    params = SamplingParams(max_new_tokens=3, eos_token_id=1, pad_token_id=PAD)
    ids, mask = left_padded(2, 5)
    gen = engine.generate(model, ids, mask, params)
    assert gen.kv_cache_bytes > 0 and engine._storage is None


def test_lora_adapters_are_active_and_gradient_checkpointing_is_irrelevant(torch_backend):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)  # peft starts B at 0; make the adapters change the output
    model.eval()
    ids, mask = left_padded(3, 6)
    params = SamplingParams(max_new_tokens=6, eos_token_id=1, pad_token_id=PAD, greedy=True)
    engine = StaticEngine(SMALL_BUCKETS)
    got = engine.generate(model, ids, mask, params).tokens
    assert torch.equal(got, HFEngine().generate(model, ids, mask, params).tokens)
    with model.disable_adapter():
        base = engine.generate(model, ids, mask, params).tokens
        assert torch.equal(base, HFEngine().generate(model, ids, mask, params).tokens)
    assert not torch.equal(got, base)


def test_a_sliding_window_shorter_than_the_sequence_falls_back_to_hf(caplog, torch_backend):
    torch.manual_seed(0)
    config = tf.MistralConfig(**_LLAMA_LIKE, sliding_window=8, **_COMMON)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids, mask = left_padded(2, 6)
    params = SamplingParams(max_new_tokens=6, eos_token_id=1, pad_token_id=PAD, greedy=True)
    with caplog.at_level(logging.WARNING, logger="fastrlhf"):
        got = StaticEngine(SMALL_BUCKETS).generate(model, ids, mask, params)
    assert got.backend == "hf" and "sliding window 8" in caplog.text
    assert torch.equal(got.tokens, HFEngine().generate(model, ids, mask, params).tokens)


def test_buckets_and_options():
    assert batch_buckets(5, 1) == [8, 4, 2, 1]
    assert batch_buckets(64, 8) == [64, 32, 16, 8]
    assert batch_buckets(3, 8) == [8]
    assert prompt_bucket_len(1, 64) == 64 and prompt_bucket_len(65, 64) == 128
    assert resolve_backend(RolloutConfig(), torch.device("cpu")) == "hf"
    assert resolve_backend(RolloutConfig(), torch.device("cuda")) == "hf"  # until static is measured
    with pytest.raises(ValueError, match=r"rollout\.backend"):
        resolve_backend(RolloutConfig(backend="vllm"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"rollout\.prompt_bucket"):
        make_engine(RolloutConfig(prompt_bucket=0), torch.device("cpu"))
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=2, min_new_tokens=3, eos_token_id=1, pad_token_id=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=2, eos_token_id=1, pad_token_id=0, top_p=0.0)


def test_engine_for_reuses_one_engine_per_model_and_config():
    model = tiny_model("llama")
    cfg = RolloutConfig(backend="static")
    engine = engine_for(model, cfg)
    assert isinstance(engine, StaticEngine) and engine_for(model, cfg) is engine
    cfg.prompt_bucket = 16  # a changed config gets a new engine
    assert engine_for(model, cfg) is not engine
    assert isinstance(engine_for(model, RolloutConfig(backend="hf")), HFEngine)


@pytest.mark.cuda
def test_cuda_graphs_match_hf_and_memory_stays_flat_over_20_rollouts():
    model = tiny_model("qwen2").cuda()
    ids, mask = (t.cuda() for t in left_padded(5, 7))
    eos = early_token(greedy_probe(model, ids, mask, 12, (PAD,)), avoid=(PAD, 1), start=0)
    params = SamplingParams(
        max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, suppress_ids=(PAD,), greedy=True
    )
    engine = StaticEngine(SMALL_BUCKETS)
    want = HFEngine().generate(model, ids, mask, params).tokens
    assert torch.equal(engine.generate(model, ids, mask, params).tokens, want)
    assert engine.captures >= 2 and not engine._graphs_broken
    sampled = SamplingParams(
        max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, temperature=0.9, top_p=0.9
    )
    engine.generate(model, ids, mask, sampled)
    torch.cuda.synchronize()
    start, captures = torch.cuda.memory_allocated(), engine.captures
    for _ in range(20):
        engine.generate(model, ids, mask, sampled)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start and engine.captures == captures


class _ReplayingGraph:
    """Stands in for a CUDA graph on the CPU: replay runs the captured step again."""

    def __init__(self, body) -> None:
        self.body = body

    def replay(self) -> None:
        self.body()


@pytest.fixture
def replaying_graphs(monkeypatch):
    """The static engine's CUDA-graph path on the CPU, each graph a _ReplayingGraph."""
    from fastrlhf.rollout import static

    def fake_capture(body, restore, pool):
        body()  # warm-up: runs for real, then is undone
        restore()
        return _ReplayingGraph(body)

    monkeypatch.setattr(static, "capture_cuda_graph", fake_capture)
    monkeypatch.setattr(static.StaticEngine, "_graphs_wanted", lambda self, state: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


def test_graph_bookkeeping_warm_up_restore_reuse_and_recapture(replaying_graphs, torch_backend):
    """The CUDA-graph path with graphs that replay by running the step again: the warm-up is undone exactly
    (tokens equal hf's), one capture per batch bucket and sampling setup, reused by the next rollout, and a
    parameter whose storage was swapped makes the next rollout capture again."""
    model = tiny_model("llama")
    ids, mask = left_padded(5, 7)
    eos = early_token(greedy_probe(model, ids, mask, 12, (PAD,)), avoid=(PAD, 1))
    params = SamplingParams(max_new_tokens=12, min_new_tokens=2, eos_token_id=eos, pad_token_id=PAD,
                            suppress_ids=(PAD,), greedy=True)  # fmt: skip
    engine = StaticEngine(SMALL_BUCKETS)
    want = HFEngine().generate(model, ids, mask, params).tokens
    assert torch.equal(engine.generate(model, ids, mask, params).tokens, want)
    buckets_run = {b for b, _ in engine.step_shapes}
    assert engine.captures == len(buckets_run) >= 2
    assert torch.equal(engine.generate(model, ids, mask, params).tokens, want)
    assert engine.captures == len(buckets_run)  # reused
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data * 1.5  # new storage: stale graphs would read the old weights
    want = HFEngine().generate(model, ids, mask, params).tokens
    assert torch.equal(engine.generate(model, ids, mask, params).tokens, want)
    assert engine.captures > len(buckets_run)
