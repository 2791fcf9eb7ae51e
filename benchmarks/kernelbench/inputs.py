"""Seeded input tensors of every op (device-agnostic: every factory takes the device)."""

from __future__ import annotations

import math

import torch

from .cases import DTYPES, Case


def _generator(device: torch.device | str, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def token_logprobs_inputs(
    n: int, v: int, dtype: torch.dtype, device: torch.device | str, *, requires_grad: bool, seed: int = 0
) -> dict[str, torch.Tensor]:
    """logits [N, V] (std 2, like a trained LM head's), ids [N] int64, upstream grad [N] fp32."""
    g = _generator(device, seed)
    logits = torch.randn((n, v), generator=g, device=device, dtype=dtype).mul_(2.0)  # no fp32 temporary
    ids = torch.randint(0, v, (n,), generator=g, device=device, dtype=torch.int64)
    grad = torch.randn((n,), generator=g, device=device, dtype=torch.float32)
    logits.requires_grad_(requires_grad)
    return {"logits": logits, "ids": ids, "grad": grad}


def linear_inputs(
    n: int,
    h: int,
    v: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    requires_grad: bool,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """hidden [N, H] ~ N(0, 1), weight [V, H] with std 2/sqrt(H) (logits of std ~2), ids [N], grad [N]."""
    g = _generator(device, seed)
    hidden = torch.randn((n, h), generator=g, device=device, dtype=dtype)
    weight = torch.randn((v, h), generator=g, device=device, dtype=dtype).mul_(2.0 / math.sqrt(h))
    ids = torch.randint(0, v, (n,), generator=g, device=device, dtype=torch.int64)
    grad = torch.randn((n,), generator=g, device=device, dtype=torch.float32)
    hidden.requires_grad_(requires_grad)
    weight.requires_grad_(requires_grad)
    return {"hidden": hidden, "weight": weight, "ids": ids, "grad": grad}


def rl_inputs(b: int, t: int, device: torch.device | str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every [B, T] tensor the RL ops take (fp32), a bool mask and per-sequence scores [B].

    The mask is right-padded: each row counts its first L tokens, L uniform in [T/4, T].
    """
    g = _generator(device, seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    logp = randn(b, t).mul_(0.5).sub_(2.0)  # sampled-token log-probs, around -2
    ref_logp = logp + randn(b, t).mul_(0.1)  # the reference model differs a little
    rewards, values = randn(b, t).mul_(0.1), randn(b, t)
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=g, device=device)
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    return {
        "rewards": rewards,
        "values": values,
        "mask": mask,
        "scores": randn(b),
        "logp": logp,
        "ref_logp": ref_logp,
        "x": randn(b, t).mul_(3.0).add_(1.0),
    }


def case_inputs(case: Case, device: torch.device | str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    d, grad = case.dims, case.mode == "fwd+bwd"
    if case.op == "token_logprobs":
        return token_logprobs_inputs(
            d["N"], d["V"], DTYPES[case.dtype], device, requires_grad=grad, seed=seed
        )
    if case.op == "linear_token_logprobs":
        dtype = DTYPES[case.dtype]
        return linear_inputs(d["N"], d["H"], d["V"], dtype, device, requires_grad=grad, seed=seed)
    return rl_inputs(d["B"], d["T"], device, seed=seed)


def upcast(inp: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Detached copies of the floating-point inputs in ``dtype`` (for the reference), the rest as is."""
    return {
        k: v.detach().to(dtype).requires_grad_(v.requires_grad) if v.is_floating_point() else v
        for k, v in inp.items()
    }
