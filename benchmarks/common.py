"""Shared pieces of the kernel benchmarks: op resolution, input factories, byte/FLOP models, error metrics.

Used by ``benchmarks/gpu_kernels.py`` (the GPU benchmark script) and ``benchmarks/test_bench_kernels.py``
(the CPU pytest-benchmark suite). Both load this file by path under a private module name, so nothing here
may rely on being importable as ``common``. Device-agnostic: every factory takes the device.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def ensure_fastrlhf_importable() -> str:
    """Make ``fastrlhf.kernels`` importable from this checkout; returns how it was found.

    Installed (``pip install -e .``): used as is. Not installed (a bare copy of the repository, as on a lent
    GPU machine): ``fastrlhf`` comes from ROOT/fastrlhf and ``fastrlhf.kernels`` is mapped onto ROOT/kernels
    the way pyproject.toml's package-dir maps it.
    """
    try:
        import fastrlhf.kernels as kernels

        return f"installed: {kernels.__file__}"
    except ImportError:
        pass
    for name in [n for n in sys.modules if n == "fastrlhf" or n.startswith("fastrlhf.")]:
        del sys.modules[name]
    sys.path.insert(0, str(ROOT))
    import fastrlhf

    spec = importlib.util.spec_from_file_location(
        "fastrlhf.kernels",
        ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "kernels")],
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {ROOT / 'kernels'} as fastrlhf.kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastrlhf.kernels"] = module
    spec.loader.exec_module(module)
    fastrlhf.kernels = module  # type: ignore[attr-defined]
    return f"from the checkout (not installed): {ROOT / 'kernels'}"


# op -> (module inside fastrlhf.kernels, public name, reference names to try in order)
OPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "token_logprobs": ("token_logprobs", "token_logprobs", ("token_logprobs_reference",)),
    "linear_token_logprobs": (
        "linear_token_logprobs",
        "linear_token_logprobs",
        ("linear_token_logprobs_reference",),
    ),
    "kl_penalty": ("kl_penalty", "kl_penalty", ("kl_penalty_reference",)),
    "gae": ("gae", "gae", ("gae_reference",)),
    "masked_whiten": ("whiten", "masked_whiten", ("masked_whiten_reference",)),
    "shape_rewards": ("shape_rewards", "shape_rewards", ("shape_rewards_reference",)),
    "ppo_advantages": ("shape_rewards", "ppo_advantages", ("ppo_advantages_reference",)),
}

# Hyperparameters used by every benchmark of the RL ops (typical InstructGPT-style PPO values).
GAMMA = 1.0
LAM = 0.95
KL_COEF = 0.05


@dataclass
class OpFns:
    """The public op and its PyTorch reference, or why one of them is missing."""

    op: str
    fn: Callable[..., Any] | None
    reference: Callable[..., Any] | None
    fn_error: str | None = None
    reference_error: str | None = None
    reference_name: str | None = None


def resolve_op(op: str) -> OpFns:
    """Import ``fastrlhf.kernels.<op>`` and its reference; never raises (errors are returned as text)."""
    module_name, public, ref_names = OPS[op]
    fn: Callable[..., Any] | None = None
    fn_error: str | None = None
    try:
        kernels = importlib.import_module("fastrlhf.kernels")
        fn = getattr(kernels, public)
    except Exception as e:  # a module that is still a placeholder or fails to import
        fn_error = f"{type(e).__name__}: {e}"
    reference: Callable[..., Any] | None = None
    ref_error: str | None = None
    ref_name: str | None = None
    try:
        module = importlib.import_module(f"fastrlhf.kernels.{module_name}")
        for name in ref_names:
            if hasattr(module, name):
                reference, ref_name = getattr(module, name), name
                break
        else:
            ref_error = f"none of {ref_names} in fastrlhf.kernels.{module_name}"
    except Exception as e:
        ref_error = f"{type(e).__name__}: {e}"
    return OpFns(op, fn, reference, fn_error, ref_error, ref_name)


def is_placeholder(fn: Callable[..., Any] | None) -> bool:
    """True for the not-yet-written stubs (their module docstring starts with PLACEHOLDER)."""
    if fn is None:
        return True
    module = importlib.import_module(fn.__module__)
    return (module.__doc__ or "").lstrip().startswith("PLACEHOLDER")


# ------------------------------------------------------------------------------------------- inputs


def _gen(device: torch.device | str, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def token_logprobs_inputs(
    n: int, v: int, dtype: torch.dtype, device: torch.device | str, *, requires_grad: bool, seed: int = 0
) -> dict[str, torch.Tensor]:
    """logits [N, V] (std 2, like a trained LM head's), ids [N] int64, upstream grad [N] fp32."""
    g = _gen(device, seed)
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
    g = _gen(device, seed)
    hidden = torch.randn((n, h), generator=g, device=device, dtype=dtype)
    weight = torch.randn((v, h), generator=g, device=device, dtype=dtype).mul_(2.0 / math.sqrt(h))
    ids = torch.randint(0, v, (n,), generator=g, device=device, dtype=torch.int64)
    grad = torch.randn((n,), generator=g, device=device, dtype=torch.float32)
    hidden.requires_grad_(requires_grad)
    weight.requires_grad_(requires_grad)
    return {"hidden": hidden, "weight": weight, "ids": ids, "grad": grad}


def response_mask(b: int, t: int, device: torch.device | str, g: torch.Generator) -> torch.Tensor:
    """Right-padded bool mask [B, T]: each row counts its first L tokens, L uniform in [T/4, T]."""
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=g, device=device)
    return torch.arange(t, device=device)[None, :] < lengths[:, None]


