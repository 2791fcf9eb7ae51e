"""Plumbing tests of the end-to-end PPO benchmark (e2e_ppo.py) and the fit table (fit_table.py), both in e2e/.

A tiny CPU run of fastrlhf (and of TRL 1.12's PPOTrainer when it is importable) for 2 PPO steps each, checked
field by field; TRL's phase bookkeeping on synthetic events; the "TRL not installed" path; and
``fit_table.py --dry-run``. The PyTorch kernel path is forced (the Triton interpreter is slow).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from e2e import compare, fit
from e2e.environment import trl_available
from e2e.trl_timing import trl_phases

TRL_OK, _ = trl_available()
TINY = ["--scale", "tiny", "--steps", "2", "--repeats", "1", "--batch", "4", "--micro-batch", "2"]
TINY += ["--num-minibatches", "2", "--ppo-epochs", "1", "--prompt-len", "8", "--response-len", "4"]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTRLHF_KERNELS", "torch")  # read by the worker subprocesses too


def _check_system(rep: dict[str, Any], response_len: int) -> None:
    assert rep["status"] == "ok", rep.get("error")
    assert len(rep["steps"]) == 2
    s = rep["summary"]
    assert s["measured_steps"] == 1 and s["warmup_steps_excluded"] == 1
    med = s["median"]
    for key in ("wall_s", "generate_s", "score_s", "update_s"):
        assert med[key] is not None and med[key] > 0, key
    assert med["optimizer_steps"] == 2  # 1 epoch x 2 minibatches, for each optimizer
    assert s["tokens_per_second"] > 0 and s["tokens_per_step"] == 4 * (8 + response_len)
    assert s["peak_memory_gib"] > 0 and s["peak_memory_kind"] == "peak_rss"


def test_e2e_tiny_cpu(tmp_path: Path) -> None:
    systems = "fastrlhf,trl" if TRL_OK else "fastrlhf"
    report = compare.main([*TINY, "--systems", systems, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / report["files"]["json"]).read_text())
    assert saved["schema"] == compare.SCHEMA
    assert saved["device"]["type"] == "cpu"
    for pkg in ("torch", "transformers", "trl", "fastrlhf"):
        assert pkg in saved["versions"]
    assert saved["versions"]["fastrlhf"] is not None
    assert (
        saved["date"] and saved["config"]["response_len"] == 4 and saved["config"]["rollout_batch_size"] == 4
    )
    assert any("noisy" in n for n in saved["notes"])
    fa = saved["systems"]["fastrlhf"]
    _check_system(fa, 4)
    assert all(r["response_length"] == 4 and r["eos_rate"] == 0 for r in fa["steps"])
    if TRL_OK:
        trl = saved["systems"]["trl"]
        _check_system(trl, 4)
        # the fixed generation length: every TRL rollout is 4 tokens, none of them EOS or padding
        assert all(
            r["response_len"] == 4 and r["eos_tokens"] == 0 and r["pad_tokens"] == 0 for r in trl["steps"]
        )
        assert saved["ratios"]["step_time_trl_over_fastrlhf"] > 0
        assert saved["ratios"]["peak_memory_trl_over_fastrlhf"] > 0
    md = (tmp_path / report["files"]["markdown"]).read_text()
    assert "| fastrlhf | ok |" in md


def test_e2e_without_trl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compare, "trl_available", lambda: (False, "trl is not installed (test)"))
    report = compare.main([*TINY, "--systems", "trl", "--out", str(tmp_path)])
    assert report["systems"]["trl"] == {"status": "skipped", "reason": "trl is not installed (test)"}
    assert "ratios" not in report
    assert "skipped: trl is not installed (test)" in (tmp_path / report["files"]["markdown"]).read_text()


def test_trl_phases_from_events() -> None:
    events = [
        ("train_begin", 0.0),
        ("gen_start", 0.1),
        ("gen_end", 1.1),
        ("score_call_end", 1.3),
        ("score_call_end", 1.5),
        ("train_start", 1.7),
        ("log", 2.7),
        ("step_end", 2.8),
        ("gen_start", 3.0),
        ("gen_end", 3.5),
        ("score_call_end", 3.6),
        ("train_start", 3.8),
        ("log", 4.0),
        ("step_end", 4.1),
    ]
    steps = trl_phases(events, [("gc", 1.6, 0.1), ("gc", 2.9, 0.05), ("empty_cache", 3.7, 0.01)])
    assert len(steps) == 2
    first, second = steps
    assert first["wall_s"] == pytest.approx(2.8)
    assert first["generate_s"] == pytest.approx(1.0)
    assert first["score_s"] == pytest.approx(0.4)
    assert first["advantages_s"] == pytest.approx(0.2)
    assert first["update_s"] == pytest.approx(1.0)
    assert first["other_s"] == pytest.approx(0.2)
    assert first["gc_s"] == pytest.approx(0.1)
    assert second["wall_s"] == pytest.approx(1.3)
    assert second["gc_s"] == pytest.approx(0.05) and second["empty_cache_s"] == pytest.approx(0.01)


def test_fit_table_dry_run(tmp_path: Path) -> None:
    report = fit.main(["--dry-run", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / report["files"]["json"]).read_text())
    assert saved["schema"] == fit.SCHEMA and saved["dry_run"] is True
    assert saved["caps"] == ["none"]
    (row,) = saved["rows"]
    assert (row["size"], row["config"]) == ("tiny", "fastrlhf-full")
    cell = row["cells"]["none"]
    assert cell["status"] == "fits", cell.get("error")
    assert cell["steps_completed"] == 2 and cell["median_step_s"] > 0 and cell["peak_rss_gib"] > 0
    assert (tmp_path / report["files"]["png"]).stat().st_size > 0
    assert "| tiny | fastrlhf-full | fits" in (tmp_path / report["files"]["markdown"]).read_text()
