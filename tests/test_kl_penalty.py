"""kl_penalty: both backends against float64 formulas written here, values and gradients."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.kernels import kl_penalty
from fastrlhf.kernels.kl_penalty import kl_penalty_reference

ESTIMATORS = ["k1", "k2", "k3"]
HALF_RTOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def kl64(logp, ref_logp, estimator):
    """The spec in float64, written independently of the module (k3 by its closed form, no polynomial)."""
    d = logp.double() - ref_logp.double()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    return torch.expm1(-d) + d  # float64 keeps ~1e-8 relative accuracy down to |d| ~ 1e-8


def sample(shape, dtype=torch.float32, spread=1.0):
    """Log-probs and a reference differing by log-ratios from 1e-6 to ~`spread`, both signs."""
    logp = -torch.rand(shape) * 8
    magnitude = 10 ** (torch.rand(shape) * (6 + torch.log10(torch.tensor(spread))) - 6)
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    return logp.to(dtype), (logp + sign * magnitude).to(dtype)


def assert_kl_close(actual, logp, ref_logp, estimator, rtol=2e-6):
    expected = kl64(logp, ref_logp, estimator)
    assert actual.dtype == torch.float32 and actual.shape == logp.shape
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 37), (2, 5, 131)])
def test_values(backend, estimator, shape):
    logp, ref_logp = sample(shape)
    assert_kl_close(kl_penalty(logp, ref_logp, estimator=estimator), logp, ref_logp, estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(backend, estimator, dtype):
    logp, ref_logp = sample((4, 50), dtype)
    # Computed in fp32 from the rounded inputs, so fp32 accuracy against float64 of the same inputs.
    assert_kl_close(kl_penalty(logp, ref_logp, estimator=estimator), logp, ref_logp, estimator)


def test_mixed_input_dtypes(backend):
    logp, ref_logp = sample((3, 40))
    ref_logp = ref_logp.to(torch.bfloat16)
    assert_kl_close(kl_penalty(logp, ref_logp, estimator="k3"), logp, ref_logp, "k3")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_k3_small_and_extreme_log_ratios(backend, estimator):
    d = torch.tensor(
        [1e-7, -1e-7, 3e-5, -3e-5, 0.1, -0.1, 0.4999, -0.4999, 0.5, -0.5, 0.5001, 3.0, -3.0, 40.0, -40.0]
    )
    d = torch.cat([d, torch.linspace(-60.0, 60.0, 97)])
    ref_logp = torch.full_like(d, -3.0)
    logp = ref_logp + d
    assert_kl_close(kl_penalty(logp, ref_logp, estimator=estimator), logp, ref_logp, estimator)


def test_nonnegative_estimators(backend):
    logp, ref_logp = sample((6, 333), spread=30.0)
    for estimator in ("k2", "k3"):
        assert (kl_penalty(logp, ref_logp, estimator=estimator) >= 0).all()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_identical_inputs_give_exact_zero(backend, estimator):
    logp = -torch.rand(5, 77) * 20
    logp.requires_grad_(True)
    kl = kl_penalty(logp, logp.detach().clone(), estimator=estimator)
    assert torch.equal(kl, torch.zeros_like(kl))
    kl.sum().backward()
    if estimator != "k1":
        assert torch.equal(logp.grad, torch.zeros_like(logp))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "logp", "ref"])
def test_gradients(backend, estimator, needs):
    logp, ref_logp = sample((3, 451), spread=3.0)  # one full block of 1024 and a masked one
    logp.requires_grad_(needs[0])
    ref_logp.requires_grad_(needs[1])
    upstream = torch.randn(3, 451)
    kl_penalty(logp, ref_logp, estimator=estimator).backward(upstream)

    logp64 = logp.detach().double().requires_grad_(needs[0])
    ref64 = ref_logp.detach().double().requires_grad_(needs[1])
    kl64(logp64, ref64, estimator).backward(upstream.double())
    for t, t64 in ((logp, logp64), (ref_logp, ref64)):
        if t64.requires_grad:
            assert t.grad.dtype == t.dtype
            torch.testing.assert_close(t.grad.double(), t64.grad, rtol=2e-6, atol=1e-12)
        else:
            assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradients(backend, dtype):
    logp, ref_logp = sample((4, 30), dtype, spread=3.0)
    logp.requires_grad_(True)
    ref_logp.requires_grad_(True)
    kl_penalty(logp, ref_logp, estimator="k3").sum().backward()
    d = logp.detach().double() - ref_logp.detach().double()
    expected = 1 - torch.exp(-d)
    assert logp.grad.dtype == ref_logp.grad.dtype == dtype
    torch.testing.assert_close(logp.grad.double(), expected, rtol=HALF_RTOL[dtype], atol=1e-7)
    torch.testing.assert_close(ref_logp.grad.double(), -expected, rtol=HALF_RTOL[dtype], atol=1e-7)


def test_non_contiguous_input(backend):
    logp, ref_logp = sample((40, 6))
    logp_t, ref_t = logp.t(), ref_logp.t()
    logp_t.requires_grad_(True)
    kl = kl_penalty(logp_t, ref_t, estimator="k2")
    assert_kl_close(kl, logp_t.detach(), ref_t, "k2")
    kl.sum().backward()
    torch.testing.assert_close(logp_t.grad, logp_t.detach() - ref_t)


def test_empty(backend):
    x = torch.zeros(0, 5, requires_grad=True)
    kl = kl_penalty(x, torch.zeros(0, 5), estimator="k3")
    assert kl.shape == (0, 5)
    kl.sum().backward()
    assert x.grad.shape == (0, 5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_reference_matches_float64_formula(estimator):
    logp, ref_logp = sample((5, 20))
    logp, ref_logp = logp.double(), ref_logp.double()
    out = kl_penalty_reference(logp, ref_logp, estimator=estimator)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, kl64(logp, ref_logp, estimator), rtol=1e-9, atol=1e-30)


def test_validation():
    logp, ref_logp = sample((2, 3))
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref_logp, estimator="k4")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(logp, ref_logp[:, :2])
    with pytest.raises(ValueError, match="logp"):
        kl_penalty(logp.double(), ref_logp)
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(logp, ref_logp.long())
    with pytest.raises(ValueError, match="logp"):
        kl_penalty(logp.tolist(), ref_logp)
    with pytest.raises(ValueError, match="device"):
        kl_penalty(logp, ref_logp.to("meta"))
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty_reference(logp, ref_logp, estimator="kl")


@pytest.mark.cuda
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(estimator, dtype):
    logp, ref_logp = sample((64, 1000), dtype, spread=5.0)
    lp, rl = logp.cuda().requires_grad_(True), ref_logp.cuda().requires_grad_(True)
    kl = kl_penalty(lp, rl, estimator=estimator)
    assert_kl_close(kl.cpu(), logp, ref_logp, estimator)
    upstream = torch.randn(64, 1000)
    kl.backward(upstream.cuda())
    logp64 = logp.double().requires_grad_(True)
    kl64(logp64, ref_logp, estimator).backward(upstream.double())
    torch.testing.assert_close(lp.grad.cpu().double(), logp64.grad, rtol=HALF_RTOL[dtype], atol=1e-6)
    torch.testing.assert_close(rl.grad.cpu().double(), -logp64.grad, rtol=HALF_RTOL[dtype], atol=1e-6)
