"""Rollout engines against the reference (transformers ``generate``): same tokens where they must be the
same, the right distribution where they sample, and no growth or re-allocation from one rollout to the next.

Tiny random models of six architectures built from configs (``rollout_support``). Most tests run the
PyTorch path of ``sample_tokens`` (its own tests cover the Triton kernel); one runs the Triton kernel
through the interpreter inside the decode loop. The paged backend's tests are in test_rollout_paged.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from rollout_support import (
    CONFIGS,
    FALSE_ALARM,
    LLAMA_LIKE,
    PAD,
    SMALL_BUCKETS,
    assert_hf_semantics,
    common_config,
    early_token,
    eos_case,
    greedy,
    greedy_probe,
    left_padded,
    sgd_step,
    tiny_model,
    two_token_p_value,
)
from transformers import AutoModelForCausalLM

from fastrlhf.config import RolloutConfig
from fastrlhf.rollout import SamplingParams, engine_for, make_engine, resolve_backend
from fastrlhf.rollout.hf import HFEngine
from fastrlhf.rollout.paged import PagedEngine
from fastrlhf.rollout.static import StaticEngine, batch_buckets, prompt_bucket_len, weights_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_greedy_matches_hf_with_eos_min_tokens_padding_and_compaction(arch, torch_backend):
    model = tiny_model(arch)
    ids, mask = left_padded(5, 7)
    params, _ = eos_case(model, ids, mask)
    want = HFEngine().generate(model, ids, mask, params).tokens
    engine = StaticEngine(SMALL_BUCKETS)
    got = engine.generate(model, ids, mask, params).tokens
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert_hf_semantics(got, params)
    # Batch 5 runs in bucket 8; once a row ends, the 4 left fit bucket 4 and are compacted into it.
    assert len({b for b, _ in engine.step_shapes}) >= 2, engine.step_shapes


def test_greedy_matches_hf_through_the_triton_sampling_kernel(triton_backend):
    model = tiny_model("qwen2")
    ids, mask = left_padded(3, 5)
    params = greedy(5, suppress_ids=(PAD,))
    want = HFEngine().generate(model, ids, mask, params).tokens
    assert torch.equal(StaticEngine(SMALL_BUCKETS).generate(model, ids, mask, params).tokens, want)


@pytest.mark.parametrize(
    "backend,arch", [("hf", "llama"), *(("static", a) for a in CONFIGS)], ids=lambda x: str(x)
)
def test_two_token_samples_follow_the_temperature_top_p_distribution(backend, arch, torch_backend):
    """The first two sampled tokens of 6000 rows match softmax(logits / T) cut to the top-p nucleus, by
    Pearson's chi-square test at a false-alarm rate of 1e-4 per test (``FALSE_ALARM``). The same test on
    hf's own sampler checks the test."""
    torch.manual_seed(0)
    model = tiny_model(arch, seed=3)
    engine = (
        HFEngine() if backend == "hf" else StaticEngine(RolloutConfig(prompt_bucket=4, min_batch_bucket=8))
    )
    assert two_token_p_value(engine, model, n=6000) > FALSE_ALARM


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
    params = greedy(6)
    engine = StaticEngine(SMALL_BUCKETS)
    before = engine.generate(model, ids, mask, params).tokens
    print_before = weights_fingerprint(model)
    sgd_step(model, ids, mask, replace_storage=replace_storage)
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


def test_smaller_rollouts_reuse_the_cache_and_a_larger_one_grows_it_once(torch_backend):
    """Sized from batch x (prompt bucket + max_new_tokens): a shorter prompt bucket or a smaller batch runs
    in the held cache (more left padding, its first rows), a longer one replaces it by the larger of both
    shapes, after which every shape seen so far fits. Tokens stay hf's throughout."""
    model = tiny_model("qwen2")
    engine = StaticEngine(RolloutConfig(prompt_bucket=4, min_batch_bucket=2, compact_every=1))
    params = greedy(5, suppress_ids=(PAD,))
    # (batch, prompt length): the first sets 8 x 12, the third needs 4 x 16 and grows it to 8 x 16.
    shapes = [(7, 7), (3, 2), (4, 10), (6, 6), (2, 9)]
    allocations = []
    for batch, length in shapes:
        ids, mask = left_padded(batch, length, seed=batch + length)
        want = HFEngine().generate(model, ids, mask, params).tokens
        assert torch.equal(engine.generate(model, ids, mask, params).tokens, want), (batch, length)
        allocations.append(engine.allocations)
    assert allocations == [1, 1, 2, 2, 2]
    assert (engine._storage.batch, engine._storage.cache_len) == (8, 12 + 5)


