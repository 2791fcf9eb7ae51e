"""The compiled RL kernels on a GPU at realistic, large, odd sizes, against their references in float64.

gae and ppo_advantages cross the 1024-token block carry with ragged masks; masked_whiten runs several tiles
per program; kl_penalty covers every estimator and dtype, forward and backward; shape_rewards takes each form
of kl_coef without a host sync; group_advantages and sample_tokens run at B = 256 (and V = 151936).

Run on a CUDA machine with ``TRITON_INTERPRET=0 pytest -m cuda tests``; skipped elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.kernels import (
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_advantages,
    sample_tokens,
    shape_rewards,
)
from fastrlhf.kernels.gae import gae_reference
from fastrlhf.kernels.kl_penalty import kl_penalty_reference
from fastrlhf.kernels.sample_tokens import sample_tokens_reference
from fastrlhf.kernels.shape_rewards import ppo_advantages_reference, shape_rewards_reference
from fastrlhf.kernels.whiten import masked_mean_reference, masked_var_reference, masked_whiten_reference

pytestmark = pytest.mark.cuda

B, T = 64, 3000  # three 1024-token blocks per row, the last one partial
ESTIMATORS = ["k1", "k2", "k3"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# kl_penalty: fp32 math on exactly widened inputs. k3 = exp(-d) - 1 + d loses a few digits to cancellation
# near |d| = 0.5 (below it a polynomial takes over), on top of ex2.approx's ~2 ulp. Its half-precision
# gradients are those fp32 results rounded once: at most 2^-8 (bf16) or 2^-11 (fp16) relative.
KL_RTOL = {"k1": 1e-6, "k2": 1e-6, "k3": 5e-6}
GRAD_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2**-8 + 2e-6, torch.float16: 2**-11 + 2e-6}


def ragged_mask(b: int, t: int) -> torch.Tensor:
    """RLHF rows: a masked prompt, a response of any length, masked padding; plus the edge cases."""
    g = torch.Generator().manual_seed(b * 100_003 + t)
    pos = torch.arange(t)
    start = torch.randint(0, t // 4, (b, 1), generator=g)
    end = (start + torch.randint(1, t, (b, 1), generator=g)).clamp(max=t)
    mask = (pos >= start) & (pos < end)
    mask[0] = True  # every token counted
    mask[1] = False  # none
    mask[2] = pos == t - 1  # only the last token: its row's score and the scan's first step
    mask[3] = pos == 0  # only the first token: the carry must cross every block empty
    mask[4] = (pos >= 1000) & (pos < 1100)  # across the first block boundary
    for row in range(5, b, 4):  # multi-turn: environment spans masked inside the response
        mask[row, int(start[row]) + 300 : int(start[row]) + 700] = False
    return mask.cuda()


def strided(b: int, t: int, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """[b, t] values as a model's outputs are sliced: a row stride of t + 1."""
    return (torch.randn(b, t + 1, device="cuda") * scale + shift).to(dtype)[:, 1:]


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32-level agreement; the absolute slack scales with the largest magnitude (scans sum many terms)."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * (1.0 + scale))


# -------------------------------------------------------------------------------------------- gae and ppo


