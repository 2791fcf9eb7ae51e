"""The paged backend (transformers continuous batching) against the reference: greedy tokens with EOS,
min_new_tokens (two calls: continuous batching drops that processor), suppressed ids, left padding and
truncation after EOS on six architectures; the sampling distribution; weights after an optimizer step;
seeded runs that repeat without disturbing the caller's random stream."""

from __future__ import annotations

import pytest
import torch
from rollout_support import (
    CONFIGS,
    FALSE_ALARM,
    PAD,
    assert_hf_semantics,
    eos_case,
    greedy,
    left_padded,
    sgd_step,
    tiny_model,
    two_token_p_value,
)

from fastrlhf.config import RolloutConfig
from fastrlhf.rollout import SamplingParams
from fastrlhf.rollout.hf import HFEngine
from fastrlhf.rollout.paged import PagedEngine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_paged_greedy_matches_hf_with_eos_min_tokens_suppression_and_padding(arch, torch_backend):
    model = tiny_model(arch)
    ids, mask = left_padded(5, 7)
    params, _ = eos_case(model, ids, mask)
    want = HFEngine().generate(model, ids, mask, params).tokens
    got = PagedEngine().generate(model, ids, mask, params)
    assert got.backend == "paged"
    assert got.tokens.shape == want.shape and torch.equal(got.tokens, want)
    assert_hf_semantics(got.tokens, params)


def test_paged_samples_follow_the_temperature_top_p_distribution(torch_backend):
    """Chi-square at a false-alarm rate of 1e-4 (``FALSE_ALARM``), 3000 rows of one prompt."""
    torch.manual_seed(0)
    engine = PagedEngine(RolloutConfig(backend="paged", prefill_tokens=512))
    assert two_token_p_value(engine, tiny_model("llama", seed=3), n=3000) > FALSE_ALARM


@pytest.mark.parametrize("replace_storage", [False, True])
def test_paged_samples_come_from_the_weights_after_an_optimizer_step(replace_storage, torch_backend):
    model = tiny_model("qwen2")
    ids, mask = left_padded(3, 6)
    engine = PagedEngine()
    before = engine.generate(model, ids, mask, greedy(6)).tokens
    sgd_step(model, ids, mask, replace_storage=replace_storage)
    after = engine.generate(model, ids, mask, greedy(6)).tokens
    assert torch.equal(after, HFEngine().generate(model, ids, mask, greedy(6)).tokens)
    assert not torch.equal(after, before)


def test_paged_seeded_runs_repeat_and_leave_the_callers_random_stream_alone(torch_backend):
    model = tiny_model("llama")
    ids, mask = left_padded(4, 6)
    params = SamplingParams(max_new_tokens=6, eos_token_id=1, pad_token_id=PAD, temperature=1.3)
    engine = PagedEngine()
    torch.manual_seed(5)
    a, after_a = engine.generate(model, ids, mask, params).tokens, torch.rand(3)
    torch.manual_seed(5)
    b = engine.generate(model, ids, mask, params).tokens
    torch.manual_seed(5)
    torch.randint(0, 2**31 - 1, (1,))  # the one draw the engine takes (its seed)
    assert torch.equal(a, b) and torch.equal(torch.rand(3), after_a)


@pytest.mark.cuda
def test_paged_on_cuda_matches_hf_and_memory_stays_flat_over_20_rollouts():
    model = tiny_model("qwen2").cuda()
    ids, mask = (t.cuda() for t in left_padded(5, 7))
    params, _ = eos_case(model, ids, mask)
    engine = PagedEngine()
    want = HFEngine().generate(model, ids, mask, params).tokens
    assert torch.equal(engine.generate(model, ids, mask, params).tokens, want)
    sampled = SamplingParams(max_new_tokens=12, eos_token_id=params.eos_token_id, pad_token_id=PAD,
                             temperature=0.9, top_p=0.9)  # fmt: skip
    engine.generate(model, ids, mask, sampled)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for _ in range(20):
        engine.generate(model, ids, mask, sampled)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start
