"""Per-token KL estimates between the policy and the reference model, from sampled-token log-probs.

With ``d = logp - ref_logp`` (log-ratio of policy over reference at the sampled token):

* ``k1 = d``                      unbiased, high variance, can be negative;
* ``k2 = d**2 / 2``               biased, low variance, >= 0;
* ``k3 = exp(-d) - 1 + d``        unbiased, low variance, >= 0.

``k3`` cancels catastrophically near ``d = 0`` when written literally (and even as ``expm1(-d) + d``), so
for ``|d| < 0.5`` both the value and its derivative ``1 - exp(-d)`` use a Taylor polynomial whose
truncation error is below fp32 resolution there; outside that range the closed form has no cancellation.
"""

from __future__ import annotations

import torch

from ._backend import check_float, check_same_device, check_same_shape, device_guard, use_triton
from ._triton import tl, triton

ESTIMATORS = ("k1", "k2", "k3")

# Below this |d| the k3 closed forms lose digits to cancellation; above it the 8th-order Taylor
# truncation error would exceed fp32 resolution. 0.5 satisfies both with margin.
_K3_POLY_LIMIT = 0.5

_BLOCK = 1024
_NUM_WARPS = 4


def check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


# --------------------------------------------------------------------------------------------- Triton


@triton.jit
def kl_value(d, ESTIMATOR: tl.constexpr):
    """KL estimate from the fp32 log-ratio ``d``; shared with the fused PPO kernel."""
    if ESTIMATOR == "k1":
        k = d
    elif ESTIMATOR == "k2":
        k = 0.5 * d * d
    else:
        small = tl.abs(d) < 0.5  # _K3_POLY_LIMIT (a literal: jit code reads no module globals)
        # Zeroing d outside the polynomial's range keeps its powers finite for huge |d|.
        ds = tl.where(small, d, 0.0)
        # Horner form of 1/2! - d/3! + d^2/4! - ... - d^5/7! + d^6/8!
        poly = 0.0001984126984126984 - ds * 2.48015873015873e-05
        poly = 0.008333333333333333 - ds * (0.001388888888888889 - ds * poly)
        poly = 0.5 - ds * (0.16666666666666666 - ds * (0.041666666666666664 - ds * poly))
        k = tl.where(small, ds * ds * poly, tl.exp(-d) - 1.0 + d)
    return k


@triton.jit
def _kl_derivative(d, ESTIMATOR: tl.constexpr):
    if ESTIMATOR == "k1":
        g = tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == "k2":
        g = d
    else:
        small = tl.abs(d) < 0.5
        ds = tl.where(small, d, 0.0)
        # Horner form of 1 - d/2! + d^2/3! - ... + d^7/8!: the series of (1 - exp(-d)) / d
        poly = 0.0001984126984126984 - ds * 2.48015873015873e-05
        poly = 0.008333333333333333 - ds * (0.001388888888888889 - ds * poly)
        poly = 1.0 - ds * (0.5 - ds * (0.16666666666666666 - ds * (0.041666666666666664 - ds * poly)))
        g = tl.where(small, ds * poly, 1.0 - tl.exp(-d))
    return g


@triton.jit
def _load_f32(ptr, offs, inb, MASKED: tl.constexpr):
    # Only the last block is masked: the others then load in 16-byte vectors whatever n is.
    x = tl.load(ptr + offs, mask=inb, other=0.0) if MASKED else tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, offs, value, inb, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=inb)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))


@triton.jit
def _kl_fwd_block(logp_ptr, ref_ptr, out_ptr, offs, inb, ESTIMATOR: tl.constexpr, MASKED: tl.constexpr):
    d = _load_f32(logp_ptr, offs, inb, MASKED) - _load_f32(ref_ptr, offs, inb, MASKED)
    _store(out_ptr, offs, kl_value(d, ESTIMATOR), inb, MASKED)


