"""Next-token sampling in one launch: temperature, top-p, suppressed ids, the sampled id and its log-prob.

One program per row of ``[B, V]`` logits. No sort anywhere; every pass is one read of the row (600 KB at
V = 152k fp32, mostly from L2):

1. **Statistics** (always): online max ``m`` and ``s = sum exp((x - m) / T)`` over the allowed ids (the
   suppressed ones read as ``-inf``). Greedy takes the argmax in this pass; top-p = 1 samples in it too,
   so those two cases read the row once.
2. **Nucleus threshold** (top-p < 1): the largest logit value ``t`` such that the ids with ``x >= t`` hold at
   least ``top_p`` of the mass. It is searched in the value domain with 16 pivots per pass: each pass
   computes, per pivot, the mass at or above it, the smallest logit at or above it and the largest logit
   below it, and the bracket ``[lo, hi]`` shrinks 16-fold and snaps to logit values actually present, so
   the search ends exactly (``lo == hi``): 1-6 passes at V = 152k on random, Zipf-like and peaked rows.
   The start ``lo = m + T * log((1 - top_p) / V)`` always has enough mass: ids below it hold less than
   ``(1 - top_p)`` in total.
3. **Sampling** (top-p < 1): Gumbel-max over the kept ids, ``argmax (x - m) / T - log E`` with ``E ~ Exp(1)``
   (the exponential race, equivalent to adding Gumbel noise). Its winner has the renormalized kept
   probabilities exactly, without computing a prefix sum.

Why Gumbel-max rather than an inverse CDF: no prefix sum over the row, no renormalization, and the result
is exact up to the rounding of the keys. The noise is counter-based (Philox, ``tl.randint4x``) on
``(seed, row * V + column)``, so a seed tensor gives the same ids on every run and the draw needs no state
besides the seed. Two 32-bit words make each uniform, so ``E`` keeps fp32 relative precision down to
1e-19: with V = 152k the race's winner typically has ``E`` near 1e-5, where one 32-bit word would
quantize it by 2e-5 relative and bias the probabilities by as much.

Definitions (the spec, ``sample_tokens_reference``):
- ``logp`` is the log-prob of the chosen id under ``softmax(logits / T)`` over the non-suppressed ids, not
  under the truncated distribution (training computes the full softmax at the temperature).
- The nucleus keeps every id whose logit is at least that of the k-th most likely id, k the smallest
  count whose sorted cumulative mass reaches ``top_p``. Ties at the boundary are all kept, so the kept
  set does not depend on the order of equal logits. ``-inf`` logits are never kept.
- Greedy is the argmax over the non-suppressed ids, ties to the lowest id (as ``torch.argmax``).
- A row with no finite allowed logit gives id 0 and NaN log-prob.

The Triton path reads the seed on the device (a pointer argument), never on the host, so a call can be
captured in a CUDA graph; the caller advances the seed tensor between steps. The torch path (the CPU
default) runs the same math, with the threshold from a sorted cumulative mass in float64, and float64
Exp(1) noise from a ``torch.Generator`` seeded with the seed's value (a host read, free on the CPU; with
``FASTRLHF_KERNELS=torch`` on a GPU it syncs and cannot be captured). Both paths keep the same nucleus and
pick the same greedy ids; the reference replays the kernel's Philox stream (``kernel_noise``), so its ids
match the Triton path's except at fp32 near-ties of the keys.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from ._backend import check_float, check_same_device, check_temperature, device_guard, use_triton
from ._triton import tl, triton

# Largest V-block of the statistics and sampling passes; tests lower it to cross several blocks.
MAX_BLOCK_V = 4096
# V-block of the threshold search, which compares a [NUM_PIVOTS, block] tile.
MAX_SEARCH_BLOCK_V = 512
NUM_PIVOTS = 16
# Cap on the threshold search. Realistic rows end in 1-6 passes; a pathological row (logits spread over
# many binades with tiny gaps) that hits the cap keeps a superset of the nucleus, never a subset.
MAX_SEARCH_PASSES = 40
# The torch path works on row chunks of about this many elements (its Philox replica holds int64 temps).
_TORCH_CHUNK_ELEMS = 1 << 20
# The search's start offset, clamped so that m + offset stays finite at huge temperatures.
_MIN_LOW_GAP = -1e30

_TWO_TO_MINUS_32 = 2.0**-32
# Below this, -log(1 - v) is its 7-term series (truncation < 2^-24 relative), where 1 - v would round.
_SERIES_BELOW = 0.125

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUNDS = 10  # tl.randint4x's default


class SampleResult(NamedTuple):
    """What ``sample_with_threshold`` returns: ``sample_tokens``' pair plus each row's nucleus threshold."""

    ids: torch.Tensor  # int64 [B]
    logp: torch.Tensor  # float32 [B]
    threshold: torch.Tensor  # float32 [B]: kept = logits >= threshold (and > -inf); -inf keeps all


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _log_exponential_noise(seed, pair_counters):
    """log E, E ~ Exp(1), for the 2 * len(pair_counters) columns of a tile (mirrored by ``kernel_noise``).

    One Philox call (four 32-bit words) serves two neighbouring columns: words 0-1 the even one, 2-3 the
    odd one, so the noise of a column does not depend on the block size.
    """
    w0, w1, w2, w3 = tl.randint4x(seed, pair_counters)
    n: tl.constexpr = 2 * pair_counters.shape[0]
    hi = tl.reshape(tl.join(w0, w2), [n]).to(tl.float32)
    lo = tl.reshape(tl.join(w1, w3), [n]).to(tl.float32)
    # v is uniform in (0, 1], rounded once to fp32 from 64 random bits (fine relative precision near 0).
    v = (hi + (lo + 0.5) * 2.3283064365386963e-10) * 2.3283064365386963e-10
    # -log(1 - v) = sum_k v^k / k, 7 terms by Horner, where 1 - v would lose v's low bits.
    series = v * 0.14285714285714285 + 0.16666666666666666
    series = series * v + 0.2
    series = series * v + 0.25
    series = series * v + 0.3333333333333333
    series = series * v + 0.5
    series = (series * v + 1.0) * v
    return tl.log(tl.where(v < 0.125, series, -tl.log(1.0 - v)))


@triton.jit
def _allowed_logits(x_row, cols, V, sup_ptr, S):
    """One tile of the row in fp32; suppressed ids and columns past V read as -inf."""
    x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    for k in range(0, S):
        x = tl.where(cols == tl.load(sup_ptr + k), float("-inf"), x)
    return x


@triton.jit
def _sample_tokens_kernel(
    x_ptr, stride_b, V, sup_ptr, S, seed_ptr, ids_ptr, logp_ptr, thr_ptr,
    inv_temp, top_p, low_gap,
    GREEDY: tl.constexpr, NUCLEUS: tl.constexpr, BLOCK_V: tl.constexpr, SEARCH_BLOCK_V: tl.constexpr,
    NUM_PIVOTS: tl.constexpr, MAX_PASSES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_b
    pair_base = row * ((V + 1) // 2)  # int64 Philox counter of the row's columns 0 and 1
    c = tl.cast(inv_temp, tl.float32)
    neg_inf = float("-inf")
    offs = tl.arange(0, BLOCK_V)
    pair_offs = tl.arange(0, BLOCK_V // 2)
    seed = 0 if GREEDY else tl.load(seed_ptr)

    # Pass 1: statistics, plus the argmax (greedy) or the Gumbel-max draw over all ids (top_p == 1).
    m = tl.full((), neg_inf, tl.float32)  # running max of the allowed raw logits
    s = tl.zeros((), tl.float32)  # sum exp((x - m) * c)
    best_key = tl.full((), neg_inf, tl.float32)  # relative to the running max
    best_id = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = _allowed_logits(x_row, cols, V, sup_ptr, S)
        tile_max, tile_arg = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        m_new = tl.maximum(m, tile_max)
        # While every logit so far is -inf there is nothing to shift by; 0 keeps the arithmetic NaN-free.
        m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
        m_old_ref = tl.where(m == neg_inf, 0.0, m)
        s = tl.exp((m - m_ref) * c) * s + tl.sum(tl.exp((x - m_ref) * c), axis=0)
        if GREEDY:
            # Strictly greater: an equal maximum in a later tile loses to the lower id.
            best_id = tl.where(tile_max > m, start + tile_arg, best_id)
        elif not NUCLEUS:
            keys = (x - m_ref) * c - _log_exponential_noise(seed, pair_base + start // 2 + pair_offs)
            keys = tl.where(x > neg_inf, keys, neg_inf)
            best_key = best_key + (m_old_ref - m_ref) * c  # re-expressed relative to the new max
            tile_key, key_arg = tl.max(keys, axis=0, return_indices=True, return_indices_tie_break_left=True)
            take = tile_key > best_key
            best_id = tl.where(take, start + key_arg, best_id)
            best_key = tl.where(take, tile_key, best_key)
        m = m_new
    logs = tl.log(s)

    thr = tl.full((), neg_inf, tl.float32)
    if NUCLEUS and not GREEDY:
        # Pass 2..: the threshold. Invariant: mass(x >= lo) >= target, and the answer lies in [lo, hi].
        target = top_p * s
        lo = m + low_gap
        hi = m
        k_idx = tl.arange(0, NUM_PIVOTS)
        frac = (k_idx + 1).to(tl.float32) / NUM_PIVOTS
        search_offs = tl.arange(0, SEARCH_BLOCK_V)
        passes = 0
        while (lo < hi) & (passes < MAX_PASSES):
            piv = lo + (hi - lo) * frac
            # The last pivot is hi itself, and no pivot may round down onto lo (no progress).
            piv = tl.where((k_idx == NUM_PIVOTS - 1) | (piv <= lo), hi, piv)
            mass = tl.zeros((NUM_PIVOTS,), tl.float32)
            above_min = tl.full((NUM_PIVOTS,), float("inf"), tl.float32)
            below_max = tl.full((NUM_PIVOTS,), neg_inf, tl.float32)
            for start in range(0, V, SEARCH_BLOCK_V):
                cols = start + search_offs
                x = _allowed_logits(x_row, cols, V, sup_ptr, S)
                e = tl.exp((x - m) * c)
                at_or_above = x[None, :] >= piv[:, None]
                mass += tl.sum(tl.where(at_or_above, e[None, :], 0.0), axis=1)
                above_min = tl.minimum(
                    above_min, tl.min(tl.where(at_or_above, x[None, :], float("inf")), axis=1)
                )
                below_max = tl.maximum(below_max, tl.max(tl.where(at_or_above, neg_inf, x[None, :]), axis=1))
            # The highest pivot that still holds enough mass; -1 if none (then the answer is below piv[0]).
            k_star = tl.max(tl.where(mass >= target, k_idx, -1), axis=0)
            new_lo = tl.max(tl.where(k_idx == k_star, above_min, neg_inf), axis=0)
            new_lo = tl.where(k_star >= 0, new_lo, lo)
            new_hi = tl.max(tl.where(k_idx == k_star + 1, below_max, neg_inf), axis=0)
            new_hi = tl.where(k_star < NUM_PIVOTS - 1, new_hi, hi)
            hi = tl.maximum(new_hi, new_lo)
            lo = new_lo
            passes += 1
        thr = lo

        # Last pass: Gumbel-max over the kept ids.
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = _allowed_logits(x_row, cols, V, sup_ptr, S)
            keys = (x - m) * c - _log_exponential_noise(seed, pair_base + start // 2 + pair_offs)
            keys = tl.where((x >= thr) & (x > neg_inf), keys, neg_inf)
            tile_key, key_arg = tl.max(keys, axis=0, return_indices=True, return_indices_tie_break_left=True)
            take = tile_key > best_key
            best_id = tl.where(take, start + key_arg, best_id)
            best_key = tl.where(take, tile_key, best_key)

    x_id = tl.load(x_row + best_id).to(tl.float32)
    logp = tl.where(m == neg_inf, float("nan"), (x_id - m) * c - logs)
    tl.store(ids_ptr + row, best_id.to(tl.int64))
    tl.store(logp_ptr + row, logp)
    tl.store(thr_ptr + row, thr)


def _launch_config(V: int) -> tuple[int, int, int]:
    """(BLOCK_V, SEARCH_BLOCK_V, num_warps)."""
    # 4096-wide blocks with 8 warps: 16 fp32 values per thread per live array, as in token_logprobs. The
    # search tile is [16, 512], the same 8192 elements spread over its three reductions.
    block = max(2, min(triton.next_power_of_2(V), MAX_BLOCK_V))  # even: columns pair up for the noise
    search_block = min(triton.next_power_of_2(V), MAX_SEARCH_BLOCK_V)
    return block, search_block, min(8, max(1, block // 512))


def _sample_triton(
    x: torch.Tensor,
    sup: torch.Tensor | None,
    seed: torch.Tensor | None,
    inv_temp: float,
    top_p: float,
    low_gap: float,
    greedy: bool,
) -> SampleResult:
    B, V = x.shape
    ids = torch.empty(B, dtype=torch.int64, device=x.device)
    logp = torch.empty(B, dtype=torch.float32, device=x.device)
    thr = torch.empty(B, dtype=torch.float32, device=x.device)
    if B == 0:
        return SampleResult(ids, logp, thr)
    block, search_block, warps = _launch_config(V)
    n_sup = 0 if sup is None else sup.numel()
    with device_guard(x):  # Triton launches on the current device, not on the tensors'
        _sample_tokens_kernel[(B,)](
            x, x.stride(0), V, ids if sup is None else sup, n_sup, ids if seed is None else seed,
            ids, logp, thr, inv_temp, top_p, low_gap,
            GREEDY=greedy, NUCLEUS=top_p < 1.0, BLOCK_V=block, SEARCH_BLOCK_V=search_block,
            NUM_PIVOTS=NUM_PIVOTS, MAX_PASSES=MAX_SEARCH_PASSES, num_warps=warps,
        )  # fmt: skip
    return SampleResult(ids, logp, thr)


# ------------------------------------------------------------------------------------- torch implementation


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``const * x`` (both < 2^32) in int64 arithmetic that never overflows."""
    c_hi, c_lo = const >> 16, const & 0xFFFF
    x_hi, x_lo = x >> 16, x & 0xFFFF
    mid = c_hi * x_lo + c_lo * x_hi  # < 2^33
    low = c_lo * x_lo + ((mid & 0xFFFF) << 16)  # < 2^33
    high = c_hi * x_hi + (mid >> 16) + (low >> 32)
    return high & _M32, low & _M32


