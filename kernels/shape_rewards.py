"""KL-shaped per-token rewards, and the fused PPO advantage pipeline built on them.

``shape_rewards``: ``-kl_coef * kl_t`` at every counted token plus the sequence score at the last counted
token of each row. ``ppo_advantages``: one kernel computes, per row and in a single reverse pass over
T-blocks, the KL estimate, the shaped rewards and the GAE scan (see ``gae.py``); the whitening reduction
over the batch's counted advantages follows (see ``whiten.py``).

Walking each row from its end also finds the last counted token for free: it lies in the first T-block
(from the end) holding a counted token, at that block's largest counted position.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._backend import check_float, check_mask, check_same_device, check_same_shape, device_guard, use_triton
from ._triton import tl, triton
from .gae import _gae_loop as gae_loop
from .gae import check_2d, check_unit_interval, gae_block, gae_reference, row_launch_config, rows_unit_stride
from .kl_penalty import check_estimator, kl_penalty_reference, kl_value, kl_value_torch
from .whiten import masked_whiten, masked_whiten_reference, whiten_triton


class PPOAdvantages(NamedTuple):
    """Outputs of :func:`ppo_advantages`, each [B, T] float32 and 0 at masked positions."""

    advantages: torch.Tensor
    returns: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


# --------------------------------------------------------------------------------------------- Triton


@triton.jit(do_not_specialize=["T", "stride_lp", "stride_ref", "stride_v", "stride_m", "stride_out"])
def _ppo_rows_kernel(
    scores_ptr,
    logp_ptr,
    ref_ptr,
    values_ptr,
    m_ptr,
    kl_coef_ptr,
    kl_ptr,
    rew_ptr,
    adv_ptr,
    ret_ptr,
    T,
    stride_lp,
    stride_ref,
    stride_v,
    stride_m,
    stride_out,
    gamma,
    gamma_lam,
    ESTIMATOR: tl.constexpr,
    WITH_GAE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows on axis 0: B may exceed 65,535
    logp_ptr += row * stride_lp
    ref_ptr += row * stride_ref
    m_ptr += row * stride_m
    rew_ptr += row * stride_out
    score = tl.load(scores_ptr + row).to(tl.float32)
    # Read from device memory: a tensor kl_coef (adaptive controller) needs no host sync or recompile.
    kl_coef = tl.load(kl_coef_ptr)
    rev = BLOCK - 1 - tl.arange(0, BLOCK)
    n_state = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)  # loop-carried fp32 scalars
    c_state = n_state
    score_pending = n_state + 1.0  # 1.0 until the last counted token (seen first, going backwards) got it
    num_blocks = tl.cdiv(T, BLOCK)
    for i in range(0, num_blocks):
        t = (num_blocks - 1 - i) * BLOCK + rev  # reversed: the scan runs from the end of the row
        inb = t < T
        m = tl.load(m_ptr + t, mask=inb, other=0) != 0
        logp = tl.load(logp_ptr + t, mask=inb, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + t, mask=inb, other=0.0).to(tl.float32)
        # where, not multiply: padding may hold garbage log-probs (even -inf or NaN).
        kl = tl.where(m, kl_value(logp - ref, ESTIMATOR), 0.0)
        last_t = tl.max(tl.where(m, t, -1), axis=0)
        # Nested where, not `&` with the scalar flag: also keeps a non-finite score out of other tokens.
        bonus = tl.where(score_pending > 0, tl.where((t == last_t) & m, score, 0.0), 0.0)
        score_pending = tl.where(last_t >= 0, 0.0, score_pending)
        rew = tl.where(m, bonus - kl_coef * kl, 0.0)
        tl.store(rew_ptr + t, rew, mask=inb)
        if WITH_GAE:
            tl.store(kl_ptr + row * stride_out + t, kl, mask=inb)
            v = tl.load(values_ptr + row * stride_v + t, mask=inb, other=0.0).to(tl.float32)
            adv, n_state, c_state = gae_block(rew, v, m, n_state, c_state, gamma, gamma_lam, BLOCK)
            tl.store(adv_ptr + row * stride_out + t, adv, mask=inb)
            tl.store(ret_ptr + row * stride_out + t, tl.where(m, adv + v, 0.0), mask=inb)


def _kl_coef_tensor(kl_coef: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """kl_coef as a [1] fp32 tensor on ``device``, without a host sync whatever form it comes in."""
    if isinstance(kl_coef, torch.Tensor) and kl_coef.device == device:
        return kl_coef.detach().to(torch.float32).reshape(1)
    # A Python float, or a CPU tensor beside device inputs: read on the host (free for a CPU tensor) and
    # filled on the device. Copying the CPU tensor over instead would be a blocking pageable-memory copy.
    return torch.full((1,), float(kl_coef), dtype=torch.float32, device=device)


def _ppo_rows_triton(scores, logp, ref_logp, values, mask, kl_coef, estimator, gamma, lam, with_gae):
    B, T = logp.shape
    dev = logp.device
    outs = [torch.empty((B, T), dtype=torch.float32, device=dev) for _ in range(4 if with_gae else 1)]
    if B == 0 or T == 0:
        return outs
    rew = outs[0]
    kl, adv, ret = outs[1:] if with_gae else (rew, rew, rew)  # dummies are never written
    lp, rl, m = rows_unit_stride(logp), rows_unit_stride(ref_logp), rows_unit_stride(mask)
    v = rows_unit_stride(values) if with_gae else lp
    block, warps = row_launch_config(T)
    with device_guard(lp):
        _ppo_rows_kernel[(B,)](
            scores.contiguous(),
            lp,
            rl,
            v,
            m,
            _kl_coef_tensor(kl_coef, dev),
            kl,
            rew,
            adv,
            ret,
            T,
            lp.stride(0),
            rl.stride(0),
            v.stride(0),
            m.stride(0),
            rew.stride(0),
            gamma,
            gamma * lam,
            ESTIMATOR=estimator,
            WITH_GAE=with_gae,
            BLOCK=block,
            num_warps=warps,
        )
    return outs


# ---------------------------------------------------------------------------------------------- torch


def _last_counted_bonus(scores: torch.Tensor, counted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] tensor holding scores[b] at the last counted token of row b, 0 elsewhere."""
    B, T = counted.shape
    if T == 0:
        return torch.zeros((B, T), dtype=dtype, device=counted.device)
    positions = torch.arange(T, device=counted.device).expand(B, T)
    last = torch.where(counted, positions, -1).amax(dim=1, keepdim=True)  # -1: no counted token
    is_last = (positions == last) & counted
    return torch.where(is_last, scores.to(dtype).unsqueeze(1), 0.0)


