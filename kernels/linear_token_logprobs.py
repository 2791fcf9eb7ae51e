"""Per-token log-probabilities (and entropies) straight from the last hidden states and the output layer.

Per token n, with raw logits r = h_n W^T (+ b), the logits the model samples from are

    z = post * r'            r' = pre * r                 (a logit scale: pre = scale, post = 1/T)
    z = post * tanh(r')      r' = pre * r                 (soft-capping: pre = scale/cap, post = cap/T)

so ``cap * tanh(scale * r / cap) / T`` in general, and then logp = z_t - lse(z), entropy = lse(z) - E_p[z].
With g_z = dL/dz = g_lp * (onehot_t - p) - g_ent * p * (z - E_p[z]), the chain rule gives
dL/dr = g_z * pre * post (* (1 - tanh^2) when capped), dhidden = (dL/dr) W, dweight = (dL/dr)^T h.

**Triton path (CUDA, or the interpreter): the logits never reach global memory.**
* Forward: a program owns BLOCK_N tokens and one slice of the vocabulary. It walks its vocabulary tiles,
  computes each [BLOCK_N, BLOCK_V] logits tile with ``tl.dot`` (fp32 accumulation over H), and keeps an
  online log-sum-exp, the target logit and the entropy moment in registers. Splitting the vocabulary over
  programs fills the GPU at any N; a second, tiny kernel merges the per-slice partials ([splits, N] floats).
* Backward: one program per (token block, vocabulary tile) recomputes the logits tile, forms dL/dr in
  registers and feeds it (in the operands' dtype) to two tensor-core products whose [BLOCK_N, BLOCK_K] and
  [BLOCK_V, BLOCK_K] results are added with fp32 atomics into dhidden and dweight accumulators. Atomics,
  not split-K partials: partials would need a [splits, V, H] buffer, atomics need none. Their only cost is
  the order of fp32 additions, so results differ between runs by a few fp32 ulps (~1e-7 relative) and
  almost never after rounding to bf16. With ``torch.use_deterministic_algorithms(True)`` the op takes the
  chunked PyTorch path instead, which is bit-reproducible.
* Backward skips: a token block whose upstream gradients are all 0 (padding, masked positions) returns
  before any GEMM, which is exact. ``grad_filter_eps`` optionally skips the two gradient products of a tile
  whose probabilities are all negligible, which is not (see ``linear_token_logprobs``).
* Extra memory, beyond inputs and outputs: O(N) statistics, an fp32 dhidden accumulator (N x H, only for
  bf16/fp16 hidden states), an fp32 [V] bias accumulator, and an fp32 dweight accumulator for one vocabulary
  slice at a time (at most ``_DW_SLICE_BYTES``; the backward is launched once per slice). No [N, V] or
  [chunk, V] buffer exists.

**PyTorch path (CPU, or ``FASTRLHF_KERNELS=torch``): token chunks.** Each chunk's logits are computed in
fp32 and handed to the ``token_logprobs`` machinery; the backward recomputes them. Peak extra memory is one
chunk's fp32 logits, O(chunk_size x V).

Why fp32 logits matter on both paths: a bf16 GEMM *output* rounds every logit to 8 bits of mantissa (an
absolute error of |logit| * 2^-9), which after the softmax is a 4-23% gradient error.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ._backend import check_float, check_same_device, check_temperature, triton_interpreting, use_triton
from ._triton import tl, triton
from .token_logprobs import _backward, _forward, _rows_view, check_ids, token_logprobs_reference

# The default torch-path chunk keeps one chunk's fp32 logits at or under this many bytes.
_CHUNK_LOGITS_BYTES = 256 * 1024**2
# The Triton backward's fp32 dweight accumulator covers this many bytes of vocabulary rows at a time.
_DW_SLICE_BYTES = 32 * 1024**2


@dataclass(frozen=True)
class _Config:
    """What one call computes. ``pre`` and ``post`` fold the logit scale, soft-cap and temperature."""

    pre: float
    post: float
    softcap: bool
    with_entropy: bool
    chunk: int
    triton: bool
    grad_filter_eps: float | None = None


@dataclass(frozen=True)
class _Tiles:
    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int


def _tiles(dtype: torch.dtype, backward: bool, capability: tuple[int, int]) -> _Tiles:
    """Tile shapes, checked spill-free offline for sm_86-sm_90 (``benchmarks/compile_kernels.py``). The
    forward's 128 x 128 logits tile fits 8 warps without spills on sm_90 (wgmma keeps its accumulator lean:
    171-175 registers, 181-188 with entropy) but spills on sm_8x, which take 128 x 64. The backward also holds
    dL/dr and two product tiles, so it takes 128 x 64 everywhere. fp32 operands halve BLOCK_K to fit the same
    shared memory and take smaller tiles: without TF32 their products run on the FMA units, whose per-thread
    fragments spilled at the 16-bit tiles (forward 128 x 128 on sm_90, backward 128 x 64 everywhere). The
    forward's 128 x 64 needs 120-202 registers, TF32 or not. The backward's 64 x 64 takes BLOCK_K 16: at 32,
    ptxas held sm_90's IEEE variants to 128 registers and spilled 32-40 bytes; at 16 they need 74-116. Tests
    lower the tiles to cross many of them at small V."""
    if dtype == torch.float32:
        if backward:
            return _Tiles(64, 64, 16, num_warps=8, num_stages=2)
        return _Tiles(128, 64, 32, num_warps=8, num_stages=3)
    if backward:
        return _Tiles(128, 64, 64, num_warps=8, num_stages=2)
    return _Tiles(128, 128 if capability >= (9, 0) else 64, 64, num_warps=8, num_stages=3)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _vocab_split(n_row_blocks: int, n_vocab_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split) for the forward: about two programs per SM, and no empty split."""
    want = max(1, min(n_vocab_tiles, -(-2 * _multiprocessors(device) // n_row_blocks)))
    per_split = -(-n_vocab_tiles // want)
    return -(-n_vocab_tiles // per_split), per_split


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands follow torch's TF32 switch, like torch.matmul does.
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _needs_int64(*tensors: torch.Tensor, n_cols: int = 0) -> bool:
    """Whether some element offset (or N * n_cols, for the dhidden accumulator) reaches 2^31."""
    spans = [sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1 for t in tensors]
    rows = tensors[0].shape[0] * tensors[0].shape[1]
    return max(*spans, rows * n_cols) >= 2**31


def _upcast_dots(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreting()


def _device_guard(t: torch.Tensor):
    # Triton launches on the current device, not on the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(x):
    # Through exp(-2|x|) in (0, 1]: no overflow at any |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter (3.9) multiplies bf16 blocks wrongly; exact fp32 products give the same result
    # as the tensor cores' bf16 x bf16 -> fp32 up to summation order.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, h_off, rows_ok, cols, cols_ok, H, stride_w, pre, post,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """z for one [BLOCK_N, BLOCK_V] tile in fp32; -inf in the columns outside the vocabulary."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + h_off[:, None] + ks[None, :]
    w_ptrs = w_ptr + cols[:, None] * stride_w + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(h_ptrs + k, mask=rows_ok[:, None], other=0.0)
            b = tl.load(w_ptrs + k, mask=cols_ok[:, None], other=0.0)
        else:
            k_ok = (k + ks) < H
            a = tl.load(h_ptrs + k, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs + k, mask=cols_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
    r = acc * pre
    if HAS_SOFTCAP:
        r = _tanh(r)
    return tl.where(cols_ok[None, :], r * post, float("-inf"))


@triton.jit
def _index(x, IDX64: tl.constexpr):
    # Index math stays 32-bit (half the registers of 64-bit pointer offsets) unless a tensor is too large.
    if IDX64:
        return x.to(tl.int64)
    return x


@triton.jit
def _target_ids(ids_ptr, rows, rows_ok, V):
    """The rows' target ids in the index width, -1 where out of range (those logp are NaN)."""
    tid = tl.load(ids_ptr + rows, mask=rows_ok, other=-1)
    return tl.where((tid >= 0) & (tid < V), tid, -1).to(rows.dtype)


@triton.jit
def _row_offsets(rows, T, stride_b, stride_t):
    b = rows // T
    return b * stride_b + (rows - b * T) * stride_t


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, part_ptr,
    N, V, H, T, stride_b, stride_t, stride_w, pre, post, tiles_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    """Partial statistics of one token block over one vocabulary slice: max m, sum exp(z - m),
    sum exp(z - m) * (z - m), and the target logit (0 unless the target falls in the slice)."""
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = _index(tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), IDX64)
    rows_ok = rows < N
    h_off = _row_offsets(rows, T, stride_b, stride_t)
    ids = _target_ids(ids_ptr, rows, rows_ok, V)
    neg_inf = float("-inf")
    m = tl.full((BLOCK_N,), neg_inf, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    target = tl.zeros((BLOCK_N,), tl.float32)
    v_start = _index(split * tiles_per_split * BLOCK_V, IDX64)
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V - v_start, BLOCK_V))
    for i in range(0, n_tiles):
        cols = v_start + i * BLOCK_V + tl.arange(0, BLOCK_V)
        cols_ok = cols < V
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, h_off, rows_ok, cols, cols_ok, H, stride_w, pre, post,
            HAS_BIAS, HAS_SOFTCAP, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While every logit so far is -inf there is nothing to shift by; 0 keeps the arithmetic NaN-free.
        m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        target += tl.sum(tl.where(cols[None, :] == ids[:, None], z, 0.0), axis=1)
        # z - m replaces z: one live tile, not three (sm_90's entropy variants needed 251-255 registers, now
        # 181-188). -inf becomes -FLT_MAX, so e = 0 and e * d = 0 rather than NaN; a NaN logit stays NaN.
        d = tl.maximum(z - m_ref[:, None], -3.4028234663852886e38, propagate_nan=tl.PropagateNan.ALL)
        e = tl.exp(d)
        if WITH_ENT:
            # Re-centre the running sum of e * (z - m) on the new max.
            shift = tl.where(m == neg_inf, 0.0, m - m_ref)
            u = alpha * (u + shift * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    part = part_ptr + split.to(tl.int64) * N + rows
    stride_q = num_splits * N
    tl.store(part, m, mask=rows_ok)
    tl.store(part + stride_q, s, mask=rows_ok)
    tl.store(part + 2 * stride_q, target, mask=rows_ok)
    if WITH_ENT:
        tl.store(part + 3 * stride_q, u, mask=rows_ok)


@triton.jit
def _combine_kernel(
    part_ptr, ids_ptr, logp_ptr, ent_ptr, stats_ptr, N, V, num_splits,
    WITH_ENT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Merges the slices: logp = z_t - lse, entropy = lse - E[z]; saves lse and E[z] for the backward."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    neg_inf = float("-inf")
    stride_q = num_splits * N
    m = tl.full((BLOCK,), neg_inf, tl.float32)
    for j in range(0, num_splits):
        m = tl.maximum(m, tl.load(part_ptr + j * N + rows, mask=ok, other=neg_inf))
    m_ref = tl.where(m == neg_inf, 0.0, m)
    s = tl.zeros((BLOCK,), tl.float32)
    u = tl.zeros((BLOCK,), tl.float32)
    target = tl.zeros((BLOCK,), tl.float32)
    for j in range(0, num_splits):
        m_j = tl.load(part_ptr + j * N + rows, mask=ok, other=neg_inf)
        s_j = tl.load(part_ptr + stride_q + j * N + rows, mask=ok, other=0.0)
        alpha = tl.exp(m_j - m_ref)
        s += alpha * s_j
        target += tl.load(part_ptr + 2 * stride_q + j * N + rows, mask=ok, other=0.0)
        if WITH_ENT:
            u_j = tl.load(part_ptr + 3 * stride_q + j * N + rows, mask=ok, other=0.0)
            u += alpha * (u_j + tl.where(m_j == neg_inf, 0.0, m_j - m_ref) * s_j)
    logs = tl.log(tl.where(ok, s, 1.0))  # rows past N are never stored; keep them finite
    tid = tl.load(ids_ptr + rows, mask=ok, other=0)
    valid = (tid >= 0) & (tid < V)
    # (z_t - m) first: exact for nearby values, so large logits lose nothing to the subtraction of lse.
    tl.store(logp_ptr + rows, tl.where(valid, (target - m_ref) - logs, float("nan")), mask=ok)
    tl.store(stats_ptr + rows, m_ref + logs, mask=ok)
    if WITH_ENT:
        mean_shifted = u / tl.where(ok, s, 1.0)
        tl.store(ent_ptr + rows, logs - mean_shifted, mask=ok)
        tl.store(stats_ptr + N + rows, m_ref + mean_shifted, mask=ok)


@triton.jit
def _bwd_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, stats_ptr, glp_ptr, gent_ptr, dh_ptr, dw_ptr, db_ptr,
    N, V, H, T, stride_b, stride_t, stride_w, stride_dh, stride_dw, v_start, v_end, pre, post, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, EVEN_K: tl.constexpr,
    FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    """dL/dr for one (token block, vocabulary tile), added into dhidden, dweight rows [v_start, v_end)
    (dw_ptr points at row v_start) and dbias.

    Tiles that add nothing do no GEMM: a token block whose upstream gradients are all 0 (padding, masked
    positions) returns before its logits are recomputed. This is exact. With FILTER, a tile in which every
    probability is below ``filter_eps`` and no row's target falls also skips its two gradient products.
    This is an approximation, see ``linear_token_logprobs``."""
    # GROUP_N token blocks sweep each vocabulary tile together, so a weight tile is reused from L2.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    n_col_blocks = tl.cdiv(v_end - v_start, BLOCK_V)
    width = GROUP_N * n_col_blocks
    first = (pid // width) * GROUP_N
    group_size = tl.minimum(n_row_blocks - first, GROUP_N)
    pid_n = first + (pid % width) % group_size
    pid_v = (pid % width) // group_size
    rows = _index(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), IDX64)
    rows_ok = rows < N
    tid = _target_ids(ids_ptr, rows, rows_ok, V)
    # An out-of-range id makes logp a NaN constant: its gradient term is dropped.
    g_lp = tl.where(tid >= 0, tl.load(glp_ptr + rows, mask=rows_ok, other=0.0), 0.0)
    # "!= 0" counts NaN gradients too, so they still reach dhidden and dweight.
    n_active = tl.sum((g_lp != 0.0).to(tl.int32))
    if HAS_ENT_GRAD:
        g_ent = tl.load(gent_ptr + rows, mask=rows_ok, other=0.0)
        n_active += tl.sum((g_ent != 0.0).to(tl.int32))
    if n_active == 0:
        return
    col0 = _index(v_start + pid_v * BLOCK_V, IDX64)
    cols = col0 + tl.arange(0, BLOCK_V)
    cols_ok = cols < v_end
    h_off = _row_offsets(rows, T, stride_b, stride_t)
    z = _logits_tile(
        h_ptr, w_ptr, b_ptr, h_off, rows_ok, cols, cols_ok, H, stride_w, pre, post,
        HAS_BIAS, HAS_SOFTCAP, EVEN_K, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST,
    )  # fmt: skip
    lse = tl.load(stats_ptr + rows, mask=rows_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    if FILTER:
        # "not (p < eps)" keeps NaN probabilities; a row with a target here keeps its one-hot term.
        tile_ok = rows_ok[:, None] & cols_ok[None, :]
        n_kept = tl.sum(tl.sum((tile_ok & ~(p < filter_eps)).to(tl.int32), axis=1), axis=0)
        targets_here = (tid >= col0) & (tid < col0 + BLOCK_V) & (g_lp != 0.0)
        n_kept += tl.sum(targets_here.to(tl.int32))
        if n_kept == 0:
            return
    if HAS_ENT_GRAD:
        mu = tl.load(stats_ptr + N + rows, mask=rows_ok, other=0.0)
        coef = g_lp[:, None] + g_ent[:, None] * tl.where(z == float("-inf"), 0.0, z - mu[:, None])
    else:
        coef = g_lp[:, None]
    g = tl.where(cols[None, :] == tid[:, None], g_lp[:, None], 0.0) - p * coef
    if HAS_SOFTCAP:
        t = z / post  # tanh(r'), recovered from z
        g = g * (pre * post) * (1.0 - t * t)
    else:
        g = g * (pre * post)
    g = tl.where(rows_ok[:, None] & cols_ok[None, :], g, 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cols_ok)
    # The products run on tensor cores in the operands' dtype: a relative, per-element rounding of dL/dr.
    g_op = g.to(w_ptr.dtype.element_ty)
    ks = tl.arange(0, BLOCK_K)
    for k in range(0, H, BLOCK_K):
        k_ok = (k + ks) < H
        if NEED_DH:
            w = tl.load(w_ptr + cols[:, None] * stride_w + (k + ks)[None, :],
                        mask=cols_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            dh = _dot(g_op, w, None, PRECISION, UPCAST)
            tl.atomic_add(dh_ptr + rows[:, None] * stride_dh + (k + ks)[None, :], dh,
                          mask=rows_ok[:, None] & k_ok[None, :])  # fmt: skip
        if NEED_DW:
            h = tl.load(h_ptr + h_off[:, None] + (k + ks)[None, :],
                        mask=rows_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            dw = _dot(tl.trans(g_op), h, None, PRECISION, UPCAST)
            tl.atomic_add(dw_ptr + (cols - v_start)[:, None] * stride_dw + (k + ks)[None, :], dw,
                          mask=cols_ok[:, None] & k_ok[None, :])  # fmt: skip


# ------------------------------------------------------------------------------------------ Triton launchers


def _triton_forward(h3, weight, bias, ids, cfg: _Config):
    """logp [N], entropy [N] or None, stats [1 or 2, N] (lse, E[z])."""
    (_, T, H), V, N = h3.shape, weight.shape[0], ids.numel()
    dev = h3.device
    tiles = _tiles(weight.dtype, backward=False, capability=_capability(dev))
    n_row_blocks = triton.cdiv(N, tiles.block_n)
    splits, per_split = _vocab_split(n_row_blocks, triton.cdiv(V, tiles.block_v), dev)
    part = torch.empty(4 if cfg.with_entropy else 3, splits, N, dtype=torch.float32, device=dev)
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if cfg.with_entropy else None
    stats = torch.empty(2 if cfg.with_entropy else 1, N, dtype=torch.float32, device=dev)
    _fwd_kernel[(n_row_blocks, splits)](
        h3, weight, weight if bias is None else bias, ids, part,
        N, V, H, T, h3.stride(0), h3.stride(1), weight.stride(0), cfg.pre, cfg.post, per_split,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=cfg.softcap, WITH_ENT=cfg.with_entropy,
        EVEN_K=H % tiles.block_k == 0, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
        BLOCK_K=tiles.block_k, PRECISION=_dot_precision(weight.dtype), UPCAST=_upcast_dots(weight.dtype),
        IDX64=_needs_int64(h3, weight),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    block = 1024
    _combine_kernel[(triton.cdiv(N, block),)](
        part, ids, logp, logp if ent is None else ent, stats, N, V, splits,
        WITH_ENT=cfg.with_entropy, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return logp, ent, stats


def _triton_backward(h3, weight, bias, ids, stats, g_lp, g_ent, needs, cfg: _Config):
    """Gradients for hidden [N, H], weight and bias (None where not needed), in their own dtypes."""
    need_h, need_w, need_b = needs
    (_, T, H), V, N = h3.shape, weight.shape[0], ids.numel()
    dev = h3.device
    tiles = _tiles(weight.dtype, backward=True, capability=_capability(dev))
    fp32 = weight.dtype == torch.float32
    # fp32 operands accumulate straight into their gradients; bf16/fp16 ones into fp32 buffers.
    dh = torch.zeros(N, H, dtype=torch.float32, device=dev) if need_h else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    dw = torch.empty_like(weight) if need_w else None
    rows_per_slice = max(tiles.block_v, _DW_SLICE_BYTES // (4 * H) // tiles.block_v * tiles.block_v)
    dw_acc = None
    if need_w and not fp32:
        dw_acc = torch.empty(min(V, rows_per_slice), H, dtype=torch.float32, device=dev)
    dummy = stats
    for v_start in range(0, V, rows_per_slice):
        v_end = min(V, v_start + rows_per_slice)
        if need_w:
            acc = dw[v_start:v_end] if fp32 else dw_acc[: v_end - v_start]
            acc.zero_()
        grid = (triton.cdiv(N, tiles.block_n) * triton.cdiv(v_end - v_start, tiles.block_v),)
        _bwd_kernel[grid](
            h3, weight, weight if bias is None else bias, ids, stats, g_lp,
            dummy if g_ent is None else g_ent, dummy if dh is None else dh,
            acc if need_w else dummy, dummy if db is None else db,
            N, V, H, T, h3.stride(0), h3.stride(1), weight.stride(0), H, H, v_start, v_end,
            cfg.pre, cfg.post, cfg.grad_filter_eps or 0.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=cfg.softcap, HAS_ENT_GRAD=g_ent is not None,
            NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b, EVEN_K=H % tiles.block_k == 0,
            FILTER=cfg.grad_filter_eps is not None,
            BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_K=tiles.block_k, GROUP_N=8,
            PRECISION=_dot_precision(weight.dtype), UPCAST=_upcast_dots(weight.dtype),
            IDX64=_needs_int64(h3, weight, n_cols=H), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
        if need_w and not fp32:
            dw[v_start:v_end].copy_(acc)
    return (
        dh.to(h3.dtype) if need_h else None,
        dw,
        db.to(bias.dtype) if need_b else None,
    )


# ------------------------------------------------------------------------------------------ PyTorch path


@functools.cache
def _fp32_out_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.mm turns `dtype` operands into an fp32 result on this device (CUDA, torch >= 2.8)."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _gemm_dtype(weight: torch.Tensor) -> torch.dtype:
    """dtype the GEMM operands run in: the weight's own when fp32 results are native, else float32."""
    if weight.dtype == torch.float32 or _fp32_out_supported(weight.device.type, weight.dtype):
        return weight.dtype
    return torch.float32


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (operands share a dtype that _gemm_dtype chose)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    return torch.mm(a, b, out_dtype=torch.float32)


def _addmm32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 (CUDA's addmm refuses an fp32 accumulator for bf16 operands)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc += _mm32(a, b)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cfg: _Config) -> torch.Tensor:
    """The chunk's logits before the temperature, fp32: scale * r, or cap * tanh(scale * r / cap)."""
    logits = _mm32(h, w.t())
    if bias is not None:
        logits += bias
    if cfg.softcap:
        return logits.mul_(cfg.pre).tanh_()
    return logits.mul_(cfg.pre) if cfg.pre != 1.0 else logits


def _torch_forward(h2, weight, bias, ids, cfg: _Config):
    N = ids.numel()
    w = weight.to(_gemm_dtype(weight))
    dev = h2.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if cfg.with_entropy else None
    stats = torch.empty(3 if cfg.with_entropy else 2, N, dtype=torch.float32, device=dev)
    for r0 in range(0, N, cfg.chunk):
        r1 = min(N, r0 + cfg.chunk)
        logits = _chunk_logits(h2[r0:r1].to(w.dtype), w, bias, cfg)
        lp, en, st = _forward(logits[None], ids[r0:r1], cfg.post, cfg.with_entropy, False)
        logp[r0:r1], stats[:, r0:r1] = lp, st
        if cfg.with_entropy:
            ent[r0:r1] = en
    return logp, ent, stats


def _torch_backward(h2, weight, bias, ids, stats, g_lp, g_ent, needs, cfg: _Config):
    need_h, need_w, need_b = needs
    N, (V, H) = ids.numel(), weight.shape
    gemm_dtype = _gemm_dtype(weight)
    w = weight.to(gemm_dtype)
    grad_h = torch.empty(N, H, dtype=h2.dtype, device=h2.device) if need_h else None
    # Summed over chunks in fp32: a low-precision running sum would round once per chunk.
    acc_w = torch.zeros(V, H, dtype=torch.float32, device=h2.device) if need_w else None
    acc_b = torch.zeros(V, dtype=torch.float32, device=h2.device) if need_b else None
    transformed = cfg.softcap or cfg.pre != 1.0
    for r0 in range(0, N, cfg.chunk):
        r1 = min(N, r0 + cfg.chunk)
        h = h2[r0:r1].to(gemm_dtype)
        logits = _chunk_logits(h, w, bias, cfg)
        # d(loss)/d(logits) goes into GEMMs whose operands share one dtype, so it is written in that dtype
        # (in place over fp32 logits, or into a half-size buffer): a relative rounding per element, not the
        # |logit|-scaled error of bf16 logits. Scaled or capped logits keep fp32 values for the chain rule.
        in_place = gemm_dtype == torch.float32 or transformed
        g = logits if in_place else torch.empty_like(logits, dtype=gemm_dtype)
        ge = None if g_ent is None else g_ent[r0:r1]
        tanh = logits.clone() if cfg.softcap else None
        _backward(
            logits[None], ids[r0:r1], stats[:, r0:r1].contiguous(), g_lp[r0:r1], ge, cfg.post, g[None], False
        )
        if cfg.softcap:
            g.mul_(1.0 - tanh.square_())
        if transformed:
            g = g.mul_(cfg.pre).to(gemm_dtype)
        if need_h:
            grad_h[r0:r1] = _mm32(g, w)
        if need_w:
            _addmm32_(acc_w, g.t(), h)
        if need_b:
            acc_b += g.sum(0, dtype=torch.float32)
    return (
        grad_h if need_h else None,
        acc_w.to(weight.dtype) if need_w else None,
        acc_b.to(bias.dtype) if need_b else None,
    )


# ------------------------------------------------------------------------------------------ autograd + API


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, cfg: _Config):
        ids1 = ids.reshape(-1).to(torch.int64).contiguous()
        with _device_guard(hidden):
            if cfg.triton:
                logp, ent, stats = _triton_forward(_rows_view(hidden), weight, bias, ids1, cfg)
            else:
                logp, ent, stats = _torch_forward(
                    hidden.reshape(-1, hidden.shape[-1]), weight, bias, ids1, cfg
                )
        ctx.save_for_backward(hidden, weight, bias, ids1, stats)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        if cfg.with_entropy:
            return logp.view(ids.shape), ent.view(ids.shape)
        return logp.view(ids.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None = None):
        needs = tuple(ctx.needs_input_grad[:3])
        if (g_lp is None and g_ent is None) or not any(needs):
            return None, None, None, None, None
        hidden, weight, bias, ids1, stats = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        N = ids1.numel()
        # Incoming grads may be expanded (stride 0) views; the kernels index them densely.
        g_lp = torch.zeros(N, device=hidden.device) if g_lp is None else g_lp.reshape(N).float().contiguous()
        g_ent = None if g_ent is None else g_ent.reshape(N).float().contiguous()
        with _device_guard(hidden):
            if cfg.triton:
                grads = _triton_backward(
                    _rows_view(hidden), weight, bias, ids1, stats, g_lp, g_ent, needs, cfg
                )
            else:
                h2 = hidden.reshape(-1, hidden.shape[-1])
                grads = _torch_backward(h2, weight, bias, ids1, stats, g_lp, g_ent, needs, cfg)
        grad_h, grad_w, grad_b = grads
        return grad_h.view(hidden.shape) if grad_h is not None else None, grad_w, grad_b, None, None


def default_chunk_size(vocab_size: int) -> int:
    """Largest power of two whose [chunk, V] fp32 logits fit in 256 MiB (256 at V=152k, 2048 at V=32k)."""
    rows = max(1, _CHUNK_LOGITS_BYTES // (4 * vocab_size))
    return 1 << (rows.bit_length() - 1)


def _check_positive(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
    return float(value)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    grad_filter_eps: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(f(hidden @ weight.T + bias), ids)`` without ever holding the [N, V] logits.

    Args:
        hidden: ``[..., H]`` last hidden states, float32, bfloat16 or float16.
        weight: ``[V, H]`` output-layer (lm_head) weight, same dtype as ``hidden``.
        ids: integer tensor of shape ``hidden.shape[:-1]``.
        bias: optional ``[V]`` float bias.
        temperature: > 0; the processed logits are divided by it before the softmax.
        softcap: logit soft-capping ``cap * tanh(logits / cap)`` (Gemma 2's ``final_logit_softcapping``),
            applied after the scale and before the temperature. None: no capping.
        logit_scale: multiplies the logits first (Cohere's ``logit_scale``; Granite's ``logits_scaling`` is
            ``1 / logit_scale``). None: 1.
        return_entropy: also return the per-position entropy of the distribution ``logp`` is taken from.
        chunk_size: tokens per chunk on the PyTorch path (CPU). Default: the largest power of two whose fp32
            ``[chunk, V]`` logits take at most 256 MiB (see ``default_chunk_size``). The Triton path tiles
            by itself and ignores it.
        grad_filter_eps: in (0, 1), or None (the default: the exact gradient). The Triton backward then
            skips the two gradient products of each [token block, vocabulary tile] (128 x 64 on a GPU) in
            which every probability is below it and no token's target falls, as Cut Cross-Entropy's filtering
            does (``2**-12`` is its default, bf16's eps / 32). Each skipped term of d(loss)/d(logit) is at
            most ``eps * (|g_logp| + |g_entropy| * |z - E_p[z]|)``, but the terms add up over the vocabulary:
            a peaked distribution loses little, a flat one (an untrained model, a high temperature) can lose
            most of its ``-E_p[w]`` term. The PyTorch path always computes the exact gradient.

    Returns:
        ``logp`` (float32, shape of ``ids``), or ``(logp, entropy)``. Differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``; gradients come back in their dtypes.

    Precision: logits are accumulated and kept in fp32 up to the softmax; weight and bias gradients are
    summed in fp32. With bf16/fp16 weights, d(loss)/d(logits) is rounded to that dtype for the backward
    products (a relative, per-element rounding, as in any bf16 backward). fp32 weights follow torch's TF32
    setting (``torch.backends.cuda.matmul.allow_tf32``). See the module docstring for memory and determinism.

    Out-of-range ids behave as in ``token_logprobs``: NaN logp, no gradient from that logp.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() == 0:
        raise ValueError("hidden must have shape [..., H]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= 1, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_ids(ids, hidden.shape[:-1], "hidden")
    check_same_device(hidden=hidden, weight=weight, ids=ids, bias=bias)
    temperature = check_temperature(temperature)
    eps = grad_filter_eps
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1):
        raise ValueError(f"grad_filter_eps must be a number in (0, 1) or None, got {eps!r}")
    softcap = _check_positive("softcap", softcap)
    scale = _check_positive("logit_scale", logit_scale) or 1.0
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    tensors = (hidden, weight, ids) if bias is None else (hidden, weight, ids, bias)
    fused = use_triton(*tensors) and not torch.are_deterministic_algorithms_enabled()
    if softcap is None:
        pre, post = scale, 1.0 / temperature
    else:
        pre, post = scale / softcap, softcap / temperature
    cfg = _Config(
        pre=pre,
        post=post,
        softcap=softcap is not None,
        with_entropy=bool(return_entropy),
        chunk=max(1, min(chunk_size, ids.numel())),
        triton=fused,
        grad_filter_eps=None if grad_filter_eps is None else float(grad_filter_eps),
    )
    if ids.numel() == 0:
        cfg = _Config(pre, post, cfg.softcap, cfg.with_entropy, 1, False)
    return _LinearTokenLogprobs.apply(hidden, weight, bias, ids, cfg)


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Executable spec: full logits in float32 (float64 for float64 input), scaled, capped, then
    token_logprobs_reference at the temperature."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return token_logprobs_reference(logits, ids, temperature=temperature, return_entropy=return_entropy)
