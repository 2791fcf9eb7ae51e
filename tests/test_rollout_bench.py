"""`benchmarks/rollout.py --dry-run` on the CPU: the command line the GPU suite calls, every code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rollout_benchmark_dry_run_writes_its_report(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--out", str(tmp_path), "--dry-run",
           "--time-budget-s", "60"]  # fmt: skip
    # The PyTorch kernels: the dry run checks the benchmark's wiring, the kernels have their own tests.
    env = os.environ | {"FASTRLHF_KERNELS": "torch"}
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=120, capture_output=True, env=env)
    (report_path,) = tmp_path.glob("rollout-cpu-*.json")
    assert report_path.with_suffix(".md").exists()
    report = json.loads(report_path.read_text())
    assert report["dry_run"] and report["schema"] == "fastrlhf.rollout-bench/1"
    cells = report["result"]["generation"]
    assert {c["backend"] for c in cells} == {"hf", "static"}
    for cell in cells:
        assert cell["status"] == "ok" and cell["ran_as"] == cell["backend"]
        assert cell["timed_calls"] >= 1 and cell["tokens_per_second"] > 0
        assert cell["generated_tokens"] == 4 * 6  # batch x new tokens (min_new_tokens = max_new_tokens)
    static = next(c for c in cells if c["backend"] == "static")
    assert static["kv_cache_gib"] > 0
    ppo = report["result"]["ppo_step"]
    assert [c["status"] for c in ppo] == ["ok", "ok"]
    assert all(c["ratio_first_minibatch_max_dev"] == 0.0 for c in ppo)
    assert "static" in report["summary"]["ppo_step_speedup_vs_hf"]
    # The GPU suite reads {name: {pass, value, description}}; a dry run measures nothing, so no verdicts.
    targets = report["targets"]
    assert {"ppo_step_static_2x_hf", "static_4x_hf_tokens_per_s_tiny-b4"} <= set(targets)
    assert all(t["pass"] is None for t in targets.values())
