"""Measurements taken inside a worker process: resident memory and optimizer steps."""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path
from typing import Any


def rss_gib() -> float:
    """Current resident set size (Linux /proc), GiB; NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan


def peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


class OptimizerStepCounter:
    """Counts real optimizer steps per optimizer (a global torch hook, so it also sees TRL's optimizer under
    accelerate, whose wrapper skips ``step`` while it accumulates gradients)."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.counts: dict[int, int] = {}
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer: Any, *_: Any) -> None:
        self.counts[id(optimizer)] = self.counts.get(id(optimizer), 0) + 1

    def snapshot(self) -> dict[int, int]:
        return dict(self.counts)

    @staticmethod
    def per_optimizer(now: dict[int, int], before: dict[int, int]) -> int:
        """Steps each optimizer took between two snapshots (the most of any; they are equal in practice)."""
        return max((n - before.get(k, 0) for k, n in now.items()), default=0)
