"""Per-token log-probabilities (and optionally entropies) of the chosen ids, straight from the logits.

One pass over each row of logits computes an online log-sum-exp over V-blocks in fp32; the entropy comes out
of the same pass. Everything is kept relative to the running row maximum of the *raw* logits and only then
scaled by 1/temperature, so logits around 1e4 lose no absolute precision to the scaling (x - max is exact for
nearby values). The backward recomputes the softmax from the saved per-row statistics and writes each gradient
element once, in the logits' dtype; no [N, V] float32 temporary exists on either backend.

Per row, with c = 1/temperature, z = c*x, p = softmax(z), t = the target id:
    logp = z_t - lse(z)                       d logp / dx_j = c * (delta_jt - p_j)
    entropy = lse(z) - sum_j p_j z_j          d entropy / dx_j = -c * p_j * (z_j - sum_k p_k z_k)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ._backend import check_float, check_same_device, check_temperature, device_guard, use_triton
from ._triton import tl, triton

# Largest V-block one program holds in registers. Tests lower it to cross several blocks at small V.
MAX_BLOCK_V = 4096
# Tiles in flight in the forward's pipelined loop: 3 x 4096 x 2 bytes is 24 KB of shared memory for bf16.
_FWD_STAGES = 3
# The torch path works on row chunks of about this many elements, so it never holds an [N, V] fp32 copy.
_TORCH_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class _Config:
    inv_temp: float
    with_entropy: bool
    triton: bool


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _lse_update(x, m, s, t, c, WITH_ENT: tl.constexpr):
    """Folds one tile of fp32 logits into the running (max, sum of exp, sum of exp * shifted z)."""
    neg_inf = float("-inf")
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # While every logit so far is -inf there is nothing to shift by; 0 keeps the arithmetic NaN-free.
    m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
    alpha = tl.exp((m - m_ref) * c)
    d = (x - m_ref) * c
    e = tl.exp(d)
    if WITH_ENT:
        # Re-centre the running sum of e*d on the new max: e' = e*alpha and d' = d + shift.
        shift = tl.where(m == neg_inf, 0.0, (m - m_ref) * c)
        t = alpha * (t + shift * s) + tl.sum(e * tl.where(x == neg_inf, 0.0, d), axis=0)
    s = alpha * s + tl.sum(e, axis=0)
    return m_new, s, t


@triton.jit
def _rotated_cols(j, head, V):
    """Column of logical index j in [0, V) when the columns are rotated left by head (0 if head >= V).

    The aligned tiles cover columns [head, head + k * BLOCK_V); the rotation hands the columns left over on
    both sides of them, [head + k * BLOCK_V, V) and [0, head), to the masked tail tiles.
    """
    rot = tl.where(head < V, head, 0)
    cols = j + rot
    return tl.where(cols >= V, cols - V, cols)


# Sizes and strides only index memory: a fresh compile whenever one changed its 16-divisibility (ragged
# chunks, varying T) would buy nothing, because the loads align themselves (see `head` below). V stays
# specialized; it bounds the loops.
@triton.jit(do_not_specialize=["T", "stride_b", "stride_t", "N", "x_shift"])
def _token_logprobs_fwd_kernel(
    x_ptr, ids_ptr, logp_ptr, ent_ptr, stats_ptr,
    T, stride_b, stride_t, N, V, x_shift, inv_temp,
    WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    # Element offset of the row from x_ptr, which the launcher points at a 16-byte boundary.
    row_off = x_shift + b * stride_b + (row - b * T) * stride_t
    x_row = x_ptr + row_off
    # The first 16-byte boundary of the row, written as a multiple of VEC so the compiler can prove it: the
    # full tiles from there load without a mask in 16-byte vectors, whatever V and the strides are.
    aligned = (row_off + VEC - 1) // VEC * VEC
    head = aligned - row_off
    n_full = tl.maximum(V - head, 0) // BLOCK_V * BLOCK_V
    # An explicit cast keeps the math fp32 even if a caller (torch.compile) hands the scalar over as fp64.
    c = tl.cast(inv_temp, tl.float32)
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    m = tl.full((), neg_inf, tl.float32)  # running max of the raw logits
    s = tl.zeros((), tl.float32)  # sum exp((x - m) * c)
    t = tl.zeros((), tl.float32)  # sum exp((x - m) * c) * (x - m) * c
    # Software-pipelined (cp.async ring on sm_80+): the next tiles load while this one is reduced.
    for start in tl.range(0, n_full, BLOCK_V, num_stages=NUM_STAGES):
        x = tl.load(x_ptr + aligned + start + offs).to(tl.float32)
        m, s, t = _lse_update(x, m, s, t, c, WITH_ENT)
    # At most two masked tiles: the columns left over after the aligned ones, and the head.
    for start in range(n_full, V, BLOCK_V):
        j = start + offs
        cols = _rotated_cols(j, head, V)
        x = tl.load(x_row + cols, mask=j < V, other=neg_inf).to(tl.float32)
        m, s, t = _lse_update(x, m, s, t, c, WITH_ENT)
    logs = tl.log(s)
    tid = tl.load(ids_ptr + row)
    valid = (tid >= 0) & (tid < V)
    x_t = tl.load(x_row + tl.where(valid, tid, 0), mask=valid, other=0.0).to(tl.float32)
    tl.store(logp_ptr + row, tl.where(valid, (x_t - m) * c - logs, float("nan")))
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + N + row, logs)
    if WITH_ENT:
        mu = t / s
        tl.store(stats_ptr + 2 * N + row, mu)
        tl.store(ent_ptr + row, logs - mu)


@triton.jit
def _logits_grad(x, cols, tid, g_lp, g_ent, m, logs, mu, c, HAS_ENT: tl.constexpr):
    neg_inf = float("-inf")
    d = (x - m) * c
    p = tl.exp(d - logs)
    coef = g_lp
    if HAS_ENT:
        # p == 0 at -inf logits; zeroing d - mu there avoids 0 * inf.
        coef += g_ent * tl.where(x == neg_inf, 0.0, d - mu)
    return (tl.where(cols == tid, g_lp, 0.0) - p * coef) * c


@triton.jit(
    do_not_specialize=["T", "stride_xb", "stride_xt", "stride_ob", "stride_ot", "N", "x_shift", "out_shift"]
)
def _token_logprobs_bwd_kernel(
    x_ptr, out_ptr, ids_ptr, stats_ptr, glp_ptr, gent_ptr,
    T, stride_xb, stride_xt, stride_ob, stride_ot, N, V, x_shift, out_shift, inv_temp,
    HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, OUT_ALIGNED: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK_V
    offs = tl.arange(0, BLOCK_V)
    b = row // T
    t_ = row - b * T
    x_off = x_shift + b * stride_xb + t_ * stride_xt
    out_off = out_shift + b * stride_ob + t_ * stride_ot
    aligned = (x_off + VEC - 1) // VEC * VEC  # as in the forward
    head = aligned - x_off
    c = tl.cast(inv_temp, tl.float32)
    m = tl.load(stats_ptr + row)
    logs = tl.load(stats_ptr + N + row)
    tid = tl.load(ids_ptr + row)
    # An out-of-range id makes logp a NaN constant: its gradient term is dropped, whatever flows back into it.
    g_lp = tl.where((tid >= 0) & (tid < V), tl.load(glp_ptr + row), 0.0)
    mu = 0.0
    g_ent = 0.0
    if HAS_ENT:
        mu = tl.load(stats_ptr + 2 * N + row)
        g_ent = tl.load(gent_ptr + row)
    if start + BLOCK_V + head <= V:
        # A full tile from the row's first 16-byte boundary: unmasked, vectorized.
        cols = start + head + offs
        x = tl.load(x_ptr + aligned + start + offs).to(tl.float32)
        grad = _logits_grad(x, cols, tid, g_lp, g_ent, m, logs, mu, c, HAS_ENT).to(out_ptr.dtype.element_ty)
        if OUT_ALIGNED:
            # The launcher checked that out's rows sit at x's offsets modulo VEC: this is out_off + head.
            tl.store(out_ptr + (out_off + VEC - 1) // VEC * VEC + start + offs, grad)
        else:
            tl.store(out_ptr + out_off + cols, grad)
    else:
        j = start + offs
        mask = j < V
        cols = _rotated_cols(j, head, V)
        x = tl.load(x_ptr + x_off + cols, mask=mask, other=float("-inf")).to(tl.float32)
        grad = _logits_grad(x, cols, tid, g_lp, g_ent, m, logs, mu, c, HAS_ENT).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_off + cols, grad, mask=mask)


def _launch_config(V: int) -> tuple[int, int]:
    # 4096-wide blocks with 8 warps are 16 fp32 values per thread per live array: no spills on sm_90
    # (about 50 registers) and enough loads in flight to keep HBM busy. Narrow vocabularies get fewer warps.
    block = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return block, min(8, max(1, block // 512))


def _aligned_base(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(a tensor starting at t's 16-byte boundary at or before t's data, t's offset from it, VEC).

    VEC is how many elements make 16 bytes. The kernels index from the returned base and align their loads
    themselves; a storage that does not itself start on a 16-byte boundary gets VEC = 1 (no alignment).
    """
    size = t.element_size()
    if t.untyped_storage().data_ptr() % 16 or 16 % size:
        return t, 0, 1
    vec = 16 // size
    shift = t.storage_offset() % vec
    return t.as_strided((1,), (1,), t.storage_offset() - shift), shift, vec