# n only bounds the last block, so it is not specialized (its 16-divisibility would only cost compiles).
@triton.jit(do_not_specialize=["n"])
def _kl_fwd_kernel(logp_ptr, ref_ptr, out_ptr, n, ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    # int64 offsets: flattened [B, T] (or [B, T, k]) tensors can exceed 2**31 elements.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    if start + BLOCK <= n:
        _kl_fwd_block(logp_ptr, ref_ptr, out_ptr, offs, inb, ESTIMATOR, False)
    else:
        _kl_fwd_block(logp_ptr, ref_ptr, out_ptr, offs, inb, ESTIMATOR, True)


@triton.jit
def _kl_bwd_block(
    grad_ptr, logp_ptr, ref_ptr, dlogp_ptr, dref_ptr, offs, inb,
    ESTIMATOR: tl.constexpr, NEED_LOGP: tl.constexpr, NEED_REF: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    d = _load_f32(logp_ptr, offs, inb, MASKED) - _load_f32(ref_ptr, offs, inb, MASKED)
    g = _load_f32(grad_ptr, offs, inb, MASKED) * _kl_derivative(d, ESTIMATOR)
    # Each gradient comes back in its input's dtype.
    if NEED_LOGP:
        _store(dlogp_ptr, offs, g, inb, MASKED)
    if NEED_REF:
        _store(dref_ptr, offs, -g, inb, MASKED)


@triton.jit(do_not_specialize=["n"])
def _kl_bwd_kernel(
    grad_ptr,
    logp_ptr,
    ref_ptr,
    dlogp_ptr,
    dref_ptr,
    n,
    ESTIMATOR: tl.constexpr,
    NEED_LOGP: tl.constexpr,
    NEED_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    ptrs = (grad_ptr, logp_ptr, ref_ptr, dlogp_ptr, dref_ptr)
    if start + BLOCK <= n:
        _kl_bwd_block(*ptrs, offs, inb, ESTIMATOR, NEED_LOGP, NEED_REF, False)
    else:
        _kl_bwd_block(*ptrs, offs, inb, ESTIMATOR, NEED_LOGP, NEED_REF, True)


def _kl_fwd_triton(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    # contiguous() first: reshape alone may return a strided view (an expanded grad has stride 0).
    lp, rl = logp.contiguous().view(-1), ref_logp.contiguous().view(-1)
    out = torch.empty(lp.shape, dtype=torch.float32, device=lp.device)
    n = lp.numel()
    if n:
        with device_guard(lp):
            _kl_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
                lp, rl, out, n, ESTIMATOR=estimator, BLOCK=_BLOCK, num_warps=_NUM_WARPS
            )
    return out.view(logp.shape)


def _kl_bwd_triton(
    grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, need: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    lp, rl, gr = (t.contiguous().view(-1) for t in (logp, ref_logp, grad))
    dlogp = torch.empty_like(lp) if need[0] else None
    dref = torch.empty_like(rl) if need[1] else None
    n = lp.numel()
    if n:
        with device_guard(lp):
            _kl_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
                gr,
                lp,
                rl,
                dlogp if dlogp is not None else lp,  # dummy pointer, never written (NEED_* is False)
                dref if dref is not None else rl,
                n,
                ESTIMATOR=estimator,
                NEED_LOGP=need[0],
                NEED_REF=need[1],
                BLOCK=_BLOCK,
                num_warps=_NUM_WARPS,
            )
    return (
        dlogp.view(logp.shape) if dlogp is not None else None,
        dref.view(ref_logp.shape) if dref is not None else None,
    )


# ---------------------------------------------------------------------------------------------- torch


def _horner(d: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    """c0 - d*(c1 - d*(c2 - ...)): the alternating Taylor series of exp(-d)."""
    acc = torch.full_like(d, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = c - d * acc
    return acc


_K3_COEFFS = (1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040, 1 / 40320)
_K3_GRAD_COEFFS = (1.0, *_K3_COEFFS)


def kl_value_torch(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """The Triton kernel's formulas in PyTorch (fp32 in, fp32 out); shared with the fused PPO op."""
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    small = d.abs() < _K3_POLY_LIMIT
    ds = torch.where(small, d, torch.zeros_like(d))
    return torch.where(small, ds * ds * _horner(ds, _K3_COEFFS), torch.expm1(-d) + d)


def _kl_derivative_torch(d: torch.Tensor, estimator: str) -> torch.Tensor:
    if estimator == "k1":
        return torch.ones_like(d)
    if estimator == "k2":
        return d
    small = d.abs() < _K3_POLY_LIMIT
    ds = torch.where(small, d, torch.zeros_like(d))
    return torch.where(small, ds * _horner(ds, _K3_GRAD_COEFFS), -torch.expm1(-d))


# ------------------------------------------------------------------------------------------- autograd


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, triton_path: bool):
        ctx.save_for_backward(logp, ref_logp)
        ctx.estimator = estimator
        ctx.triton_path = triton_path
        if triton_path:
            return _kl_fwd_triton(logp, ref_logp, estimator)
        return kl_value_torch(logp.float() - ref_logp.float(), estimator)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logp, ref_logp = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if ctx.triton_path:
            dlogp, dref = _kl_bwd_triton(grad, logp, ref_logp, ctx.estimator, need)
        else:
            g = grad.float() * _kl_derivative_torch(logp.float() - ref_logp.float(), ctx.estimator)
            dlogp = g.to(logp.dtype) if need[0] else None
            dref = (-g).to(ref_logp.dtype) if need[1] else None
        return dlogp, dref, None, None


# --------------------------------------------------------------------------------------------- public


def _check_args(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> None:
    check_float("logp", logp)
    check_float("ref_logp", ref_logp)
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    check_same_device(logp=logp, ref_logp=ref_logp)
    check_estimator(estimator)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from the log-probs of the sampled tokens.

    With ``d = logp - ref_logp``: ``k1 = d``, ``k2 = d**2 / 2``, ``k3 = exp(-d) - 1 + d``. ``k3`` is
    evaluated without cancellation near ``d = 0`` (Taylor polynomial for ``|d| < 0.5``), so identical
    inputs give exactly 0 and ``k2``, ``k3`` are never negative.

    Args:
        logp: policy log-probs of the sampled tokens, any shape, float32/bfloat16/float16.
        ref_logp: reference-model log-probs, same shape and device as ``logp``; its float dtype may differ
            from ``logp``'s (both are read as float32).
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        float32 tensor of ``logp``'s shape. Differentiable with respect to ``logp`` and ``ref_logp`` (each
        gradient comes back in its input's dtype). No masking: zero out padding with the caller's mask.

    Raises:
        ValueError: unsupported dtype, shape or device mismatch, unknown estimator.
    """
    _check_args(logp, ref_logp, estimator)
    return _KLPenalty.apply(logp, ref_logp, estimator, use_triton(logp, ref_logp))


def kl_penalty_reference(
    logp: torch.Tensor, ref_logp: torch.Tensor, *, estimator: str = "k1"
) -> torch.Tensor:
    """Readable PyTorch spec of :func:`kl_penalty`; float64 inputs are computed (and returned) in float64."""
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    check_estimator(estimator)
    dtype = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    d = logp.to(dtype) - ref_logp.to(dtype)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return d.square() / 2
    return torch.expm1(-d) + d
