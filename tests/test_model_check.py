"""The verified fast path (fastrlhf.model_check) and what it rests on (fastrlhf.architectures): the switch to
the model's own output layer when the fused one differs, refusals, attention choice, trunk lookup in composite
models, the scalar head for architectures without a sequence-classification class, and the sampled
distribution being the trained one (generate's scores = the trainer's log-probs)."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch
from model_zoo_support import tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

from fastrlhf import architectures
from fastrlhf.architectures import LOGITS_PATH, attention_implementation, scalar_model_class, trunk_of
from fastrlhf.config import ModelConfig, PPOConfig
from fastrlhf.data import ensure_pad_token
from fastrlhf.demo_task import build_tokenizer, tiny_llama_config
from fastrlhf.model_check import UnsupportedModel, verify
from fastrlhf.models import (
    load_causal_lm,
    load_scalar_model,
    position_ids,
    response_logprobs,
    sequence_scores,
    token_values,
)

CPU = ModelConfig(dtype="float32")


class ScaledLlama(LlamaForCausalLM):
    """A model that processes its logits in a way fastrlhf does not know (a soft cap under another name)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 4.0 * torch.tanh(out.logits / 4.0) + 0.3 * out.logits
        return out


def _tiny_llama(cls=LlamaForCausalLM, scale: float = 20.0) -> PreTrainedModel:
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = cls(tiny_llama_config(tok, hidden_size=32, layers=2, intermediate=64)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # logits of several units, where processing matters
    model.config.pad_token_id = tok.pad_token_id
    return model


def _batch(vocab: int, pad: int):
    """Two rows of 9 tokens, none of them ``pad`` or the first few (special) ids; the second left-padded."""
    ids = torch.randint(pad + 4, vocab, (2, 9)) if pad + 4 < vocab else torch.randint(3, pad, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, pad), mask


def _own_logprobs(model, ids, mask, start, temperature, suppress=()):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    logits = logits[:, start - 1 : -1].float() / temperature
    if suppress:
        logits = logits.index_fill(-1, torch.tensor(suppress), -math.inf)
    logp = torch.log_softmax(logits, -1)
    entropy = -torch.where(logp.isfinite(), logp.exp() * logp, 0.0).sum(-1)
    return logp.gather(-1, ids[:, start:, None]).squeeze(-1), entropy


def test_the_fused_path_is_kept_where_it_matches(torch_backend):
    model = _tiny_llama()
    assert verify(model, build_tokenizer()) == "fused"
    assert getattr(model, LOGITS_PATH) == "fused"


def test_unknown_logit_processing_switches_to_the_models_own_output_layer(torch_backend, caplog, monkeypatch):
    """ScaledLlama's logits are not the output layer's: fastrlhf logs it, then reads log-probs, entropy and
    gradients through the model's own forward, never more than a chunk of tokens at a time."""
    model = _tiny_llama(ScaledLlama)
    with caplog.at_level(logging.WARNING, logger="fastrlhf"):
        assert verify(model, build_tokenizer()) == "model"
    assert "through the model's own output layer" in caplog.text
    tok = build_tokenizer()
    ids, mask = _batch(len(tok), tok.pad_token_id)
    start, temperature, suppress = 4, 0.7, (tok.pad_token_id,)
    shapes = []
    model_logits = architectures.model_logits
    monkeypatch.setattr(architectures, "default_chunk_size", lambda vocab: 4)
    monkeypatch.setattr(
        architectures, "model_logits", lambda m, h: shapes.append(tuple(h.shape)) or model_logits(m, h)
    )
    want, want_entropy = _own_logprobs(model, ids, mask, start, temperature, suppress)
    got, entropy = response_logprobs(
        model, ids, mask, start, temperature=temperature, return_entropy=True, suppress_ids=suppress
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    assert shapes and max(s[1] for s in shapes) <= 4  # [1, chunk, H]: never [B, T, V] logits
    head = model.lm_head.weight
    (expected,) = torch.autograd.grad(want.sum(), head)
    (actual,) = torch.autograd.grad(got.sum(), head)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    fused = _tiny_llama(ScaledLlama)  # what the fused path alone would have given: far off
    plain = response_logprobs(fused, ids, mask, start, temperature=temperature)
    assert (plain - want).abs().max() > 0.1


def _saved(tmp_path, model_type: str, seed: int = 0):
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    vocab = model.get_input_embeddings().num_embeddings
    tok = tiny_tokenizer(vocab - 16)
    ensure_pad_token(tok)
    return tok


def test_a_model_that_ignores_left_padding_is_refused(tmp_path, torch_backend):
    tok = _saved(tmp_path, "rwkv")  # a recurrent model with no attention mask
    with pytest.raises(UnsupportedModel, match="left-padded row differs from the same tokens unpadded"):
        load_causal_lm(str(tmp_path), CPU, torch.device("cpu"), tok)
    skipped = ModelConfig(dtype="float32", verify_fast_path=False)
    load_causal_lm(str(tmp_path), skipped, torch.device("cpu"), tok)  # the option skips the check


def test_a_non_causal_model_is_refused(torch_backend):
    model = _tiny_llama()
    model.set_attn_implementation("eager")
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    original = model.model.forward

    def bidirectional(*args, attention_mask=None, **kwargs):  # attends to every real token, later ones too
        return original(*args, attention_mask=_full(attention_mask), **kwargs)  # 4D: used as it is

    model.model.forward = bidirectional
    with pytest.raises(UnsupportedModel, match="not a causal model"):
        verify(model, build_tokenizer())


def _full(mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def test_the_check_leaves_the_random_state_alone(torch_backend):
    """Loading with or without the check gives the same run: its training-mode forwards draw nothing."""
    model = _tiny_llama()
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    verify(model, build_tokenizer())
    assert torch.equal(torch.rand(3), want)


def test_the_check_costs_little(torch_backend):
    model = _tiny_llama()
    t0 = time.perf_counter()
    verify(model, build_tokenizer())
    assert time.perf_counter() - t0 < 2.0  # a 4 x 12-token batch: a few forwards


def test_auto_attention_follows_what_the_class_supports(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    class Eager(PreTrainedModel):
        _supports_sdpa = False
        _supports_flash_attn = False

    class Sdpa(Eager):
        _supports_sdpa = True

    class Flash(Sdpa):
        _supports_flash_attn = True

    assert attention_implementation("auto", Eager, cpu, torch.float32) == "eager"
    assert attention_implementation("auto", Sdpa, cpu, torch.float32) == "sdpa"
    assert attention_implementation("eager", Sdpa, cpu, torch.float32) == "eager"
    assert attention_implementation("auto", None, cpu, torch.float32) is None  # remote code: transformers
    monkeypatch.setattr(architectures.importlib.util, "find_spec", lambda name: object())
    assert attention_implementation("auto", Flash, cuda, torch.bfloat16) == "flash_attention_2"
    assert attention_implementation("auto", Sdpa, cuda, torch.bfloat16) == "sdpa"
    assert attention_implementation("auto", Flash, cuda, torch.float32) == "sdpa"
    assert attention_implementation("auto", Flash, cpu, torch.bfloat16) == "sdpa"


def test_the_loader_picks_eager_for_a_class_without_sdpa(tmp_path, torch_backend, caplog):
    tok = _saved(tmp_path, "roformer")  # no SDPA support: "auto" forcing SDPA would refuse it
    with caplog.at_level(logging.INFO, logger="fastrlhf"):
        model = load_causal_lm(str(tmp_path), CPU, torch.device("cpu"), tok)
    assert model.config._attn_implementation == "eager"
    assert "RoFormerForCausalLM: eager attention" in caplog.text


def test_trunk_lookup_in_composite_models():
    with torch.device("meta"):
        llama4 = AutoModelForCausalLM.from_config(tiny_config("llama4_text"))  # prefix says language_model
        gemma3 = AutoModelForCausalLM.from_config(tiny_config("gemma3"))  # text + vision under one wrapper
        bart = AutoModelForCausalLM.from_config(tiny_config("bart"))  # a wrapper around its decoder
    assert llama4.base_model_prefix != "model" and trunk_of(llama4) is llama4.model
    assert trunk_of(gemma3) is gemma3.model
    assert trunk_of(bart) is bart.model.decoder


def test_a_reward_model_for_an_architecture_without_sequence_classification(tmp_path, torch_backend):
    """Cohere has no sequence-classification class: a scalar head on the causal LM, initialized from the SFT
    checkpoint, saved and loaded back with its head and reward bias."""
    tok = _saved(tmp_path / "sft", "cohere")
    assert scalar_model_class(tiny_config("cohere")).__name__ == "CohereForCausalLMWithScalarHead"
    rm = load_scalar_model(str(tmp_path / "sft"), CPU, torch.device("cpu"), tok)
    assert rm.score.out_features == 1 and rm.config.reward_bias == 0.0
    ids, mask = _batch(len(tok) - 1, tok.pad_token_id)
    with torch.no_grad():
        rm.score.weight.normal_()
        rm.config.reward_bias = 0.25
        scores = sequence_scores(rm, ids, mask)
        values = token_values(rm, ids, mask, 4)
    rm.save_pretrained(tmp_path / "rm")
    again = load_scalar_model(str(tmp_path / "rm"), CPU, torch.device("cpu"), tok, trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(again, ids, mask), scores)
        torch.testing.assert_close(token_values(again, ids, mask, 4), values)
    assert again.config.reward_bias == 0.25


def test_a_sequence_classification_class_is_used_where_it_is_a_score_head():
    assert scalar_model_class(tiny_config("llama")).__name__ == "LlamaForSequenceClassification"
    assert scalar_model_class(tiny_config("bert")).__name__ == "BertLMHeadModelWithScalarHead"  # [CLS] pooler


@pytest.mark.parametrize("path", ["fused", "model"])
def test_generate_samples_the_distribution_the_trainer_scores(tmp_path, torch_backend, path):
    """Issue 9, item 5: the rollout suppresses the pad token; the log-probs in generate's own scores (the
    distribution the tokens were drawn from) equal the trainer's log-probs of those tokens, through the fused
    path and through the model's own output layer, where the pad token holds a large share of the mass (up
    to ~85%: the fused path renormalizes from log p and the pad token's logit, which loses fp32 precision as
    that share nears 1)."""
    from fastrlhf.ppo import PPOModels, Rollout, evaluate, rollout, suppressed_ids

    tok = build_tokenizer()
    policy = _tiny_llama(ScaledLlama if path == "model" else LlamaForCausalLM, scale=10.0)
    with torch.no_grad():  # the pad token's row along the mean hidden state: much of the mass
        ids, mask = _batch(len(tok), tok.pad_token_id)
        h = policy.model(input_ids=ids, attention_mask=mask).last_hidden_state
        direction = h.reshape(-1, h.shape[-1]).mean(0)
        policy.lm_head.weight[tok.pad_token_id] = direction / direction.norm() ** 2 * 2.0
    policy.requires_grad_(False)
    assert verify(policy, tok) == path
    cfg = PPOConfig(temperature=0.7, top_p=1.0, max_new_tokens=6, micro_batch_size=4)
    scores: list[torch.Tensor] = []
    generate = policy.generate

    def generate_with_scores(**kwargs):
        out = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.extend(out.scores)
        return out.sequences

    policy.generate = generate_with_scores
    prompts = ["sort : 3 1 2 =", "sort : 9 4 =", "sort : 5 =", "sort : 8 7 6 5 ="]
    torch.manual_seed(0)
    batch: Rollout = rollout(policy, tok, prompts, [tok(p)["input_ids"] for p in prompts], cfg)
    tokens = batch.input_ids[:, batch.response_start :]
    sampled = torch.stack([torch.log_softmax(s.float(), -1) for s in scores], 1)  # [B, R, V]
    sampled = sampled.gather(-1, tokens[..., None]).squeeze(-1)
    models = PPOModels(policy, tok, reward=lambda p, c: [0.0] * len(p), reference=policy)
    evaluate(models, batch, torch.arange(len(prompts)), cfg)
    m = batch.response_mask
    torch.testing.assert_close(batch.logp[m], sampled[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.ref_logp[m], sampled[m], rtol=1e-5, atol=1e-5)
    unsuppressed = response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.response_start,
                                     temperature=cfg.temperature)  # fmt: skip
    assert (unsuppressed[m] - sampled[m]).abs().max() > 0.05, "the test needs a pad token that matters"
    assert suppressed_ids(tok) == (tok.pad_token_id,)
