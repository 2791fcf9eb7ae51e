"""masked_mean / masked_var / masked_whiten: both backends against float64 statistics computed here."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastrlhf.kernels import masked_mean, masked_var, masked_whiten
from fastrlhf.kernels.whiten import masked_mean_reference, masked_var_reference, masked_whiten_reference

whiten_module = importlib.import_module("fastrlhf.kernels.whiten")


@pytest.fixture
def few_programs(monkeypatch):
    """Two reduction programs, so each walks several tiles and the finalize merges partials."""
    monkeypatch.setattr(whiten_module, "_MAX_PROGRAMS", 2)


def stats64(x, mask):
    """float64 mean and unbiased variance of the counted elements (0 and 0 when too few)."""
    values = x.double()[mask != 0]
    n = values.numel()
    mean = values.sum() / n if n else torch.tensor(0.0, dtype=torch.float64)
    var = ((values - mean) ** 2).sum() / (n - 1) if n > 1 else torch.tensor(0.0, dtype=torch.float64)
    return mean, var


def whiten64(x, mask, shift_mean=True, eps=1e-8):
    mean, var = stats64(x, mask)
    y = (x.double() - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(mask != 0, y, 0.0)


def random_mask(shape, p=0.7):
    return torch.rand(shape) < p


SHAPES = [(1, 1), (7, 37), (3, 5, 11), (4, 1500)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_float64(backend, few_programs, shape, shift_mean):
    x = torch.randn(shape) * 3 + 2
    mask = random_mask(shape)
    mask.view(-1)[0] = True
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), whiten64(x, mask, shift_mean), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_mean_var_match_float64(backend, few_programs, shape):
    x = torch.randn(shape) * 5 - 1
    mask = random_mask(shape)
    mean, var = stats64(x, mask)
    torch.testing.assert_close(masked_mean(x, mask).double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked_var(x, mask).double(), var, rtol=1e-5, atol=1e-6)
    values = x.double()[mask]
    biased = values.var(unbiased=False) if values.numel() else torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(masked_var(x, mask, unbiased=False).double(), biased, rtol=1e-5, atol=1e-6)
    assert masked_mean(x, mask).shape == ()


def test_large_offset_no_cancellation(backend, few_programs):
    # mean 1e4, std 1: a fp32 sum-of-squares would lose every digit of the variance.
    x = torch.randn(5, 1201) + 1e4
    mask = random_mask(x.shape, 0.8)
    mean, var = stats64(x, mask)
    ulp = 2.0**-10  # spacing of fp32 numbers near 1e4: the resolution of the data and of a fp32 mean
    torch.testing.assert_close(masked_mean(x, mask).double(), mean, rtol=0.0, atol=ulp)
    torch.testing.assert_close(masked_var(x, mask).double(), var, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(masked_whiten(x, mask).double(), whiten64(x, mask), rtol=1e-5, atol=ulp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(backend, dtype):
    x = (torch.randn(6, 70) * 2 + 1).to(dtype)
    mask = random_mask(x.shape)
    torch.testing.assert_close(masked_whiten(x, mask).double(), whiten64(x, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8])
def test_numeric_masks(backend, mask_dtype):
    x = torch.randn(4, 33)
    mask = random_mask(x.shape)
    out = masked_whiten(x, mask.to(mask_dtype))
    torch.testing.assert_close(out.double(), whiten64(x, mask), rtol=1e-5, atol=1e-5)


def test_no_counted_element(backend):
    x = torch.randn(3, 8)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    assert torch.equal(masked_whiten(x, mask), torch.zeros(3, 8))
    assert masked_mean(x, mask).item() == 0.0
    assert masked_var(x, mask).item() == 0.0


def test_single_counted_element(backend):
    x = torch.randn(3, 8)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[1, 5] = True
    assert masked_var(x, mask).item() == 0.0
    assert masked_mean(x, mask).item() == x[1, 5].item()
    assert torch.equal(masked_whiten(x, mask), torch.zeros(3, 8))
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert unshifted[1, 5].item() == x[1, 5].item() and unshifted.count_nonzero() == 1


def test_constant_values_with_zero_eps(backend):
    x = torch.full((2, 9), 0.25)
    mask = random_mask(x.shape)
    assert torch.equal(masked_whiten(x, mask, eps=0.0), torch.zeros(2, 9))


def test_garbage_at_masked_positions_does_not_leak(backend, few_programs):
    x = torch.randn(5, 300)
    mask = random_mask(x.shape)
    expected = whiten64(x, mask)
    x[~mask] = float("nan")
    x[0, ~mask[0]] = float("inf")
    out = masked_whiten(x, mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(masked_mean(x, mask)) and torch.isfinite(masked_var(x, mask))


def test_non_contiguous_and_expanded_inputs(backend):
    x = torch.randn(40, 6).t()
    mask = (torch.rand(40) < 0.5).expand(6, 40)  # stride 0 along dim 0
    torch.testing.assert_close(masked_whiten(x, mask).double(), whiten64(x, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [0, 1, -1, (0, 2)])
def test_mean_var_along_dims(backend, dim):
    x = torch.randn(4, 9, 5)
    mask = random_mask(x.shape, 0.5)
    mask[0] = False  # a slice with nothing counted
    x64, m64 = x.double(), mask.double()
    n = m64.sum(dim)
    mean = (x64 * m64).sum(dim) / n.clamp(min=1)
    keep = mean.unsqueeze(dim) if isinstance(dim, int) else mean.unsqueeze(0).unsqueeze(2)
    var = (((x64 - keep) * m64) ** 2).sum(dim) / (n - 1).clamp(min=1)
    torch.testing.assert_close(masked_mean(x, mask, dim=dim).double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked_var(x, mask, dim=dim).double(), var, rtol=1e-5, atol=1e-6)


def test_differentiable_when_input_requires_grad(backend):
    # A loss like masked_mean(per_token_loss, mask) must keep its gradient on every backend.
    x = torch.randn(3, 20, requires_grad=True)
    mask = random_mask(x.shape)
    masked_mean(x, mask).backward()
    torch.testing.assert_close(x.grad, mask.float() / mask.sum())
    x.grad = None
    masked_whiten(x, mask).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_empty_tensor(backend):
    x = torch.zeros(0, 4)
    mask = torch.zeros(0, 4, dtype=torch.bool)
    assert masked_whiten(x, mask).shape == (0, 4)
    assert masked_mean(x, mask).item() == 0.0


def test_references_match_float64():
    x = torch.randn(6, 50, dtype=torch.float64) + 100
    mask = random_mask(x.shape)
    mean, var = stats64(x, mask)
    torch.testing.assert_close(masked_mean_reference(x, mask), mean, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(masked_var_reference(x, mask), var, rtol=1e-12, atol=0.0)
    out = masked_whiten_reference(x, mask, shift_mean=False)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, whiten64(x, mask, shift_mean=False), rtol=1e-12, atol=1e-12)
    empty = torch.zeros_like(mask)
    assert torch.equal(masked_whiten_reference(x, empty), torch.zeros_like(x))


def test_validation():
    x, mask = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask"):
        masked_whiten(x, mask[:, :2])
    with pytest.raises(ValueError, match="x"):
        masked_whiten(x.double(), mask)
    with pytest.raises(ValueError, match="x"):
        masked_mean(x.long(), mask)
    with pytest.raises(ValueError, match="mask"):
        masked_var(x, mask.tolist())
    with pytest.raises(ValueError, match="eps"):
        masked_whiten(x, mask, eps=-1.0)
    with pytest.raises(ValueError, match="device"):
        masked_whiten(x, mask.to("meta"))


@pytest.mark.cuda
@pytest.mark.parametrize("shift_mean", [True, False])
def test_cuda(shift_mean):
    x = torch.randn(64, 4001) * 0.5 + 3e3
    mask = random_mask(x.shape)
    ulp = 2.0**-12  # fp32 spacing near 3e3
    out = masked_whiten(x.cuda(), mask.cuda(), shift_mean=shift_mean).cpu()
    atol = 3 * ulp / 0.5 * (1 if shift_mean else 2)  # a mean off by ulps shifts every whitened value
    torch.testing.assert_close(out.double(), whiten64(x, mask, shift_mean), rtol=1e-5, atol=atol)
    mean, var = stats64(x, mask)
    torch.testing.assert_close(masked_var(x.cuda(), mask.cuda()).cpu().double(), var, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(
        masked_mean(x.cuda(), mask.cuda()).cpu().double(), mean, rtol=0.0, atol=2 * ulp
    )