# ------------------------------------------------------------------------------------- torch implementation


def _torch_fwd_rows(x: torch.Tensor, ids: torch.Tensor, c: float, with_ent: bool) -> tuple[torch.Tensor, ...]:
    """The kernel's math on a [n, V] row chunk: returns logp, entropy (or None), m, logs, mu (or None)."""
    x = x.float()
    m = x.amax(dim=-1)
    m_ref = m.masked_fill(m == -math.inf, 0.0)
    d = (x - m_ref[:, None]) * c
    e = d.exp()
    s = e.sum(-1)
    logs = s.log()
    V = x.shape[-1]
    valid = (ids >= 0) & (ids < V)
    x_t = x.gather(-1, ids.clamp(0, V - 1)[:, None]).squeeze(-1)
    logp = torch.where(valid, (x_t - m) * c - logs, math.nan)
    if not with_ent:
        return logp, None, m, logs, None
    mu = (e * d.masked_fill_(x == -math.inf, 0.0)).sum(-1) / s
    return logp, logs - mu, m, logs, mu


def _torch_bwd_rows(
    x: torch.Tensor,
    ids: torch.Tensor,
    stats: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor | None,
    c: float,
) -> torch.Tensor:
    x = x.float()
    V = x.shape[-1]
    valid = (ids >= 0) & (ids < V)
    g_lp = torch.where(valid, g_lp, 0.0)
    d = (x - stats[0][:, None]) * c
    coef = g_lp[:, None]
    if g_ent is not None:
        coef = coef + g_ent[:, None] * (d - stats[2][:, None]).masked_fill_(x == -math.inf, 0.0)
    grad = (d - stats[1][:, None]).exp_().mul_(-coef)
    grad.scatter_add_(-1, ids.clamp(0, V - 1)[:, None], g_lp[:, None])
    return grad.mul_(c)


