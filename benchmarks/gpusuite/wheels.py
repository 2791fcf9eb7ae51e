"""Peers travel to the GPU machine as wheels (it has no network): install each stage's set into its own
folder with ``pip install --no-index --no-deps --target`` and put that folder on the stage's PYTHONPATH.

TRL 1.12 (the last release with a PPOTrainer, for the end-to-end comparison) and TRL >= 1.13 (the fused
log-prob kernels, for the kernel benchmark) cannot share one folder, hence one folder per stage.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Which distributions each folder gets (normalized wheel names); TRL is chosen by version. "common" goes on
# every stage's path: bitsandbytes is fastrlhf's default CUDA optimizer (paged 8-bit AdamW).
KERNEL_PEERS = ("liger_kernel", "cut_cross_entropy")
E2E_PEERS = ("datasets", "dill", "multiprocess")
TRL_E2E_VERSION = "1.12.0"


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # normalized: lower case, '-' and '.' as '_'
    version: str


def parse_wheel(path: Path) -> Wheel | None:
    """name and version from a wheel's file name (``name-version-...-platform.whl``)."""
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) < 5:
        return None
    return Wheel(path, re.sub(r"[-_.]+", "_", parts[0]).lower(), parts[1])


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:4])


def stage_wheels(wheel_dir: Path) -> dict[str, list[Wheel]]:
    """The wheels of each folder: ``kernels`` (newest TRL, Liger, CCE), ``e2e`` (TRL 1.12 and what its
    trainer imports) and ``common`` (every other wheel: bitsandbytes, ...)."""
    wheels = [w for p in sorted(wheel_dir.glob("*.whl")) if (w := parse_wheel(p))]
    trl = sorted((w for w in wheels if w.name == "trl"), key=lambda w: _version_key(w.version))
    trl_kernels = [w for w in trl if _version_key(w.version) >= (1, 13)][-1:]
    trl_e2e = [w for w in trl if w.version == TRL_E2E_VERSION][:1]
    return {
        "common": [w for w in wheels if w.name not in ("trl", *KERNEL_PEERS, *E2E_PEERS)],
        "kernels": trl_kernels + [w for w in wheels if w.name in KERNEL_PEERS],
        "e2e": trl_e2e + [w for w in wheels if w.name in E2E_PEERS],
    }


def install(wheels: list[Wheel], target: Path, timeout_s: float) -> dict[str, Any]:
    """``pip install --no-index --no-deps --target`` (offline); returns what was installed, or the error."""
    info: dict[str, Any] = {"dir": str(target), "wheels": {w.name: w.version for w in wheels}}
    if not wheels:
        info["status"] = "no wheels"
        return info
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(target)]
    try:
        proc = subprocess.run(
            [*cmd, *[str(w.path) for w in wheels]], capture_output=True, text=True, timeout=timeout_s
        )
        info["status"] = "ok" if proc.returncode == 0 else f"pip exit status {proc.returncode}"
        if proc.returncode != 0:
            info["error"] = (proc.stderr or proc.stdout)[-2000:]
    except subprocess.TimeoutExpired:
        info["status"] = f"pip timed out after {timeout_s:.0f} s"
    return info
