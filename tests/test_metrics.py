"""MetricsLogger's JSON Lines record, its optional mirrors, and the summary plot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types

import pytest
import torch

from fastrlhf.metrics import MetricsLogger, _series, plot_metrics, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_log_writes_one_flushed_json_line_per_call(tmp_path):
    with MetricsLogger(tmp_path / "run", tensorboard=False) as log:
        log.log("sft", 1, {"loss": 2.5})
        # Flushed at once: readable while the run is still going.
        first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
        assert first["phase"] == "sft" and first["step"] == 1 and first["loss"] == 2.5
        assert isinstance(first["time"], float)
        log.log("rm", 3, {"loss": torch.tensor(0.5), "accuracy": 1, "bad": float("nan")})
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["phase"], r["step"]) for r in records] == [("sft", 1), ("rm", 3)]
    assert records[1]["loss"] == 0.5 and records[1]["accuracy"] == 1.0
    assert records[1]["bad"] is None  # NaN is not JSON
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_log_appends_across_runs_and_rejects_reserved_names(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log("ppo", 1, {"reward": 0.1})
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log("ppo", 2, {"reward": 0.2})
        with pytest.raises(ValueError, match="step"):
            log.log("ppo", 3, {"step": 1.0})
    assert [r["reward"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0.1, 0.2]
    with pytest.raises(RuntimeError, match="close"):
        log.log("ppo", 4, {"reward": 0.3})


def test_read_metrics_ignores_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"phase": "sft", "step": 1, "time": 0, "loss": 1}\n{"phase": "sft", "st')
    assert read_metrics(path) == [{"phase": "sft", "step": 1, "time": 0, "loss": 1}]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_true_without_package_fails_clearly(tmp_path):
    with pytest.raises(ImportError, match="tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)
    MetricsLogger(tmp_path, tensorboard=None).close()  # None: quietly skipped


def test_wandb_only_when_asked_and_one_x_axis_per_phase(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class Run:
        def define_metric(self, name, **kw):
            calls.append(("define", name, kw))

        def log(self, data):
            calls.append(("log", data))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, tensorboard=False) as log:  # installed, but not asked for: unused
        log.log("sft", 1, {"loss": 1.0})
    assert calls == []
    with MetricsLogger(tmp_path, run_name="r1", tensorboard=False, wandb=True) as log:
        log.log("sft", 1, {"loss": 1.0})
        log.log("sft", 2, {"loss": 0.5})
    assert calls[0] == ("init", {"project": "fastrlhf", "name": "r1", "dir": str(tmp_path)})
    assert calls[1:3] == [("define", "sft/step", {}), ("define", "sft/*", {"step_metric": "sft/step"})]
    assert calls[3:] == [
        ("log", {"sft/step": 1, "sft/loss": 1.0}),
        ("log", {"sft/step": 2, "sft/loss": 0.5}),
        ("finish",),
    ]


def test_series_lets_a_resumed_run_replace_the_abandoned_tail():
    records = [
        {"phase": "ppo", "step": s, "reward": float(s)}
        for s in (1, 2, 3, 4)  # crashed after step 4
    ] + [{"phase": "ppo", "step": s, "reward": 10.0 + s} for s in (3, 4, 5)]  # resumed from step 2
    records.append({"phase": "ppo", "step": 6, "reward": None})
    steps, values = _series(records, "ppo", "reward")
    assert steps == [1, 2, 3, 4, 5, 6]
    assert values[:5] == [1.0, 2.0, 13.0, 14.0, 15.0] and math.isnan(values[5])


def test_plot_metrics_writes_a_png_of_the_present_metrics(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(60):
            log.log("sft", step, {"loss": 3.0 / (step + 1)})
            log.log("ppo", step, {"reward": step * 0.1, "kl": 0.01 * step, "unplotted": 1.0})
        log.log("rm", 0, {"loss": 0.7, "accuracy": 0.5})
    png = tmp_path / "plots" / "metrics.png"
    drawn = plot_metrics(tmp_path / "metrics.jsonl", png)
    assert drawn == ["sft/loss", "rm/loss", "rm/accuracy", "ppo/reward", "ppo/kl"]
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "one.png", keys={"ppo": ["unplotted"]}) == [
        "ppo/unplotted"
    ]
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_metrics_with_nothing_to_plot_still_writes_a_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "empty.png") == []
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC
