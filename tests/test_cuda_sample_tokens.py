"""The compiled sampling kernel on a GPU: real vocabulary sizes, the distribution, CUDA-graph capture.

Run on a CUDA machine with ``TRITON_INTERPRET=0 pytest -m cuda tests``; skipped elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_sample_tokens import ALPHA, ROW, ROW_SUPPRESS, chi_square_pvalue, nucleus_margin, nucleus_probs

from fastrlhf.kernels import sample_tokens
from fastrlhf.kernels.sample_tokens import sample_tokens_reference, sample_with_threshold

pytestmark = pytest.mark.cuda

V_QWEN = 151936


def cuda_seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_and_logp_on_cuda(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(64, V_QWEN, device="cuda") * 4).to(dtype)
    logits[1, 7] = logits[1, V_QWEN - 3] = 100.0  # tied maximum, far apart: id 7
    suppress = torch.tensor([int(logits[0].argmax()), 11, V_QWEN - 1], device="cuda")
    ids, logp = sample_tokens(logits, temperature=0.7, suppress_ids=suppress, greedy=True)
    z = logits.double() / 0.7
    z[:, suppress] = -math.inf
    expected = z.argmax(dim=-1)
    assert torch.equal(ids, expected) and ids[1] == 7
    ref = torch.log_softmax(z, dim=-1).gather(1, expected[:, None]).squeeze(1)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_kernel_draws_the_reference_ids_and_nucleus_on_cuda(dtype, temperature, top_p):
    torch.manual_seed(1)
    B = 32
    logits = (torch.randn(B, V_QWEN, device="cuda") * 3).to(dtype)
    suppress = torch.tensor([0, 5, 151643], device="cuda")
    seed = cuda_seed(123)
    result = sample_with_threshold(
        logits, temperature=temperature, top_p=top_p, suppress_ids=suppress, seed=seed
    )
    ref_ids, ref_logp = sample_tokens_reference(
        logits, temperature=temperature, top_p=top_p, suppress_ids=suppress, seed=seed
    )
    # The GPU's exp/log differ from float64 by ulps: at most a near-tie of the keys may flip.
    assert (result.ids != ref_ids).sum() <= 1
    same = result.ids == ref_ids
    torch.testing.assert_close(result.logp[same].double(), ref_logp[same].double(), rtol=1e-5, atol=1e-5)
    # The kept set agrees with the torch path's sorted cumulative mass wherever it is not a rounding call.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTRLHF_KERNELS", "torch")
        torch_thr = sample_with_threshold(
            logits, temperature=temperature, top_p=top_p, suppress_ids=suppress, seed=seed
        ).threshold
    allowed = logits.float().index_fill(1, suppress, -math.inf)
    clear = nucleus_margin(allowed, temperature, top_p) > 2e-6
    assert clear.sum() >= B // 2
    assert torch.equal(result.threshold[clear], torch_thr[clear])


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 0.9), (1.7, 0.5)])
def test_frequencies_on_cuda_at_a_real_vocabulary(temperature, top_p):
    """ROW's ids scattered over a 151936-wide row whose other logits sit 40 nats down (mass ~1e-12)."""
    n = 100_000
    cols = torch.linspace(0, V_QWEN - 1, ROW.numel()).long()
    row = torch.full((V_QWEN,), -40.0)
    row[cols] = ROW
    suppress = cols[ROW_SUPPRESS].cuda()
    logits = row.cuda().expand(n, -1)  # row stride 0: every program reads the same row
    ids, _ = sample_tokens(
        logits, temperature=temperature, top_p=top_p, suppress_ids=suppress, seed=cuda_seed(9)
    )
    position = torch.full((V_QWEN,), -1, dtype=torch.int64)
    position[cols] = torch.arange(ROW.numel())
    mapped = position[ids.cpu()]
    assert (mapped >= 0).all(), "an id outside ROW's (mass ~1e-12 per draw)"
    assert chi_square_pvalue(mapped, nucleus_probs(temperature, top_p)) > ALPHA


def test_sampling_is_captured_by_a_cuda_graph():
    """The engine's use: the seed tensor changes between replays; a replay equals an eager call."""
    torch.manual_seed(2)
    logits = torch.randn(64, V_QWEN, device="cuda", dtype=torch.bfloat16) * 2
    suppress = torch.tensor([3, 17], device="cuda")
    seed = cuda_seed(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample_tokens(logits, temperature=0.8, top_p=0.9, suppress_ids=suppress, seed=seed)  # compile first
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, logp = sample_tokens(logits, temperature=0.8, top_p=0.9, suppress_ids=suppress, seed=seed)
    previous = None
    for value in (100, 101, 102):
        seed.fill_(value)
        graph.replay()
        eager_ids, eager_logp = sample_tokens(
            logits, temperature=0.8, top_p=0.9, suppress_ids=suppress, seed=cuda_seed(value)
        )
        assert torch.equal(ids, eager_ids) and torch.equal(logp, eager_logp)
        if previous is not None:
            assert (ids != previous).sum() > 10
        previous = ids.clone()
