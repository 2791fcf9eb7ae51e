"""Triton when it is installed, a stand-in when it is not.

Triton ships for Linux only. On macOS or Windows ``import fastrlhf.kernels`` must still work and every op
runs its PyTorch path, so the kernel modules import ``triton`` and ``tl`` from here: without Triton,
``@triton.jit`` still decorates (the kernel just cannot be launched) and any other use raises a clear
ModuleNotFoundError.
"""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests that hide triton
    HAS_TRITON = False

    _MISSING = "triton is not installed (it ships for Linux); fastrlhf.kernels runs its PyTorch paths"

    class _Missing:
        def __getattr__(self, name: str) -> Any:
            raise ModuleNotFoundError(_MISSING)

    class _Unlaunchable:
        """What ``@triton.jit`` leaves behind without Triton: the Python function, never launchable."""

        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            raise ModuleNotFoundError(_MISSING)

    class _NoTriton(_Missing):
        @staticmethod
        def jit(fn: Any = None, **_: Any) -> Any:
            if fn is None:
                return _Unlaunchable
            return _Unlaunchable(fn)

    triton = _NoTriton()  # type: ignore[assignment]
    tl = _Missing()  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "tl", "triton"]
