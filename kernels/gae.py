"""Generalized advantage estimation over masked [B, T] rollouts: one launch, a reverse scan along T.

Only counted tokens (``mask != 0``) take part. Each counted token links to the next counted token of its
row, skipping masked spans (padding, or environment text inside a multi-turn response); after the last
counted token the value and advantage are 0. With ``next`` the next counted token:

    delta_t = r_t + gamma * V_next - V_t,    A_t = delta_t + gamma * lam * A_next,    R_t = A_t + V_t.

Scan formulation. Walking a row from the end, carry the state ``(N, C)`` = (value, advantage) of the
first counted token at or after the current position. A counted token maps the state after it to
``(V_t, gamma*N + gamma*lam*C + r_t - V_t)``, a masked token leaves it unchanged. Both are affine maps with
lower-triangular matrices, ``s -> M s + c``, ``M = [[p, 0], [q, s]]``, and composing them is associative,
so one ``tl.associative_scan`` over a T-block yields every position's state relative to the state
entering the block; ``A_t`` is the ``C`` component at counted positions. Blocks are visited from the end
of the row, the state leaving one block (its first position's) entering the next.

One program per row on grid axis 0 (so B may exceed 65,535). Each block is loaded in reverse time order,
which makes the reverse recurrence a plain forward ``associative_scan`` (no ``reverse=True`` needed).
"""

from __future__ import annotations

import numbers

import torch

from ._backend import check_float, check_mask, check_same_device, check_same_shape, device_guard, use_triton
from ._triton import tl, triton

# Largest T-block. A module attribute so tests can shrink it to exercise the cross-block carry.
_MAX_BLOCK_T = 1024


def check_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a Python float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(t.shape)}")


def rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """[B, T] view the row kernels can address as ``base + row * stride(0) + t``."""
    t = t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()
    # Triton has no bool pointer element of byte size on every version; bytes compare the same.
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def row_launch_config(T: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for the one-program-per-row scan kernels."""
    block = min(triton.next_power_of_2(max(T, 1)), _MAX_BLOCK_T)
    block = max(block, 16)
    return block, max(1, min(8, block // 128))


# --------------------------------------------------------------------------------------------- Triton


@triton.jit
def _compose(p1, q1, s1, x1, y1, p2, q2, s2, x2, y2):
    # Scan order runs from the end of the row, so (p1..y1) is the composite of the maps nearer the end
    # and is applied first: result = f2 o f1 = (M2 M1, M2 c1 + c2).
    return p2 * p1, q2 * p1 + s2 * q1, s2 * s1, p2 * x1 + x2, q2 * x1 + s2 * y1 + y2


@triton.jit
def gae_block(r, v, m, n_in, c_in, gamma, gamma_lam, BLOCK: tl.constexpr):
    """One T-block of the GAE scan, elements in reverse time order (index 0 = latest position).

    ``r``, ``v``: fp32 rewards and values; ``m``: counted flags. ``(n_in, c_in)``: value and advantage of
    the first counted token after the block (0, 0 if none). Returns the advantages (0 where not counted)
    and the state leaving the block. Shared with the fused PPO kernel.
    """
    p = tl.where(m, 0.0, 1.0)
    q = tl.where(m, gamma, 0.0)
    s = tl.where(m, gamma_lam, 1.0)
    # where, not multiply: values and rewards at masked positions may be garbage (even NaN).
    x = tl.where(m, v, 0.0)
    y = tl.where(m, r - v, 0.0)
    p, q, s, x, y = tl.associative_scan((p, q, s, x, y), 0, _compose)
    n_state = p * n_in + x
    c_state = q * n_in + s * c_in + y
    adv = tl.where(m, c_state, 0.0)
    last = tl.arange(0, BLOCK) == BLOCK - 1
    n_out = tl.sum(tl.where(last, n_state, 0.0), axis=0)
    c_out = tl.sum(tl.where(last, c_state, 0.0), axis=0)
    return adv, n_out, c_out


# T and the strides only index memory; specializing on their 16-divisibility would recompile per response
# length for nothing (the reversed loads are scalar either way).
@triton.jit(do_not_specialize=["T", "stride_r", "stride_v", "stride_m", "stride_out"])
def _gae_kernel(
    r_ptr,
    v_ptr,
    m_ptr,
    adv_ptr,
    ret_ptr,
    T,
    stride_r,
    stride_v,
    stride_m,
    stride_out,
    gamma,
    gamma_lam,
    BLOCK: tl.constexpr,
):
    # Rows on grid axis 0 (limit 2**31 - 1, unlike axes 1 and 2); int64 so row * stride cannot wrap.
    row = tl.program_id(0).to(tl.int64)
    r_ptr += row * stride_r
    v_ptr += row * stride_v
    m_ptr += row * stride_m
    adv_ptr += row * stride_out
    ret_ptr += row * stride_out
    rev = BLOCK - 1 - tl.arange(0, BLOCK)
    n_state = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)  # fp32 scalars: loop-carried types must match
    c_state = n_state
    num_blocks = tl.cdiv(T, BLOCK)
    for i in range(0, num_blocks):
        # Reversed loads turn the reverse-time recurrence into a plain forward scan.
        t = (num_blocks - 1 - i) * BLOCK + rev
        inb = t < T
        m = tl.load(m_ptr + t, mask=inb, other=0) != 0
        r = tl.load(r_ptr + t, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t, mask=inb, other=0.0).to(tl.float32)
        adv, n_state, c_state = gae_block(r, v, m, n_state, c_state, gamma, gamma_lam, BLOCK)
        tl.store(adv_ptr + t, adv, mask=inb)
        tl.store(ret_ptr + t, tl.where(m, adv + v, 0.0), mask=inb)


def _gae_triton(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    r, v, m = rows_unit_stride(rewards), rows_unit_stride(values), rows_unit_stride(mask)
    block, warps = row_launch_config(T)
    with device_guard(adv):
        _gae_kernel[(B,)](
            r,
            v,
            m,
            adv,
            ret,
            T,
            r.stride(0),
            v.stride(0),
            m.stride(0),
            adv.stride(0),
            gamma,
            gamma * lam,
            BLOCK=block,
            num_warps=warps,
        )
    return adv, ret


# ---------------------------------------------------------------------------------------------- torch


def _gae_loop(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = rewards.shape
    counted = mask != 0
    r, v = rewards.to(dtype), values.to(dtype)
    adv = torch.zeros((B, T), dtype=dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=dtype, device=rewards.device)  # value of the next counted token
    next_adv = torch.zeros_like(next_value)  # advantage of the next counted token
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        c = counted[:, t]
        adv[:, t] = torch.where(c, a_t, 0.0)
        # A masked token is skipped: the "next counted" state passes through it unchanged.
        next_value = torch.where(c, v[:, t], next_value)
        next_adv = torch.where(c, a_t, next_adv)
    returns = torch.where(counted, adv + v, 0.0)
    return adv, returns


# --------------------------------------------------------------------------------------------- public


def check_gae_args(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    check_2d("rewards", rewards)
    check_2d("values", values)
    check_2d("mask", mask)
    check_same_shape("values", values, "rewards", rewards)
    check_mask("mask", mask, "rewards", rewards)
    check_same_device(rewards=rewards, values=values, mask=mask)
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns for masked rollouts.

    For each row, over the counted tokens only (``next`` = the next counted token of the row; beyond the
    last one ``V_next = A_next = 0``; masked spans in between are skipped, not treated as episode ends)::

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        R_t     = A_t + V_t

    Args:
        rewards: [B, T] per-token rewards, float32/bfloat16/float16. Ignored at masked positions.
        values: [B, T] critic values, same shape/device (float dtype may differ). Ignored at masked positions.
        mask: [B, T] bool or numeric; nonzero marks the tokens that count.
        gamma: discount in [0, 1]. A Python float (a fixed hyperparameter), passed to the kernel as an fp32
            scalar; torch.compile may specialize on it, recompiling if it changes between calls.
        lam: GAE lambda in [0, 1]. ``lam=0`` is one-step TD, ``lam=1`` the Monte-Carlo return minus V.

    Returns:
        ``(advantages, returns)``, both [B, T] float32, 0 at masked positions, detached (no gradient).

    Raises:
        ValueError: an input that is not 2-D, shape/dtype/device mismatch, gamma or lam outside [0, 1].
    """
    check_gae_args(rewards, values, mask, gamma, lam)
    check_float("rewards", rewards)
    check_float("values", values)
    with torch.no_grad():
        if use_triton(rewards, values, mask):
            return _gae_triton(rewards, values, mask, float(gamma), float(lam))
        return _gae_loop(rewards, values, mask, gamma, lam, torch.float32)


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Python-loop GAE: a loop over T vectorized over B, the readable spec of :func:`gae`.

    Computes in float64 when an input is float64, otherwise in float32; returns that dtype.
    """
    check_gae_args(rewards, values, mask, gamma, lam)
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    with torch.no_grad():
        return _gae_loop(rewards, values, mask, gamma, lam, dtype)