def _philox4x32(seed: torch.Tensor, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, counters)`` (Philox4x32-10) replicated bit for bit, as int64 in [0, 2^32)."""
    s = seed.reshape(())
    k0, k1 = s & _M32, (s >> 32) & _M32
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = c3 = torch.zeros_like(counters)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def kernel_noise(seed: torch.Tensor, B: int, V: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The kernel's Exp(1) noise E [B, V] for a seed, in its fp32 formula or the same draw in float64.

    Slow (int64 tensor arithmetic): for the reference and tests at small sizes.
    """
    dev = seed.device
    pairs = torch.arange(B, dtype=torch.int64, device=dev)[:, None] * ((V + 1) // 2)
    pairs = pairs + torch.arange((V + 1) // 2, dtype=torch.int64, device=dev)
    w0, w1, w2, w3 = _philox4x32(seed, pairs)
    # Column 2j takes words 0-1 of pair j, column 2j + 1 words 2-3.
    hi = torch.stack([w0, w2], dim=-1).reshape(B, -1)[:, :V]
    lo = torch.stack([w1, w3], dim=-1).reshape(B, -1)[:, :V]
    if dtype == torch.float64:
        v = (hi.double() + (lo.double() + 0.5) * _TWO_TO_MINUS_32) * _TWO_TO_MINUS_32
        return -torch.log1p(-v)
    v = (hi.float() + (lo.float() + 0.5) * _TWO_TO_MINUS_32) * _TWO_TO_MINUS_32
    series = v * (1 / 7) + 1 / 6  # the kernel's Horner chain, step by step
    for coeff in (1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0):
        series = series * v + coeff
    series = series * v
    return torch.where(v < _SERIES_BELOW, series, -torch.log(1.0 - v))


def _banned_columns(sup: torch.Tensor | None, V: int, device: torch.device) -> torch.Tensor | None:
    """Bool [V] of suppressed columns, built on the device (ids outside [0, V) match nothing)."""
    if sup is None or sup.numel() == 0:
        return None
    in_range = (sup >= 0) & (sup < V)
    banned = torch.zeros(V + 1, dtype=torch.bool, device=device)
    banned[torch.where(in_range, sup, V)] = True
    return banned[:V]


def _nucleus_threshold_torch(x: torch.Tensor, m_ref: torch.Tensor, c: float, top_p: float) -> torch.Tensor:
    """The kernel's threshold from a sorted cumulative mass (float64): the logit of the k-th likeliest id."""
    xs = x.sort(dim=-1, descending=True).values
    mass = ((xs - m_ref[:, None]) * c).exp().double().cumsum(dim=-1)
    k = (mass < top_p * mass[:, -1:]).sum(dim=-1).clamp(max=x.shape[-1] - 1)
    return xs.gather(1, k[:, None]).squeeze(1)


def _sample_torch(
    x: torch.Tensor,
    sup: torch.Tensor | None,
    seed: torch.Tensor | None,
    inv_temp: float,
    top_p: float,
    greedy: bool,
) -> SampleResult:
    B, V = x.shape
    banned = _banned_columns(sup, V, x.device)
    ids = torch.empty(B, dtype=torch.int64, device=x.device)
    logp = torch.empty(B, dtype=torch.float32, device=x.device)
    thr = torch.full((B,), -math.inf, dtype=torch.float32, device=x.device)
    # The torch path draws its noise from a torch.Generator seeded with the seed tensor's value: a host read,
    # free on the CPU (on a GPU the Triton path, which reads it on the device, is the default).
    gen = None
    if not greedy:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(seed) & (2**64 - 1))
    rows = max(1, _TORCH_CHUNK_ELEMS // V)
    for r0 in range(0, B, rows):
        r1 = min(B, r0 + rows)
        xc = x[r0:r1].float()
        if banned is not None:
            xc = xc.masked_fill(banned, -math.inf)
        m = xc.amax(dim=-1)
        m_ref = m.masked_fill(m == -math.inf, 0.0)
        d = (xc - m_ref[:, None]) * inv_temp
        logs = d.exp().sum(dim=-1).log()
        if greedy:
            chosen = xc.argmax(dim=-1)
        else:
            if top_p < 1.0:
                thr[r0:r1] = _nucleus_threshold_torch(xc, m_ref, inv_temp, top_p)
            kept = (xc >= thr[r0:r1, None]) & (xc > -math.inf)
            # float64 Exp(1) noise; E = 0 (probability 2^-53) is lifted so that no key becomes +inf.
            noise = torch.empty(xc.shape, dtype=torch.float64, device=x.device).exponential_(generator=gen)
            keys = d.double() - noise.clamp_(min=1e-300).log_()
            chosen = keys.masked_fill_(~kept, -math.inf).argmax(dim=-1)
        x_id = xc.gather(1, chosen[:, None]).squeeze(1)
        ids[r0:r1] = chosen
        logp[r0:r1] = torch.where(m == -math.inf, math.nan, (x_id - m) * inv_temp - logs)
    return SampleResult(ids, logp, thr)


# ---------------------------------------------------------------------------------------------- public API


def _check_args(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    suppress_ids: torch.Tensor | None,
    seed: torch.Tensor | None,
) -> float:
    check_float("logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape [B, V] with V >= 1, got {tuple(logits.shape)}")
    temperature = check_temperature(temperature)
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if suppress_ids is not None:
        if not isinstance(suppress_ids, torch.Tensor):
            raise ValueError(f"suppress_ids must be a torch.Tensor, got {type(suppress_ids).__name__}")
        if suppress_ids.dtype != torch.int64 or suppress_ids.dim() != 1:
            raise ValueError(
                f"suppress_ids must be a 1-D int64 tensor, got {suppress_ids.dtype} "
                f"of shape {tuple(suppress_ids.shape)}"
            )
        # Reading the ids is a host sync on a GPU (and impossible in a CUDA graph), so only CPU ids are
        # range-checked; elsewhere an id outside [0, V) suppresses nothing.
        if suppress_ids.device.type == "cpu" and suppress_ids.numel() > 0:
            lo, hi = int(suppress_ids.min()), int(suppress_ids.max())
            if lo < 0 or hi >= logits.shape[1]:
                raise ValueError(
                    f"suppress_ids must lie in [0, V) = [0, {logits.shape[1]}), got ids in [{lo}, {hi}]"
                )
    if seed is not None:
        if not isinstance(seed, torch.Tensor):
            raise ValueError(f"seed must be a torch.Tensor (int64, shape [1]), got {type(seed).__name__}")
        if seed.dtype != torch.int64 or seed.shape != (1,):
            raise ValueError(
                f"seed must be an int64 tensor of shape [1], got {seed.dtype} {tuple(seed.shape)}"
            )
    check_same_device(logits=logits, suppress_ids=suppress_ids, seed=seed)
    return temperature


def sample_with_threshold(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    suppress_ids: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    greedy: bool = False,
) -> SampleResult:
    """``sample_tokens`` plus each row's nucleus threshold (for tests and diagnostics); same arguments."""
    temperature = _check_args(logits, temperature, top_p, suppress_ids, seed)
    greedy = bool(greedy)
    if logits.stride(1) != 1 and logits.shape[1] != 1:
        logits = logits.contiguous()
    if seed is None and not greedy:
        # Host side, from torch's default generator for the device: fine outside CUDA graphs.
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=logits.device)
    if suppress_ids is not None and suppress_ids.numel() == 0:
        suppress_ids = None
    inv_temp = 1.0 / temperature
    if use_triton(logits):
        low_gap = 0.0
        if top_p < 1.0:
            low_gap = max(math.log((1.0 - top_p) / logits.shape[1]) * temperature, _MIN_LOW_GAP)
        return _sample_triton(logits, suppress_ids, seed, inv_temp, float(top_p), low_gap, greedy)
    return _sample_torch(logits, suppress_ids, seed, inv_temp, float(top_p), greedy)


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    suppress_ids: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row with temperature and top-p, and return its log-prob; no autograd.

    Args:
        logits: ``[B, V]`` float32, bfloat16 or float16 (unit last stride, else copied).
        temperature: finite, > 0. Sampling and ``logp`` use ``softmax(logits / temperature)``.
        top_p: in (0, 1]. Keep the smallest set of likeliest ids whose mass reaches ``top_p`` (all ids tied
            with the last one needed are kept), and sample from it renormalized; 1 keeps every id.
        suppress_ids: int64 ``[S]`` ids never sampled and excluded from the softmax (e.g. EOS before
            ``min_new_tokens``). Checked against ``[0, V)`` only on the CPU (a check on a GPU would sync);
            elsewhere out-of-range ids suppress nothing. The kernel tests each id per element, so this is
            meant for a handful of ids.
        seed: int64 ``[1]`` on the logits' device, read on the device only, so the call can be captured in
            a CUDA graph; advance it between steps (``seed.add_(1)``). The same seed gives the same ids.
            ``None`` draws one from torch's default generator for the device (on the host).
        greedy: argmax over the non-suppressed ids (ties to the lowest id); ``temperature`` then only
            affects ``logp``, and ``top_p`` and ``seed`` are ignored.

    Returns:
        ``(ids, logp)``: int64 ``[B]`` and float32 ``[B]``, ``logp`` the log-prob of ``ids`` under the full
        (not top-p-truncated) softmax at the temperature over the non-suppressed ids. A row without a
        finite allowed logit gives id 0 and NaN.
    """
    result = sample_with_threshold(
        logits, temperature=temperature, top_p=top_p, suppress_ids=suppress_ids, seed=seed, greedy=greedy
    )
    return result.ids, result.logp


def nucleus_reference(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    suppress_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Executable spec of the distribution, in float64: (log_softmax [B, V] over allowed ids, kept [B, V])."""
    z = logits.double() / temperature
    if suppress_ids is not None:
        z[:, suppress_ids] = -math.inf
    logp_all = torch.log_softmax(z, dim=-1)
    allowed = z > -math.inf
    if top_p >= 1.0:
        return logp_all, allowed
    z_sorted = z.sort(dim=-1, descending=True).values
    cum_mass = logp_all.exp().sort(dim=-1, descending=True).values.cumsum(dim=-1)
    k = (cum_mass < top_p).sum(dim=-1).clamp(max=z.shape[-1] - 1)  # the k-th likeliest id is the last needed
    z_last = z_sorted.gather(1, k[:, None])
    return logp_all, (z >= z_last) & allowed


def sample_tokens_reference(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    suppress_ids: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Executable spec in float64: argmax, or Gumbel-max over the nucleus with the Triton kernel's noise.

    Same seed, same noise as the Triton path, so their ids agree except at fp32 near-ties of the keys.
    """
    logp_all, kept = nucleus_reference(
        logits, temperature=temperature, top_p=top_p, suppress_ids=suppress_ids
    )
    if greedy:
        ids = logp_all.argmax(dim=-1)
    else:
        if seed is None:
            raise ValueError("sample_tokens_reference needs a seed tensor unless greedy")
        noise = kernel_noise(seed, *logits.shape)
        ids = (logp_all - noise.log()).masked_fill(~kept, -math.inf).argmax(dim=-1)
    logp = logp_all.gather(1, ids[:, None]).squeeze(1)
    return ids, logp.float()