def test_keep_cache_false_frees_the_cache_after_each_rollout(torch_backend):
    model = tiny_model("llama")
    engine = StaticEngine(RolloutConfig(prompt_bucket=8, keep_cache=False))
    params = SamplingParams(max_new_tokens=3, eos_token_id=1, pad_token_id=PAD)
    ids, mask = left_padded(2, 5)
    gen = engine.generate(model, ids, mask, params)
    assert gen.kv_cache_bytes > 0 and engine._storage is None


@pytest.mark.parametrize("backend", ["static", "paged"])
def test_lora_adapters_are_active_and_gradient_checkpointing_is_irrelevant(backend, torch_backend):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)  # peft starts B at 0; make the adapters change the output
    model.eval()
    ids, mask = left_padded(3, 6)
    params = greedy(6)
    engine = StaticEngine(SMALL_BUCKETS) if backend == "static" else PagedEngine()
    got = engine.generate(model, ids, mask, params)
    assert got.backend == backend
    assert torch.equal(got.tokens, HFEngine().generate(model, ids, mask, params).tokens)
    with model.disable_adapter():  # the PPO reference: the same model, adapters off
        base = engine.generate(model, ids, mask, params).tokens
        assert torch.equal(base, HFEngine().generate(model, ids, mask, params).tokens)
    assert not torch.equal(got.tokens, base)


def _mamba():
    torch.manual_seed(0)
    config = tf.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, **common_config())
    return AutoModelForCausalLM.from_config(config).eval()


def _four_bit_marked():
    model = tiny_model("llama")
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets on a 4-bit base
    return model


@pytest.mark.parametrize(
    "backend,build,reason",
    [
        ("static", _mamba, "does not declare static-cache support"),
        ("paged", _mamba, "cannot run paged attention"),
        ("static", _four_bit_marked, "bitsandbytes-quantized"),
        ("static", lambda: _sliding(8), "sliding window 8"),
    ],
    ids=["static-mamba", "paged-mamba", "static-4bit", "static-short-window"],
)
def test_a_backend_that_cannot_serve_a_model_falls_back_to_hf_and_says_why(
    backend, build, reason, caplog, torch_backend
):
    """A state-space model (no KV cache at all), a 4-bit base, a sliding window shorter than prompt +
    max_new_tokens: hf's tokens, a warning naming the cause (once per cause)."""
    model = build()
    ids, mask = left_padded(2, 6)
    params = greedy(6)
    engine = engine_for(model, RolloutConfig(backend=backend, prompt_bucket=4))
    with caplog.at_level(logging.WARNING, logger="fastrlhf"):
        got = engine.generate(model, ids, mask, params)
        again = engine.generate(model, ids, mask, params)
    assert got.backend == "hf" == again.backend
    assert reason in caplog.text and f"rollout.backend={backend}: " in caplog.text
    assert "falling back to hf" in caplog.text
    assert caplog.text.count(reason) == 1
    assert torch.equal(got.tokens, HFEngine().generate(model, ids, mask, params).tokens)


def _sliding(window: int):
    torch.manual_seed(0)
    config = tf.MistralConfig(**LLAMA_LIKE, sliding_window=window, **common_config())
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


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


def test_engine_for_reuses_one_engine_per_model_and_config(caplog):
    model = tiny_model("llama")
    cfg = RolloutConfig(backend="static")
    with caplog.at_level(logging.INFO, logger="fastrlhf"):
        engine = engine_for(model, cfg)
    assert "rollout backend: static (rollout.backend=static)" in caplog.text
    assert isinstance(engine, StaticEngine) and engine_for(model, cfg) is engine
    cfg.prompt_bucket = 16  # a changed config gets a new engine
    assert engine_for(model, cfg) is not engine
    assert isinstance(engine_for(model, RolloutConfig(backend="hf")), HFEngine)
    assert isinstance(engine_for(model, RolloutConfig(backend="paged")), PagedEngine)


@pytest.mark.cuda
def test_cuda_graphs_match_hf_and_memory_stays_flat_over_20_rollouts():
    model = tiny_model("qwen2").cuda()
    ids, mask = (t.cuda() for t in left_padded(5, 7))
    eos = early_token(greedy_probe(model, ids, mask, 12, (PAD,)), avoid=(PAD, 1), start=0)
    params = greedy(12, eos, suppress_ids=(PAD,))
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
    # After an optimizer step (in place), the replayed graphs read the new weights.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    want = HFEngine().generate(model, ids, mask, params).tokens
    assert torch.equal(engine.generate(model, ids, mask, params).tokens, want)
    assert engine.captures == captures


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
    params, _ = eos_case(model, ids, mask)
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
