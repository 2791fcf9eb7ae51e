"""Masked statistics and whitening (advantage normalization) over the counted elements of a tensor.

Only counted elements (``mask != 0``) enter the statistics; masked elements come out as 0 and may hold
anything, NaN included. The variance is unbiased (Bessel's correction).

Edge cases, chosen so that no NaN appears and no data-dependent host sync is needed:

* no counted element: mean 0, variance 0, whitened output all zeros;
* fewer than two counted elements for the unbiased variance: variance 0 (the centered sum is exactly 0),
  so a single counted element whitens to 0 (or to itself when ``shift_mean=False``).

Triton reduction (whole tensor), three launches and no host sync: (1) a grid of at most 512 programs,
each walking its 1024-element tiles; per tile it computes the count, mean and centered sum of squares M2
from deviations about a first mean estimate (a shifted pivot: no sum-of-squares cancellation for
large-mean data, e.g. mean 1e4 std 1) and folds them into a running (n, mean, M2) with Chan's merge;
(2) a one-program finalize merges the per-program partials the same way and writes mean, var and
rsqrt(var + eps) to device memory; (3) the elementwise normalize pass reads them from there.
"""

from __future__ import annotations

import numbers

import torch

from ._backend import check_float, check_mask, check_same_device, device_guard, use_triton
from ._triton import tl, triton

_BLOCK = 1024
_NUM_WARPS = 4
_MAX_PROGRAMS = 512  # partials a single finalize program merges in one tile
_STATS = 3  # mean, var, rstd
_TINY = torch.finfo(torch.float32).tiny  # keeps rsqrt's untaken branch (and its gradient) finite


def _check_args(x: torch.Tensor, mask: torch.Tensor, *, reference: bool = False) -> None:
    if reference:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("x must be a floating-point torch.Tensor")
    else:
        check_float("x", x)
    check_mask("mask", mask, "x", x)
    check_same_device(x=x, mask=mask)


# --------------------------------------------------------------------------------------------- Triton


