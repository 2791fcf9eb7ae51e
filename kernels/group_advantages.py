"""Critic-free sequence advantages from groups of K responses to one prompt: one launch, one program a group.

``scores`` [G * K] holds the G groups contiguously (rows g*K .. g*K + K - 1 answer prompt g). With m the group
mean of the scores s_1..s_K and sd their Bessel-corrected standard deviation:

    grpo     A_i = (s_i - m) / (sd + eps)                      (Shao et al. 2024, DeepSeekMath)
    dr_grpo  A_i = s_i - m                                     (Liu et al. 2025: no std normalization)
    rloo     A_i = s_i - (sum_j s_j - s_i) / (K - 1)  =  K / (K - 1) * (s_i - m)   (Ahmadian et al. 2024)

Statistics accumulate in fp32; the output is fp32 [G * K]. The per-token broadcast (and, for GRPO, the length
normalization) belongs to the loss, not to this op.
"""

from __future__ import annotations

import torch

from ._backend import check_float, device_guard, use_triton
from ._triton import tl, triton

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
_MODE = {name: i for i, name in enumerate(ESTIMATORS)}


@triton.jit
def _group_advantages_kernel(scores, out, K, eps, MODE: tl.constexpr, BLOCK: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    valid = offsets < K
    x = tl.load(scores + group * K + offsets, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / K
    centered = tl.where(valid, x - mean, 0.0)
    if MODE == 0:
        std = tl.sqrt(tl.sum(centered * centered, axis=0) / (K - 1))
        adv = centered / (std + eps)
    elif MODE == 1:
        adv = centered
    else:
        adv = centered * (K / (K - 1.0))
    tl.store(out + group * K + offsets, adv, mask=valid)


def _group_advantages_triton(
    scores: torch.Tensor, group_size: int, estimator: str, eps: float
) -> torch.Tensor:
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    groups = scores.numel() // group_size
    if groups == 0:
        return out
    block = max(triton.next_power_of_2(group_size), 16)
    with device_guard(out):
        _group_advantages_kernel[(groups,)](
            scores.contiguous(), out, group_size, eps, MODE=_MODE[estimator], BLOCK=block, num_warps=1
        )
    return out


def check_group_args(scores: torch.Tensor, group_size: int, estimator: str, eps: float) -> None:
    check_float("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [groups * group_size], got shape {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size must be an int >= 2 (a baseline needs other samples), got {group_size!r}"
        )
    if scores.numel() % group_size:
        raise ValueError(f"scores has {scores.numel()} entries, not a multiple of group_size={group_size}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def group_advantages(
    scores: torch.Tensor, group_size: int, *, estimator: str = "grpo", eps: float = 1e-4
) -> torch.Tensor:
    """Per-sequence advantages [G * K] (fp32) of contiguous groups of ``group_size`` responses; see the module
    docstring for each ``estimator``'s formula. ``eps`` guards GRPO's division when a group's scores tie."""
    check_group_args(scores, group_size, estimator, eps)
    if use_triton(scores):
        return _group_advantages_triton(scores, group_size, estimator, float(eps))
    return group_advantages_reference(scores, group_size, estimator=estimator, eps=eps)


def group_advantages_reference(
    scores: torch.Tensor, group_size: int, *, estimator: str = "grpo", eps: float = 1e-4
) -> torch.Tensor:
    """The executable spec: the same formulas on a [G, K] view in PyTorch."""
    s = scores.float().view(-1, group_size)
    centered = s - s.mean(-1, keepdim=True)
    if estimator == "grpo":
        adv = centered / (s.std(-1, keepdim=True) + eps)
    elif estimator == "dr_grpo":
        adv = centered
    elif estimator == "rloo":
        adv = s - (s.sum(-1, keepdim=True) - s) / (group_size - 1)
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return adv.reshape(-1)