def _shape_rewards_torch(scores, logp, ref_logp, mask, kl_coef, estimator):
    counted = mask != 0
    kl = torch.where(counted, kl_value_torch(logp.float() - ref_logp.float(), estimator), 0.0)
    coef = kl_coef.detach().float() if isinstance(kl_coef, torch.Tensor) else float(kl_coef)
    rewards = torch.where(counted, _last_counted_bonus(scores, counted, torch.float32) - coef * kl, 0.0)
    return rewards, kl


# --------------------------------------------------------------------------------------------- public


def _check_args(scores, logp, ref_logp, mask, kl_coef, estimator, *, reference=False):
    check_2d("logp", logp)
    check_2d("ref_logp", ref_logp)
    check_2d("mask", mask)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.shape[0] != logp.shape[0]:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a [B] tensor with B = logp.shape[0] = {logp.shape[0]}, got {shape}")
    if not reference:
        for name, t in (("scores", scores), ("logp", logp), ("ref_logp", ref_logp)):
            check_float(name, t)
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    check_mask("mask", mask, "logp", logp)
    if isinstance(kl_coef, torch.Tensor):
        if kl_coef.dim() != 0:
            raise ValueError(
                f"kl_coef must be a Python float or a 0-d tensor, got shape {tuple(kl_coef.shape)}"
            )
        # A CPU scalar is accepted beside CUDA inputs (read on the host, no device sync), as torch does.
        on = {"kl_coef": kl_coef} if kl_coef.device.type != "cpu" else {}
        check_same_device(scores=scores, logp=logp, ref_logp=ref_logp, mask=mask, **on)
    else:
        if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)):
            raise ValueError(f"kl_coef must be a Python float or a 0-d tensor, got {type(kl_coef).__name__}")
        check_same_device(scores=scores, logp=logp, ref_logp=ref_logp, mask=mask)
    check_estimator(estimator)