@pytest.mark.parametrize(("gamma", "lam"), [(0.99, 0.95), (1.0, 1.0)])
@pytest.mark.parametrize(
    ("reward_dtype", "value_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
)
def test_gae_on_cuda(gamma, lam, reward_dtype, value_dtype):
    """gamma = lam = 1 carries every advantage through the whole row: a wrong block carry shows in full."""
    torch.manual_seed(0)
    rewards, values, mask = strided(B, T, reward_dtype), strided(B, T, value_dtype, 2.0), ragged_mask(B, T)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = gae_reference(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    assert_close_scaled(adv, exp_adv)
    assert_close_scaled(ret, exp_ret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_advantages_on_cuda(estimator, dtype):
    torch.manual_seed(1)
    mask = ragged_mask(B, T)
    logp = strided(B, T, dtype, 1.0, -3.0)
    ref_logp = (logp.float() + torch.randn(B, T, device="cuda") * 0.3).to(dtype)
    ref_logp[~mask] = float("nan")  # padding may hold garbage: it must not leak into counted tokens
    scores, values = torch.randn(B, device="cuda").to(dtype) * 2, strided(B, T, dtype, 2.0)
    kl_coef = torch.tensor(0.05, device="cuda")
    whiten = estimator != "k2"
    out = ppo_advantages(
        scores, logp, ref_logp, values, mask, kl_coef=kl_coef, estimator=estimator, gamma=0.99, whiten=whiten
    )
    ref = ppo_advantages_reference(
        scores.double(), logp.double(), ref_logp.double(), values.double(), mask,
        kl_coef=0.05, estimator=estimator, gamma=0.99, whiten=whiten,
    )  # fmt: skip
    for name, got, want in zip(out._fields, out, ref, strict=True):
        assert got.isfinite().all(), name
        assert_close_scaled(got, want)
    if whiten:
        counted = out.advantages[mask].double()
        assert abs(counted.mean().item()) < 1e-5 and abs(counted.std().item() - 1.0) < 1e-5


# ----------------------------------------------------------------------------------------------- whiten


@pytest.mark.parametrize("shape", [(64, 9001), (3, 1_000_003)], ids=["576k", "3M"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_over_many_tiles_on_cuda(shape, dtype, shift_mean):
    """More than 512 x 1024 elements: each of the 512 statistics programs sums several tiles. A trend along
    the data makes every tile's contribution to the mean and variance visible (a skipped tile shifts both by
    far more than the tolerance)."""
    torch.manual_seed(2)
    n = math.prod(shape)
    trend = torch.linspace(-1.0, 1.0, n, device="cuda").view(shape)
    x = (3.0 + trend + 0.5 * torch.randn(shape, device="cuda")).to(dtype)
    mask = torch.rand(shape, device="cuda") < 0.7
    mask[0, :5000] = False  # a long masked run spanning tiles
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    expected = masked_whiten_reference(x.double(), mask, shift_mean=shift_mean)
    # fp32 statistics over ~1e6 elements: ~1e-6 relative; x - mean loses ulps of |x| ~ 4.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        masked_mean(x, mask).double(), masked_mean_reference(x.double(), mask), rtol=2e-6, atol=0
    )
    for unbiased in (True, False):
        torch.testing.assert_close(
            masked_var(x, mask, unbiased=unbiased).double(),
            masked_var_reference(x.double(), mask, unbiased=unbiased),
            rtol=1e-5,
            atol=0,
        )


# ------------------------------------------------------------------------------------------- kl_penalty


def log_ratio_pair(shape, dtype, ref_dtype):
    """Policy and reference log-probs whose log-ratios span 1e-6 to ~5 in magnitude (as far as the dtypes
    resolve them), both signs."""
    logp = (-torch.rand(shape, device="cuda") * 8).to(dtype)
    magnitude = 10 ** (torch.rand(shape, device="cuda") * 6.7 - 6)
    sign = torch.where(torch.rand(shape, device="cuda") < 0.5, -1.0, 1.0)
    return logp, (logp.float() + sign * magnitude).to(ref_dtype)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ref_grad", [True, False], ids=["both_grads", "logp_grad"])
def test_kl_penalty_on_cuda(estimator, dtype, ref_grad):
    torch.manual_seed(3)
    shape = (257, 4099)  # ~1.05M elements, a partial last block
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # mixed input dtypes are allowed
    logp, ref_logp = log_ratio_pair(shape, dtype, ref_dtype)
    lp, rl = logp.clone().requires_grad_(), ref_logp.clone().requires_grad_(ref_grad)
    lp64, rl64 = logp.double().requires_grad_(), ref_logp.double().requires_grad_(ref_grad)
    kl = kl_penalty(lp, rl, estimator=estimator)
    expected = kl_penalty_reference(lp64, rl64, estimator=estimator)
    assert kl.dtype == torch.float32
    # Relative even near d = 0, where a naive exp(-d) - 1 + d would lose every digit.
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=KL_RTOL[estimator], atol=1e-30)
    upstream = torch.randn(shape, device="cuda")
    kl.backward(upstream)
    expected.backward(upstream.double())
    assert lp.grad.dtype == dtype
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=GRAD_RTOL[dtype], atol=1e-7)
    if ref_grad:
        assert rl.grad.dtype == ref_dtype
        torch.testing.assert_close(rl.grad.double(), rl64.grad, rtol=GRAD_RTOL[ref_dtype], atol=1e-7)
    else:
        assert rl.grad is None


# ---------------------------------------------------------------------------------------- shape_rewards


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("coef_kind", ["float", "cpu_tensor", "cuda_tensor"])
def test_shape_rewards_kl_coef_forms_on_cuda(estimator, coef_kind):
    """Each form of kl_coef gives the same rewards, and none of them costs a host sync."""
    torch.manual_seed(4)
    mask = ragged_mask(B, T)
    logp = strided(B, T, torch.float32, 1.0, -3.0)
    ref_logp = logp + torch.randn(B, T, device="cuda") * 0.3
    scores = torch.randn(B, device="cuda") * 2
    kl_coef = {
        "float": 0.05,
        "cpu_tensor": torch.tensor(0.05),
        "cuda_tensor": torch.tensor(0.05, device="cuda"),
    }[coef_kind]
    shape_rewards(scores, logp, ref_logp, mask, kl_coef=kl_coef, estimator=estimator)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rewards = shape_rewards(scores, logp, ref_logp, mask, kl_coef=kl_coef, estimator=estimator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = shape_rewards_reference(
        scores.double(), logp.double(), ref_logp.double(), mask, kl_coef=0.05, estimator=estimator
    )
    assert_close_scaled(rewards, expected)


# ----------------------------------------------------------------------------- group_advantages, sampling


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("group_size", [2, 5, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_advantages_on_cuda(estimator, group_size, dtype):
    """256 prompts x group_size responses, in float64 here (group_advantages_reference computes in fp32)."""
    torch.manual_seed(5)
    scores = (torch.randn(256 * group_size, device="cuda") * 3 + 1).to(dtype)
    scores[:group_size] = 0.5  # a tied group: GRPO's eps keeps it finite, at 0
    out = group_advantages(scores, group_size, estimator=estimator)
    s = scores.double().view(-1, group_size)
    centered = s - s.mean(-1, keepdim=True)
    expected = {
        "grpo": centered / (s.std(-1, keepdim=True) + 1e-4),
        "dr_grpo": centered,
        "rloo": centered * group_size / (group_size - 1),
    }[estimator].reshape(-1)
    assert out.dtype == torch.float32
    assert (out[:group_size] == 0).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("temperature", "top_p", "greedy"), [(0.7, 1.0, True), (1.0, 1.0, False), (0.8, 0.9, False)]
)
def test_sample_tokens_at_b256_on_cuda(dtype, temperature, top_p, greedy):
    """The rollout engine's decode step at a Qwen vocabulary: ids and log-probs against the float64 spec."""
    torch.manual_seed(6)
    V = 151936
    logits = (torch.randn(256, V, device="cuda") * 3).to(dtype)
    suppress = torch.tensor([0, 151643, V - 1], device="cuda")
    seed = torch.tensor([2024], dtype=torch.int64, device="cuda")
    options = dict(temperature=temperature, top_p=top_p, suppress_ids=suppress, greedy=greedy)
    ids, logp = sample_tokens(logits, seed=seed, **options)
    ref_ids, ref_logp = sample_tokens_reference(logits, seed=seed, **options)
    assert ids.dtype == torch.int64 and logp.dtype == torch.float32
    assert not torch.isin(ids, suppress).any()
    # The GPU's exp/log differ from float64 by ulps: at most a near-tie of the keys may flip (greedy: none).
    assert (ids != ref_ids).sum() <= (0 if greedy else 1)
    same = ids == ref_ids
    torch.testing.assert_close(logp[same].double(), ref_logp[same].double(), rtol=1e-5, atol=1e-5)
