"""Backend dispatch and argument checks shared by every op.

CUDA tensors run the Triton kernels. CPU tensors run the PyTorch path, unless ``TRITON_INTERPRET=1`` is set
(Triton's interpreter then runs the kernels on CPU, which is how CI tests the Triton code). The documented
override ``FASTRLHF_KERNELS=torch|triton`` forces one backend. Both are read at call time. Without Triton
installed (macOS, Windows) every op runs its PyTorch path, and forcing ``triton`` is an error.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from ._triton import HAS_TRITON

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should run its Triton kernels for these tensors."""
    override = os.environ.get("FASTRLHF_KERNELS", "").strip().lower()
    if override not in ("", "torch", "triton"):
        raise ValueError(f"FASTRLHF_KERNELS must be 'torch' or 'triton', got {override!r}")
    if override == "torch":
        return False
    if not HAS_TRITON:
        if override == "triton":
            raise ValueError(
                "FASTRLHF_KERNELS=triton, but triton is not installed (it ships for Linux; "
                "pip install triton): unset FASTRLHF_KERNELS or set it to 'torch'"
            )
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if override == "triton":
        if not (on_cuda or triton_interpreting()):
            raise ValueError("FASTRLHF_KERNELS=triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
        return True
    return on_cuda or triton_interpreting()


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s GPU the current device: Triton launches on the current device, not on the tensors' one.

    Cheap when it already is current (no device switch), a no-op for CPU tensors (the interpreter).
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_mask(name: str, mask: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Masks are bool or 0/1 of any numeric dtype, with the shape of ``ref``."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    check_same_shape(name, mask, ref_name, ref)


def check_temperature(temperature: float) -> float:
    """The temperature as a Python float, if it is finite and > 0."""
    if not (isinstance(temperature, int | float) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)
