"""Training metrics: one JSON Lines file that is always written, optional mirrors, and a summary plot.

``metrics.jsonl`` is the record of truth: one line ``{"phase", "step", "time", <metric>: value, ...}`` per
``log`` call, flushed at once so a crash loses nothing and ``tail -f`` works during a run. It needs no extra
package, so every run can be plotted and compared afterwards with :func:`plot_metrics`.

TensorBoard and Weights & Biases mirror the same values as ``<phase>/<metric>``. TensorBoard is used when the
``tensorboard`` package is installed (``tensorboard=None``), always (``True``, failing if missing) or never
(``False``). W&B is used only when asked for with ``wandb=True``: starting it may prompt for a login or upload
data, which nothing should do unasked.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

RESERVED_KEYS = ("phase", "step", "time")

DEFAULT_PLOT_KEYS: dict[str, list[str]] = {
    "sft": ["loss", "eval_loss"],
    "rm": ["loss", "accuracy", "eval_loss", "eval_accuracy"],
    "ppo": [
        "reward",
        "gold_reward",
        "kl",
        "entropy",
        "approx_kl",
        "clipfrac",
        "value_loss",
        "policy_loss",
        "response_length",
    ],
}
"""The metrics :func:`plot_metrics` draws by default, per phase; those absent from the log are skipped."""


class MetricsLogger:
    """Append metrics to ``out_dir/metrics.jsonl`` and mirror them to TensorBoard / W&B when enabled.

    Use as a context manager (or call :meth:`close`). Appending, not truncating, keeps the log of a resumed
    run in one file; :func:`plot_metrics` lets a resumed run's points replace the abandoned ones.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        run_name: str = "run",
        tensorboard: bool | None = None,
        wandb: bool | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        from fastrlhf.distributed import is_main

        if not is_main():  # under torchrun rank 0 alone records; every logged value is already global
            self.path, tensorboard, wandb = Path(os.devnull), False, False
        self._file: Any = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb: Any = None
        self._wandb: Any = None
        self._wandb_phases: set[str] = set()
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
            except ImportError:
                if tensorboard:
                    self.close()
                    raise ImportError("tensorboard=True needs the `tensorboard` package") from None
            else:
                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard" / run_name))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                self.close()
                raise ImportError("wandb=True needs the `wandb` package") from None
            self._wandb = wandb_module.init(project="fastrlhf", name=run_name, dir=str(self.out_dir))

    def log(self, phase: str, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` of ``phase`` (e.g. "sft", "rm", "ppo") at ``step``.

        Values may be Python numbers or one-element tensors. Non-finite values are written as ``null`` so the
        file stays strict JSON (``NaN`` is not JSON), and show as gaps in plots.
        """
        if self._file is None:
            raise RuntimeError("MetricsLogger.log called after close()")
        clash = [k for k in metrics if k in RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric names {clash} clash with the record keys {RESERVED_KEYS}")
        values = {k: float(v) for k, v in metrics.items()}
        record: dict[str, Any] = {"phase": phase, "step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{phase}/{k}", v, global_step=int(step), walltime=record["time"])
        if self._wandb is not None:
            if phase not in self._wandb_phases:
                # Phases count steps from 0 independently; W&B's global step must only grow, so each
                # phase gets its own x-axis instead.
                self._wandb.define_metric(f"{phase}/step")
                self._wandb.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
                self._wandb_phases.add(phase)
            self._wandb.log({f"{phase}/step": int(step), **{f"{phase}/{k}": v for k, v in values.items()}})

    def close(self) -> None:
        """Flush and close every backend; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``, in file order.

    A truncated last line (the process was killed mid-write) is ignored rather than failing the read.
    """
    records = []
    with open(jsonl_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return records


def _series(records: list[dict[str, Any]], phase: str, key: str) -> tuple[list[int], list[float]]:
    """Step/value points of one metric, a resumed run's points replacing those logged after its checkpoint."""
    points: list[tuple[int, float]] = []
    for r in records:
        if r.get("phase") != phase or key not in r:
            continue
        step = int(r["step"])
        while points and points[-1][0] >= step:  # the step went back: the run resumed from a checkpoint
            points.pop()
        v = r[key]
        points.append((step, math.nan if v is None else float(v)))
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(
    jsonl_path: str | Path, png_path: str | Path, *, keys: dict[str, list[str]] | None = None
) -> list[str]:
    """Draw one subplot per ``phase/metric`` present in the log into one PNG; returns the names drawn.

    ``keys`` maps a phase to the metrics to draw (default :data:`DEFAULT_PLOT_KEYS`); absent ones are
    skipped. Long, noisy curves (RL rewards) get a moving average over the raw points.
    """
    # The object-oriented API with the Agg canvas needs no display and leaves pyplot's global state alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(jsonl_path)
    wanted = DEFAULT_PLOT_KEYS if keys is None else keys
    panels = []
    for phase, names in wanted.items():
        for name in names:
            steps, values = _series(records, phase, name)
            if steps:
                panels.append((f"{phase}/{name}", steps, values))
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, f"no metrics to plot in {Path(jsonl_path).name}", ha="center", va="center")
    for i, (title, steps, values) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        window = len(values) // 20
        if window >= 2:
            ax.plot(steps, values, alpha=0.3, linewidth=0.8, color="C0")
            ax.plot(steps[window - 1 :], _moving_average(values, window), linewidth=1.5, color="C0")
        else:
            ax.plot(steps, values, marker="." if len(values) < 30 else None, color="C0")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return [title for title, _, _ in panels]


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points, skipping NaNs (an all-NaN window gives NaN, i.e. a gap)."""
    import numpy as np  # a matplotlib dependency

    v = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(v)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, v, 0.0), kernel, mode="valid")
    counts = np.convolve(ok.astype(np.float64), kernel, mode="valid")
    with np.errstate(invalid="ignore", divide="ignore"):
        return list(sums / counts)