def _row_chunks(B: int, T: int, V: int):
    """(b, t0, t1, r0) pieces of the [B, T] rows, each about _TORCH_CHUNK_ELEMS elements of logits."""
    rows = max(1, _TORCH_CHUNK_ELEMS // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            yield b, t0, t1, b * T + t0


# ----------------------------------------------------------------------------------------- shared machinery


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> a [B, T, V] view with unit last stride; a copy only if the leading dims need 3+ strides."""
    V = x.shape[-1]
    if x.stride(-1) != 1 and V != 1:
        x = x.contiguous()
    merged: list[list[int]] = []  # [size, stride] of the leading dims after merging collapsible neighbours
    for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        x = x.contiguous()
        merged = [[x.numel() // V, V]]
    merged = [[1, 0]] * (2 - len(merged)) + merged
    (B, sb), (T, st) = merged
    return x.as_strided((B, T, V), (sb, st, 1))


def _forward(
    x3: torch.Tensor, ids: torch.Tensor, inv_temp: float, with_ent: bool, use_tt: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """logp [N], entropy [N] or None, and the per-row statistics [2 or 3, N] (m, log-sum, mean shifted z)."""
    B, T, V = x3.shape
    N = B * T
    dev = x3.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if with_ent else None
    stats = torch.empty(3 if with_ent else 2, N, dtype=torch.float32, device=dev)
    if N == 0:
        return logp, ent, stats
    if use_tt:
        block, warps = _launch_config(V)
        x_base, x_shift, vec = _aligned_base(x3)
        with device_guard(x3):
            _token_logprobs_fwd_kernel[(N,)](
                x_base, ids, logp, ent if with_ent else logp, stats,
                T, x3.stride(0), x3.stride(1), N, V, x_shift, inv_temp,
                WITH_ENT=with_ent, BLOCK_V=block, VEC=vec, NUM_STAGES=_FWD_STAGES, num_warps=warps,
            )  # fmt: skip
        return logp, ent, stats
    for b, t0, t1, r0 in _row_chunks(B, T, V):
        r1 = r0 + t1 - t0
        lp, en, m, logs, mu = _torch_fwd_rows(x3[b, t0:t1], ids[r0:r1], inv_temp, with_ent)
        logp[r0:r1], stats[0, r0:r1], stats[1, r0:r1] = lp, m, logs
        if with_ent:
            ent[r0:r1], stats[2, r0:r1] = en, mu
    return logp, ent, stats


def _backward(
    x3: torch.Tensor,
    ids: torch.Tensor,
    stats: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor | None,
    inv_temp: float,
    out3: torch.Tensor,
    use_tt: bool,
) -> None:
    """Writes d(loss)/d(logits) into out3 ([B, T, V], any float dtype, unit last stride; may alias x3)."""
    B, T, V = x3.shape
    N = B * T
    if N == 0:
        return
    if use_tt:
        block, warps = _launch_config(V)
        x_base, x_shift, vec = _aligned_base(x3)
        out_base, out_shift, out_vec = _aligned_base(out3)
        # Full tiles store in 16-byte vectors only if every row of out sits where x's does, modulo VEC.
        out_aligned = out_vec == vec > 1 and (out_shift - x_shift) % vec == 0
        out_aligned &= B == 1 or (out3.stride(0) - x3.stride(0)) % vec == 0
        out_aligned &= T == 1 or (out3.stride(1) - x3.stride(1)) % vec == 0
        with device_guard(x3):
            _token_logprobs_bwd_kernel[(N, triton.cdiv(V, block))](
                x_base, out_base, ids, stats, g_lp, g_lp if g_ent is None else g_ent,
                T, x3.stride(0), x3.stride(1), out3.stride(0), out3.stride(1), N, V, x_shift, out_shift,
                inv_temp,
                HAS_ENT=g_ent is not None, BLOCK_V=block, VEC=vec, OUT_ALIGNED=out_aligned, num_warps=warps,
            )  # fmt: skip
        return
    for b, t0, t1, r0 in _row_chunks(B, T, V):
        r1 = r0 + t1 - t0
        ge = None if g_ent is None else g_ent[r0:r1]
        grad = _torch_bwd_rows(x3[b, t0:t1], ids[r0:r1], stats[:, r0:r1], g_lp[r0:r1], ge, inv_temp)
        out3[b, t0:t1].copy_(grad)


def _non_overlapping(t: torch.Tensor) -> bool:
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1)
    return all(st >= prev_st * prev_n for (prev_st, prev_n), (st, _) in itertools.pairwise(dims))


def _grad_buffer(
    x3: torch.Tensor, shape: torch.Size, view_strides: tuple[int, ...] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialized gradient for the logits: (its [B, T, V] view for the kernels, its logits-shaped view).

    Laid out like x3 (same strides and offset modulo 16 bytes) when x3 views the logits in place with
    little slack, e.g. ``logits[:, :-1]``: then the Triton backward's stores align exactly like its loads
    even when V is not a multiple of 16. Otherwise contiguous.
    """
    if view_strides is not None and x3.numel() and _non_overlapping(x3):
        _, shift, vec = _aligned_base(x3)
        span = 1 + sum((n - 1) * st for n, st in zip(x3.shape, x3.stride(), strict=True))
        if vec > 1 and (shift or not x3.is_contiguous()) and span <= x3.numel() + x3.numel() // 16:
            buf = torch.empty(shift + span, dtype=x3.dtype, device=x3.device)
            return buf.as_strided(x3.shape, x3.stride(), shift), buf.as_strided(shape, view_strides, shift)
    out = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
    return out, out.view(shape)


def _flat_grad(g: torch.Tensor | None, n: int) -> torch.Tensor | None:
    # Incoming grads may be expanded (stride 0) views; kernels index them densely.
    return None if g is None else g.reshape(n).to(torch.float32).contiguous()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, cfg: _Config):
        x3 = _rows_view(logits)
        ids1 = ids.reshape(-1).to(torch.int64).contiguous()
        logp, ent, stats = _forward(x3, ids1, cfg.inv_temp, cfg.with_entropy, cfg.triton)
        ctx.save_for_backward(x3, ids1, stats)
        ctx.cfg, ctx.shape = cfg, logits.shape
        # x3 reads the logits in place: their strides say how to view a gradient laid out like x3.
        ctx.view_strides = logits.stride() if x3.data_ptr() == logits.data_ptr() else None
        ctx.set_materialize_grads(False)
        if cfg.with_entropy:
            return logp.view(ids.shape), ent.view(ids.shape)
        return logp.view(ids.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None = None):
        if g_lp is None and g_ent is None:
            return None, None, None
        x3, ids, stats = ctx.saved_tensors
        N = ids.numel()
        g_lp = _flat_grad(g_lp, N)
        if g_lp is None:
            g_lp = torch.zeros(N, dtype=torch.float32, device=stats.device)
        cfg = ctx.cfg
        out3, grad = _grad_buffer(x3, ctx.shape, ctx.view_strides if cfg.triton else None)
        _backward(x3, ids, stats, g_lp, _flat_grad(g_ent, N), cfg.inv_temp, out3, cfg.triton)
        return grad, None, None


