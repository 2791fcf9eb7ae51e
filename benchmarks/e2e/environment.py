"""Where and with what a result was measured: device, package versions, date; whether TRL can run."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

TRL_VERSION = "1.12.0"  # the release whose trl.experimental.ppo.PPOTrainer the TRL driver is written for
PACKAGES = ("torch", "transformers", "trl", "fastrlhf", "peft", "accelerate", "datasets", "bitsandbytes")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def trl_available() -> tuple[bool, str]:
    """Whether TRL's experimental PPOTrainer can be imported (and why not), without importing TRL here."""
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        return False, f"trl is not installed (pip install trl=={TRL_VERSION})"
    if not (Path(spec.origin).parent / "experimental" / "ppo" / "ppo_trainer.py").exists():
        version = importlib.metadata.version("trl")
        return False, f"trl {version} has no trl.experimental.ppo (PPOTrainer); use trl=={TRL_VERSION}"
    return True, ""


def device_info() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": props.name,
            "total_memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda,
        }
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"type": "cpu", "name": name, "cpu_count": os.cpu_count(), "torch_threads_per_worker": None}


def device_slug(dev: dict[str, Any]) -> str:
    """The device part of result file names: "cpu", or the GPU's name in lower-case words."""
    if dev["type"] == "cpu":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in dev["name"].lower()).strip("-").replace("--", "-")


def report_header(schema: str, dev: dict[str, Any]) -> dict[str, Any]:
    """The fields every result file starts with."""
    return {
        "schema": schema,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": dev,
        "versions": versions(),
    }