def shape_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token PPO rewards: KL penalty at every counted token, sequence score at the last one.

    ``rewards[b, t] = -kl_coef * kl(logp, ref_logp)[b, t] + (scores[b] if t is the last counted token of
    row b else 0)`` for counted tokens, 0 at masked positions. Rows with no counted token are all 0.

    Args:
        scores: [B] sequence scores (reward model), float32/bfloat16/float16.
        logp, ref_logp: [B, T] sampled-token log-probs of the policy and the reference model.
        mask: [B, T] bool or numeric; nonzero marks the response tokens that count.
        kl_coef: Python float or 0-d tensor. Either way the kernel reads it as fp32 from device memory, so a
            tensor coefficient (adaptive KL controller) costs no host sync and no torch.compile recompile.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see :func:`kl_penalty`).

    Returns:
        [B, T] float32, detached (rewards carry no gradient).

    Raises:
        ValueError: bad shapes (scores not [B], inputs not 2-D or mismatched), dtypes, devices, estimator.
    """
    _check_args(scores, logp, ref_logp, mask, kl_coef, estimator)
    with torch.no_grad():
        if use_triton(scores, logp, ref_logp, mask):
            outs = _ppo_rows_triton(scores, logp, ref_logp, None, mask, kl_coef, estimator, 1.0, 1.0, False)
        else:
            outs = _shape_rewards_torch(scores, logp, ref_logp, mask, kl_coef, estimator)
        return outs[0]


def ppo_advantages(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> PPOAdvantages:
    """KL estimate, shaped rewards, GAE advantages and returns in one fused pass (plus whitening).

    Equivalent to ``kl = kl_penalty(...)`` (0 at masked positions), ``rewards = shape_rewards(...)``,
    ``advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)`` and, when ``whiten``,
    ``advantages = masked_whiten(advantages, mask)`` over all counted tokens of the batch. Returns are
    computed from the advantages before whitening.

    Args:
        scores: [B] sequence scores. logp, ref_logp, values, mask: [B, T] (see :func:`shape_rewards` and
            :func:`gae`); float32/bfloat16/float16, the mask bool or numeric.
        kl_coef, estimator: as in :func:`shape_rewards`.
        gamma, lam: Python floats in [0, 1], as in :func:`gae`.
        whiten: normalize the advantages (mean 0, unit variance) over the counted tokens.

    Returns:
        ``PPOAdvantages(advantages, returns, rewards, kl)``, each [B, T] float32, 0 at masked positions,
        detached.
    """
    _check_args(scores, logp, ref_logp, mask, kl_coef, estimator)
    check_2d("values", values)
    check_float("values", values)
    check_same_shape("values", values, "logp", logp)
    check_same_device(values=values, logp=logp)
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)
    with torch.no_grad():
        if use_triton(scores, logp, ref_logp, values, mask):
            rew, kl, adv, ret = _ppo_rows_triton(
                scores, logp, ref_logp, values, mask, kl_coef, estimator, float(gamma), float(lam), True
            )
            if whiten:
                whiten_triton(adv, mask, True, 1e-8, out=adv)  # in place: elementwise, same index
            return PPOAdvantages(adv, ret, rew, kl)
        rew, kl = _shape_rewards_torch(scores, logp, ref_logp, mask, kl_coef, estimator)
        adv, ret = gae_loop(rew, values, mask, gamma, lam, torch.float32)
        if whiten:
            adv = masked_whiten(adv, mask)
        return PPOAdvantages(adv, ret, rew, kl)


# ------------------------------------------------------------------------------------------ reference


def shape_rewards_reference(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> torch.Tensor:
    """Readable spec of :func:`shape_rewards`; float64 inputs give float64 output."""
    _check_args(scores, logp, ref_logp, mask, kl_coef, estimator, reference=True)
    counted = mask != 0
    kl = kl_penalty_reference(logp, ref_logp, estimator=estimator)
    penalty = torch.where(counted, -kl_coef * kl, 0.0)  # where: kl may be NaN/inf at padding
    return penalty + _last_counted_bonus(scores, counted, kl.dtype)


def ppo_advantages_reference(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> PPOAdvantages:
    """:func:`ppo_advantages` composed from the references (float64 inputs stay float64)."""
    counted = mask != 0
    kl = torch.where(counted, kl_penalty_reference(logp, ref_logp, estimator=estimator), 0.0)
    rewards = shape_rewards_reference(scores, logp, ref_logp, mask, kl_coef=kl_coef, estimator=estimator)
    advantages, returns = gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = masked_whiten_reference(advantages, mask)
    return PPOAdvantages(advantages, returns, rewards, kl)