# ---------------------------------------------------------------------------------------------- public API


def check_ids(ids: torch.Tensor, lead_shape: torch.Size, ref_name: str) -> None:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor (int64), got {ids.dtype}")
    if ids.shape != lead_shape:
        raise ValueError(
            f"ids has shape {tuple(ids.shape)} but must match the leading dims {tuple(lead_shape)} "
            f"of {ref_name}"
        )


def token_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``ids`` under ``softmax(logits / temperature)``, and optionally the entropy.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16. The last dim must be contiguous to avoid a copy;
            up to two non-mergeable leading strides (e.g. ``logits[:, :-1]``) are read in place.
        ids: integer tensor with the leading shape of ``logits`` (``logits.shape[:-1]``).
        temperature: > 0; logits are divided by it before the softmax. It reaches the Triton kernel as the
            fp32 scalar ``1/temperature`` (Triton types Python floats as fp32, and the kernel casts it again).
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` per position.

    Returns:
        ``logp`` (float32, shape of ``ids``), or ``(logp, entropy)`` when ``return_entropy``. Both are
        differentiable w.r.t. ``logits``; gradients come back in the logits' dtype.

    Memory: the forward reads the logits once (online log-sum-exp, fp32 accumulation) and keeps 2-3 floats
    per row for the backward, which recomputes the softmax and writes the gradient once. No [N, V] fp32
    temporary is made on either backend (the torch path works on row chunks).

    Out-of-range ids (outside ``[0, V)``, e.g. -100 padding): the kernels never read or write out of bounds;
    ``logp`` is NaN for those positions (loud if left unmasked; use ``torch.where``, not ``* mask``, to drop
    them) and that ``logp`` contributes zero gradient. Their entropy is computed normally. Rows whose logits
    are all ``-inf`` give NaN.
    """
    check_float("logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    check_ids(ids, logits.shape[:-1], "logits")
    check_same_device(logits=logits, ids=ids)
    temperature = check_temperature(temperature)
    cfg = _Config(1.0 / temperature, bool(return_entropy), use_triton(logits, ids))
    return _TokenLogprobs.apply(logits, ids, cfg)


def token_logprobs_reference(
    logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Executable spec: full log_softmax + gather in float32 (float64 for float64 input); same id rules."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp_all = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    V = logits.shape[-1]
    valid = (ids >= 0) & (ids < V)
    logp = logp_all.gather(-1, ids.long().clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, math.nan)
    if not return_entropy:
        return logp
    # -sum p log p, with 0 log 0 = 0 written so that autograd sees no 0 * inf either.
    entropy = -(logp_all.exp() * logp_all.masked_fill(logp_all == -math.inf, 0.0)).sum(-1)
    return logp, entropy