def rl_inputs(b: int, t: int, device: torch.device | str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every [B, T] tensor the RL ops take (fp32), a bool mask and per-sequence scores [B]."""
    g = _gen(device, seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    logp = randn(b, t).mul_(0.5).sub_(2.0)  # sampled-token log-probs, around -2
    ref_logp = logp + randn(b, t).mul_(0.1)  # the reference model differs a little
    return {
        "rewards": randn(b, t).mul_(0.1),
        "values": randn(b, t),
        "mask": response_mask(b, t, device, g),
        "scores": randn(b),
        "logp": logp,
        "ref_logp": ref_logp,
        "x": randn(b, t).mul_(3.0).add_(1.0),
    }


# -------------------------------------------------------------------------------- byte/FLOP models

BYTE_MODELS: dict[str, str] = {
    "token_logprobs": (
        "fwd: read logits N*V*s + ids N*8, write logp N*4 (+ entropy N*4); "
        "fwd+bwd: fwd + read logits again N*V*s + read grad N*4 + write dlogits N*V*s "
        "(= 3*N*V*s dominant; s = logits dtype size)"
    ),
    "linear_token_logprobs": (
        "GEMM-bound: bytes not modelled. FLOPs: fwd 2*N*H*V (logits GEMM); fwd+bwd 8*N*H*V "
        "(forward GEMM + recompute GEMM + dhidden GEMM + dweight GEMM), the same count for every provider "
        "so TFLOP/s ranks like time"
    ),
    "kl_penalty": "read logp, ref_logp (fp32), write kl (fp32): 12*B*T",
    "gae": "read rewards, values (fp32) and mask (bool, 1 B), write advantages, returns (fp32): 17*B*T",
    "masked_whiten": "read x (fp32) and mask (1 B) once, write out (fp32) once: 9*B*T",
    "shape_rewards": "read logp, ref_logp (fp32), mask (1 B), scores B*4, write rewards (fp32): 13*B*T + 4*B",
    "ppo_advantages": (
        "read logp, ref_logp, values (fp32), mask (1 B), scores B*4, write advantages, returns, rewards, kl "
        "(fp32): 29*B*T + 4*B"
    ),
}


def token_logprobs_bytes(n: int, v: int, elem: int, mode: str, entropy: bool = False) -> int:
    fwd = n * v * elem + n * 8 + n * 4 + (n * 4 if entropy else 0)
    if mode == "fwd":
        return fwd
    return fwd + n * v * elem + n * 4 + n * v * elem


def linear_flops(n: int, h: int, v: int, mode: str) -> int:
    return (2 if mode == "fwd" else 8) * n * h * v


def rl_bytes(op: str, b: int, t: int) -> int:
    per_token = {"kl_penalty": 12, "gae": 17, "masked_whiten": 9, "shape_rewards": 13, "ppo_advantages": 29}
    extra = 4 * b if op in ("shape_rewards", "ppo_advantages") else 0
    return per_token[op] * b * t + extra


# ----------------------------------------------------------------------------------------- errors


def error_stats(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |out - ref| and ||out - ref|| / ||ref||, in float64; NaN/inf anywhere reads as inf."""
    a = out.detach().to(torch.float64)
    b = ref.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}")
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        return {"max_abs_err": math.inf, "rel_l2_err": math.inf}
    diff = a - b
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    denom = float(b.norm())
    rel = float(diff.norm()) / denom if denom > 0 else float(diff.norm())
    return {"max_abs_err": max_abs, "rel_l2_err": rel}