# N only bounds the tiles (and num_parts the finalize's one tile): no recompile per size.
@triton.jit(do_not_specialize=["N"])
def _partial_stats_kernel(x_ptr, m_ptr, part_n_ptr, part_mean_ptr, part_m2_ptr, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    # fp32 counts: exact to 2**24, and a relative error of 6e-8 beyond that is harmless to the statistics.
    n = zero
    mean = zero
    m2 = zero
    # int64 tile offsets (N may exceed 2**31), carried rather than derived from the loop index.
    start = pid.to(tl.int64) * BLOCK
    step = num_progs.to(tl.int64) * BLOCK
    for _ in range(pid, tl.cdiv(N, BLOCK), num_progs):
        offs = start + tl.arange(0, BLOCK)
        start += step
        inb = offs < N
        counted = (tl.load(m_ptr + offs, mask=inb, other=0) != 0) & inb
        x = tl.where(counted, tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
        tile_n = tl.sum(counted.to(tl.float32), axis=0)
        inv_n = 1.0 / tl.maximum(tile_n, 1.0)
        # Shifted pivot: deviations from the rounded first estimate are small and nearly exact, so their
        # sums correct the mean to the last bit and give M2 without the cancellation of sum(x^2) - n*mean^2.
        pivot = tl.sum(x, axis=0) * inv_n
        dev = tl.where(counted, x - pivot, 0.0)
        dev_sum = tl.sum(dev, axis=0)
        tile_mean = pivot + dev_sum * inv_n
        tile_m2 = tl.maximum(tl.sum(dev * dev, axis=0) - dev_sum * dev_sum * inv_n, 0.0)  # >= 0 in exact math
        # Chan et al.: merge (n, mean, M2) with (tile_n, tile_mean, tile_m2).
        total = n + tile_n
        frac = tile_n / tl.maximum(total, 1.0)
        delta = tile_mean - mean
        mean += delta * frac
        m2 += tile_m2 + delta * delta * n * frac
        n = total
    tl.store(part_n_ptr + pid, n)
    tl.store(part_mean_ptr + pid, mean)
    tl.store(part_m2_ptr + pid, m2)


@triton.jit(do_not_specialize=["num_parts"])
def _finalize_stats_kernel(
    part_n_ptr,
    part_mean_ptr,
    part_m2_ptr,
    num_parts,
    stats_ptr,
    eps,
    CORRECTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    inb = offs < num_parts
    n_i = tl.load(part_n_ptr + offs, mask=inb, other=0.0)
    mean_i = tl.load(part_mean_ptr + offs, mask=inb, other=0.0)
    m2_i = tl.load(part_m2_ptr + offs, mask=inb, other=0.0)
    n = tl.sum(n_i, axis=0)
    mean = tl.sum(mean_i * (n_i / tl.maximum(n, 1.0)), axis=0)
    dev = mean_i - mean
    m2 = tl.sum(m2_i + n_i * dev * dev, axis=0)
    # n <= correction: the centered sum is 0 (no or one element), so clamping the divisor gives var 0.
    var = m2 / tl.maximum(n - CORRECTION, 1.0)
    tl.store(stats_ptr, mean)
    tl.store(stats_ptr + 1, var)
    # var + eps == 0 (eps=0 and all counted values equal): every centered value is 0, so scale by 0
    # rather than inf, which would turn 0 * inf into NaN.
    denom = var + eps
    tl.store(stats_ptr + 2, tl.where(denom > 0, 1.0 / tl.sqrt(tl.where(denom > 0, denom, 1.0)), 0.0))


@triton.jit
def _normalize_block(
    x_ptr, m_ptr, out_ptr, offs, inb, mean, rstd, SHIFT_MEAN: tl.constexpr, MASKED: tl.constexpr
):
    # Unmasked full blocks load and store in 16-byte vectors whatever N is; only the last block is masked.
    if MASKED:
        counted = tl.load(m_ptr + offs, mask=inb, other=0) != 0
        x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    else:
        counted = tl.load(m_ptr + offs) != 0
        x = tl.load(x_ptr + offs).to(tl.float32)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y += mean
    y = tl.where(counted, y, 0.0)
    if MASKED:
        tl.store(out_ptr + offs, y, mask=inb)
    else:
        tl.store(out_ptr + offs, y)


@triton.jit(do_not_specialize=["N"])
def _normalize_kernel(x_ptr, m_ptr, out_ptr, stats_ptr, N, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inb = offs < N
    mean = tl.load(stats_ptr)
    rstd = tl.load(stats_ptr + 2)
    if start + BLOCK <= N:
        _normalize_block(x_ptr, m_ptr, out_ptr, offs, inb, mean, rstd, SHIFT_MEAN, False)
    else:
        _normalize_block(x_ptr, m_ptr, out_ptr, offs, inb, mean, rstd, SHIFT_MEAN, True)


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().view(-1)  # reshape alone may return a strided view (e.g. of an expanded mask)
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def stats_triton(x: torch.Tensor, mask: torch.Tensor, correction: int = 1, eps: float = 0.0) -> torch.Tensor:
    """fp32 ``[mean, var, rsqrt(var + eps)]`` over the counted elements, on x's device, no host sync."""
    return _stats_flat(_flat(x), _flat(mask), correction, eps)


def _stats_flat(xf: torch.Tensor, mf: torch.Tensor, correction: int, eps: float) -> torch.Tensor:
    N = xf.numel()
    programs = max(1, min(triton.cdiv(N, _BLOCK), _MAX_PROGRAMS))
    parts = torch.empty((3, programs), dtype=torch.float32, device=xf.device)
    stats = torch.empty(_STATS, dtype=torch.float32, device=xf.device)
    with device_guard(xf):
        _partial_stats_kernel[(programs,)](
            xf, mf, parts[0], parts[1], parts[2], N, BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
        _finalize_stats_kernel[(1,)](
            parts[0],
            parts[1],
            parts[2],
            programs,
            stats,
            eps,
            CORRECTION=correction,
            BLOCK=triton.next_power_of_2(programs),
            num_warps=4,
        )
    return stats


def whiten_triton(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Whitened fp32 copy of x (or written into ``out``, which may be x itself when x is contiguous fp32)."""
    xf, mf = _flat(x), _flat(mask)
    stats = _stats_flat(xf, mf, 1, eps)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device) if out is None else out
    N = xf.numel()
    if N:
        with device_guard(xf):
            _normalize_kernel[(triton.cdiv(N, _BLOCK),)](
                xf, mf, out.view(-1), stats, N, SHIFT_MEAN=shift_mean, BLOCK=_BLOCK, num_warps=_NUM_WARPS
            )
    return out


def _run_triton(x: torch.Tensor, mask: torch.Tensor) -> bool:
    # The kernels have no backward: a loss such as masked_mean(per_token_loss, mask) must stay
    # differentiable, so inputs that need a gradient take the PyTorch path on every backend.
    return use_triton(x, mask) and not (x.requires_grad and torch.is_grad_enabled())


# ---------------------------------------------------------------------------------------------- torch


def _stats_torch(
    x: torch.Tensor, mask: torch.Tensor, dim, correction: int, dtype: torch.dtype, keepdim: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    counted = mask != 0
    xs = torch.where(counted, x.to(dtype), 0.0)
    n = counted.sum(dim=dim, keepdim=True, dtype=dtype)
    mean = xs.sum(dim=dim, keepdim=True) / n.clamp(min=1)
    # Two passes (no large-mean cancellation); the first also refines the mean by its deviations' sum.
    mean = mean + torch.where(counted, xs - mean, 0.0).sum(dim=dim, keepdim=True) / n.clamp(min=1)
    centered = torch.where(counted, xs - mean, 0.0)
    var = centered.square().sum(dim=dim, keepdim=True) / (n - correction).clamp(min=1)
    if not keepdim:
        dims = tuple(range(x.dim())) if dim is None else dim
        mean, var = mean.squeeze(dims), var.squeeze(dims)
    return mean, var


# --------------------------------------------------------------------------------------------- public


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the elements where ``mask`` is nonzero; 0 where nothing is counted.

    Args:
        x: any shape, float32/bfloat16/float16.
        mask: bool or numeric, shape of ``x``.
        dim: reduce over these dims (PyTorch path on every backend) or, if None, over the whole tensor
            (a Triton reduction on the Triton backend).

    Returns:
        float32; 0-d when ``dim`` is None, else ``x``'s shape without ``dim``. Differentiable: when ``x``
        requires grad (and grad mode is on) the PyTorch path runs on every backend.
    """
    _check_args(x, mask)
    if dim is None and _run_triton(x, mask):
        return stats_triton(x, mask)[0]
    return _stats_torch(x, mask, dim, 1, torch.float32)[0]


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None, unbiased: bool = True
) -> torch.Tensor:
    """Variance of ``x`` over the elements where ``mask`` is nonzero (unbiased by default).

    0 where fewer than ``1 + unbiased`` elements are counted (rather than NaN). Shapes, dtypes and backends
    as in :func:`masked_mean`.
    """
    _check_args(x, mask)
    correction = int(bool(unbiased))
    if dim is None and _run_triton(x, mask):
        return stats_triton(x, mask, correction=correction)[1]
    return _stats_torch(x, mask, dim, correction, torch.float32)[1]


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalize ``x`` by the statistics of its counted elements: ``(x - mean) * rsqrt(var + eps)``.

    ``mean`` and the unbiased ``var`` are taken over all elements where ``mask`` is nonzero (the whole
    tensor, e.g. every response token of the batch). With ``shift_mean=False`` the mean is added back
    (rescale only). Masked positions come out 0. No counted element: all zeros; one counted element: var
    is 0, so it whitens to 0 (``x`` when ``shift_mean=False``).

    Args:
        x: any shape, float32/bfloat16/float16.
        mask: bool or numeric, shape of ``x``; nonzero marks counted elements.
        shift_mean: subtract the mean (True) or keep it.
        eps: >= 0, added to the variance; a Python float passed to the kernel as fp32.

    Returns:
        float32 tensor of ``x``'s shape. Differentiable: when ``x`` requires grad the PyTorch path runs
        (the Triton kernels serve detached data such as advantages).
    """
    _check_args(x, mask)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if _run_triton(x, mask):
        return whiten_triton(x, mask, shift_mean, float(eps))
    mean, var = _stats_torch(x, mask, None, 1, torch.float32, keepdim=True)
    denom = var + eps
    y = (x.float() - mean) * torch.where(denom > 0, torch.rsqrt(denom.clamp(min=_TINY)), 0.0)
    if not shift_mean:
        y = y + mean
    return torch.where(mask != 0, y, 0.0)


# ------------------------------------------------------------------------------------------ reference


def masked_mean_reference(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Readable spec of :func:`masked_mean` (float64 stays float64)."""
    _check_args(x, mask, reference=True)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return _stats_torch(x, mask, dim, 1, dtype)[0]


def masked_var_reference(
    x: torch.Tensor, mask: torch.Tensor, dim=None, unbiased: bool = True
) -> torch.Tensor:
    """Readable spec of :func:`masked_var` (float64 stays float64)."""
    _check_args(x, mask, reference=True)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return _stats_torch(x, mask, dim, int(bool(unbiased)), dtype)[1]


def masked_whiten_reference(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Readable spec of :func:`masked_whiten` (float64 stays float64)."""
    _check_args(x, mask, reference=True)
    dtype = torch.promote_types(x.dtype, torch.float32)
    counted = mask != 0
    values = x.to(dtype)[counted]
    n = values.numel()
    mean = values.mean() if n > 0 else torch.zeros((), dtype=dtype, device=x.device)
    var = values.var(unbiased=True) if n > 1 else torch.zeros((), dtype=dtype, device=x.device)
    rstd = torch.rsqrt(var + eps) if var + eps > 0 else torch.zeros_like(var)  # 0 * inf would be NaN
    y = (x.to(dtype) - mean) * rstd
    if not shift_mean:
        y = y + mean
    return torch.where(counted, y, torch.zeros((), dtype=dtype, device=x.device))
