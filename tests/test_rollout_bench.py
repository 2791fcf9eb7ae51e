"""`benchmarks/rollout.py --dry-run` on the CPU: the command line the GPU suite calls, every code path; and
its time-budget logic (priority order, skipped cells, a report after every cell)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"hf", "static", "paged"}


def test_rollout_benchmark_dry_run_writes_its_report(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--out", str(tmp_path), "--dry-run",
           "--time-budget-s", "60"]  # fmt: skip
    # The PyTorch kernels: the dry run checks the benchmark's wiring, the kernels have their own tests.
    env = os.environ | {"FASTRLHF_KERNELS": "torch"}
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=120, capture_output=True, env=env)
    (report_path,) = tmp_path.glob("rollout-cpu-*.json")
    assert report_path.with_suffix(".md").exists() and not list(tmp_path.glob("*.tmp"))
    report = json.loads(report_path.read_text())
    assert report["dry_run"] and report["complete"] and report["schema"] == "fastrlhf.rollout-bench/1"
    assert report["vllm"]["measured"] is False
    cells = report["result"]["generation"]
    assert {c["backend"] for c in cells} == BACKENDS
    for cell in cells:
        assert cell["status"] == "ok" and cell["ran_as"] == cell["backend"]
        assert cell["timed_calls"] >= 1 and cell["tokens_per_second"] > 0
        assert cell["generated_tokens"] == 4 * 6  # batch x new tokens (EOS suppressed)
    static = next(c for c in cells if c["backend"] == "static")
    assert static["kv_cache_gib"] > 0
    ppo = report["result"]["ppo_step"]
    assert {c["backend"] for c in ppo} == BACKENDS and all(c["status"] == "ok" for c in ppo)
    assert all(c["ratio_first_minibatch_max_dev"] == 0.0 for c in ppo)
    assert {"static", "paged"} == set(report["summary"]["ppo_step_speedup_vs_hf"])
    # The GPU suite reads {name: {pass, value, description}}; a dry run measures nothing, so no verdicts.
    targets = report["targets"]
    assert {"ppo_step_static_2x_hf", "static_4x_hf_tokens_per_s_tiny-b4"} <= set(targets)
    assert all(t["pass"] is None for t in targets.values())


def test_cells_run_in_priority_order_and_a_spent_budget_skips_the_rest(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import rollout as bench

    plan = bench.gpu_plan(("hf", "static", "paged"))
    jobs = [(kind, shape, backend) for kind, shape, _, backend in bench.jobs_in_priority_order(plan)]
    assert jobs[:4] == [("gen", "0.5b", "hf"), ("gen", "0.5b", "static")] * 2  # batch 64, then 256
    assert jobs[4:6] == [("ppo", "0.5b", "hf"), ("ppo", "0.5b", "static")]
    assert {j[1] for j in jobs[6:10]} == {"1.5b"} and all(j[2] == "paged" for j in jobs[10:])
    seen = []
    result = bench.run(bench.dry_plan(("hf", "static")), 0.0, on_cell=seen.append)
    assert seen == [] and len(result["generation"]) == 2 and len(result["ppo_step"]) == 2
    assert all(c["status"] == "skipped: time budget" for c in result["generation"] + result["ppo_step"])
    summary = bench.summarize(result)
    assert all(t["pass"] is None for t in bench.targets(summary, dry_run=False).values())
