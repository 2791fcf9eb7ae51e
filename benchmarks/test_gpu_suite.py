"""The one GPU script (gpu_suite.py, code in gpusuite/) on a CPU: its dry run end to end (every stage at tiny
sizes, a peer wheel installed offline onto every stage's path), the refusal without CUDA, and the pieces
whose mistakes a dry run would not show (time shares, wheel selection, reading results back, the kill of a
stage past its budget)."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from gpusuite import cli, stages, summary, wheels

STAGE_NAMES = [s.name for s in stages.STAGES]


def _make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel with one module ``name`` (VERSION = version), valid for pip."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path


def test_dry_run_every_stage(tmp_path: Path) -> None:
    """Every stage runs on the CPU, the summary lists each stage and every kernel target, the archive holds
    each stage's own reports, and a wheel from --wheels is installed and on each stage's path."""
    _make_wheel(tmp_path / "whl", "fastrlhf_suite_probe", "0.3")
    out = tmp_path / "out"
    args = ["--dry-run", "--out", str(out), "--wheels", str(tmp_path / "whl"), "--kernel-ops", "kl_penalty"]
    assert cli.main(args) == 0
    (summary_path,) = out.glob("gpu-suite-cpu-*-dryrun.json")
    report = json.loads(summary_path.read_text())
    assert report["schema"] == summary.SCHEMA and report["run_mode"] == "dry-run"
    by_name = {s["name"]: s for s in report["stages"]}
    assert list(by_name) == STAGE_NAMES
    expected = {"tests": "ok", "kernels": "ok", "e2e": "ok", "compile": "ok"}
    expected["rollout"] = "ok" if stages.ROLLOUT.exists() else "absent"
    assert {k: v["status"] for k, v in by_name.items()} == expected, by_name
    assert by_name["tests"]["summary"]["counts"].get("skipped", 0) > 0  # no CUDA: the cuda tests skip
    assert by_name["e2e"]["summary"]["systems"]["fastrlhf"]["status"] == "ok"
    kernel_targets = {t["target"] for t in report["targets"] if t["stage"] == "kernels"}
    from kernelbench.targets import TARGETS_DOC

    assert kernel_targets == set(TARGETS_DOC.values())
    assert by_name["kernels"]["summary"]["fastrlhf_correctness"]["ok"] > 0
    assert report["env"]["peers"]["common"]["status"] == "ok"
    assert by_name["tests"]["peers"] == {"fastrlhf_suite_probe": "0.3"}
    with tarfile.open(out / report["env"]["archive"]) as tar:
        names = tar.getnames()
    patterns = {"kernels": "kernels-cpu-", "e2e": "e2e-ppo-tiny-", "compile": "quick-compile"}
    for stage, pattern in patterns.items():
        assert any(n.startswith(f"{stage}/") and pattern in n and n.endswith(".json") for n in names), names
    md = (out / summary_path.name.replace(".json", ".md")).read_text()
    assert "## Targets" in md and "Dry run on a CPU" in md and "| kernels | ok |" in md
    assert len(list(out.iterdir())) <= 8  # what the device machine returns from $OUT


def test_refuses_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--out", "/nonexistent"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_stage_budgets_share_the_deadline() -> None:
    by_name = {s.name: s for s in stages.STAGES}
    later = [by_name[n] for n in ("kernels", "e2e", "rollout", "compile")]
    # enough time: each stage gets its cap's share (the optional compile stage claims nothing ahead)
    total = sum(s.cap_s for s in stages.STAGES if s.name not in stages.OPTIONAL_STAGES)
    assert cli.stage_budget(by_name["tests"], total, later) == pytest.approx(by_name["tests"].cap_s)
    # half the time: half of each cap; never more than 1.25x the cap however much is left
    assert cli.stage_budget(by_name["tests"], total / 2, later) == pytest.approx(by_name["tests"].cap_s / 2)
    assert cli.stage_budget(by_name["rollout"], 10_000, []) == pytest.approx(1.25 * by_name["rollout"].cap_s)
    assert cli.stage_budget(by_name["compile"], 100, []) == pytest.approx(95)


def test_stage_wheels_split_trl_versions(tmp_path: Path) -> None:
    for name in [
        "trl-1.12.0-py3-none-any.whl",
        "trl-1.16.0-py3-none-any.whl",
        "trl-1.15.0-py3-none-any.whl",
        "liger_kernel-0.8.5-py3-none-any.whl",
        "cut_cross_entropy-25.1.1-py3-none-any.whl",
        "datasets-5.2.0-py3-none-any.whl",
        "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
    ]:
        (tmp_path / name).touch()
    split = {k: sorted(f"{w.name}=={w.version}" for w in v) for k, v in wheels.stage_wheels(tmp_path).items()}
    assert split == {
        "common": ["bitsandbytes==0.50.2"],
        "kernels": ["cut_cross_entropy==25.1.1", "liger_kernel==0.8.5", "trl==1.16.0"],
        "e2e": ["datasets==5.2.0", "trl==1.12.0"],
    }


def test_read_tests_counts_a_partial_log() -> None:
    log = "\n".join(
        [
            "tests/test_gae.py::test_gae_cuda[2049] PASSED                 [ 10%]",
            "tests/test_gae.py::test_gae_cuda[31] FAILED                   [ 20%]",
            "tests/test_whiten.py::test_whiten_cuda SKIPPED (needs CUDA)   [ 30%]",
            "tests/test_x.py::test_y PASSED                                [ 40%]",
        ]
    )
    got = stages.read_tests(Path("."), log)
    assert got["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert got["failed_tests"] == ["tests/test_gae.py::test_gae_cuda[31]"]
    assert got["targets"][0]["pass"] is False
    assert stages.read_tests(Path("."), "collected 0 items")["targets"][0]["pass"] is None


def test_generic_targets_of_another_benchmark() -> None:
    as_dict = stages._generic_targets({"static_4x_hf": {"description": "static >= 4x hf", "pass": True}})
    assert as_dict == [{"target": "static >= 4x hf", "pass": True, "value": None}]
    assert stages._generic_targets({"a": False, "b": None}) == [
        {"target": "a", "pass": False},
        {"target": "b", "pass": None},
    ]
    assert stages._generic_targets([{"name": "x", "passed": True, "value": 4.2}]) == [
        {"target": "x", "pass": True, "value": 4.2}
    ]
    assert stages._generic_targets(None) == []


def test_run_logged_kills_the_stage_group(tmp_path: Path) -> None:
    """A stage past its budget is stopped with the processes it started (its workers)."""
    script = "import subprocess, sys, time; print('started', flush=True); "
    script += "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    t0 = time.time()
    with (tmp_path / "suite.log").open("w") as fh:
        rc, timed_out, text = cli.run_logged(
            [sys.executable, "-c", script], {"PATH": "/usr/bin:/bin"}, 2.0, tmp_path / "stage.log", fh
        )
    assert timed_out and rc is not None and rc < 0
    assert "started" in text and "started" in (tmp_path / "stage.log").read_text()
    assert time.time() - t0 < 20
