"""The ops under test: importing ``fastrlhf.kernels`` from this checkout, finding each op's public function
and PyTorch reference, calling the RL ops, and comparing outputs."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]

# Hyperparameters used by every benchmark of the RL ops (typical InstructGPT-style PPO values).
GAMMA = 1.0
LAM = 0.95
KL_COEF = 0.05

# The module inside fastrlhf.kernels of the ops not in a module of their own name; each op's reference is
# <op>_reference in its module.
OP_MODULES = {"masked_whiten": "whiten", "ppo_advantages": "shape_rewards"}


@functools.cache
def ensure_fastrlhf_importable() -> str:
    """Make ``fastrlhf.kernels`` importable from this checkout; returns how it was found (never raises).

    Installed (``pip install -e .``): used as is. Not installed (a bare copy of the repository, as on a lent
    GPU machine): ``fastrlhf`` comes from ROOT/fastrlhf and ``fastrlhf.kernels`` is mapped onto ROOT/kernels
    the way pyproject.toml's package-dir maps it. Cached: after the mapping, a second import would look
    installed.
    """
    try:
        import fastrlhf.kernels as kernels

        return f"installed: {kernels.__file__}"
    except ImportError:
        pass
    try:
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
    except Exception as e:  # recorded; every fastrlhf/eager provider then reports the import error
        return f"failed: {type(e).__name__}: {e}"


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
    fns = OpFns(op, None, None)
    try:
        fns.fn = getattr(importlib.import_module("fastrlhf.kernels"), op)
    except Exception as e:
        fns.fn_error = f"{type(e).__name__}: {e}"
    ref_name = f"{op}_reference"
    try:
        module = importlib.import_module(f"fastrlhf.kernels.{OP_MODULES.get(op, op)}")
        fns.reference = getattr(module, ref_name)
        fns.reference_name = ref_name
    except Exception as e:
        fns.reference_error = f"{type(e).__name__}: {e}"
    return fns


def rl_arguments(
    op: str, x: dict[str, torch.Tensor], estimator: str | None
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Positional and keyword arguments of an RL op (or its reference) on the tensors of ``rl_inputs``."""
    kl = {"kl_coef": KL_COEF, "estimator": estimator}
    gae = {"gamma": GAMMA, "lam": LAM}
    if op == "gae":
        return (x["rewards"], x["values"], x["mask"]), gae
    if op == "kl_penalty":
        return (x["logp"], x["ref_logp"]), {"estimator": estimator}
    if op == "masked_whiten":
        return (x["x"], x["mask"]), {}
    if op == "shape_rewards":
        return (x["scores"], x["logp"], x["ref_logp"], x["mask"]), kl
    if op == "ppo_advantages":
        return (x["scores"], x["logp"], x["ref_logp"], x["values"], x["mask"]), {**kl, **gae, "whiten": True}
    raise ValueError(op)


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
