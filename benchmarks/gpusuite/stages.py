"""The suite's stages: what each one runs (a subprocess of an existing entry point) and what is read back
from it (counts, targets, headline numbers) for the summary.

Each stage has a time cap on a GPU; ``--dry-run`` runs the same entry points on the CPU at tiny sizes.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


@dataclass
class StageContext:
    """What a stage's command depends on."""

    dry_run: bool
    commit: str | None
    budget_s: float  # this stage's share of the run
    out: Path  # the stage's own folder (packed into the suite's archive)
    pythonpath: list[Path]  # the folders of the stage's peer wheels, installed
    kernel_ops: str | None  # --ops for the kernel stages (default: all)


@dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float  # on a GPU; the shares of a shorter --time-budget-s scale down with it
    peers: tuple[str, ...]  # the wheel folders on its PYTHONPATH (suite.wheels.stage_wheels keys)
    command: Callable[[StageContext], tuple[list[str], dict[str, str]] | None]  # None: nothing to run
    read: Callable[[Path, str], dict[str, Any]]  # (stage folder, its log) -> summary


# ----------------------------------------------------------------------------------------------- tests

TEST_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.MULTILINE)


def tests_command(ctx: StageContext) -> tuple[list[str], dict[str, str]]:
    # -P: the repository root stays off sys.path (its kernels/ would shadow Hugging Face's `kernels`);
    # -v prints one line per test, so a run stopped at its cap still says what passed.
    paths = ["tests/test_whiten.py"] if ctx.dry_run else ["tests"]
    safe = sys.version_info >= (3, 11)  # -P is Python 3.11+; before, the pytest script does the same
    pytest = [PY, "-P", "-m", "pytest"] if safe else [shutil.which("pytest") or "pytest"]
    return [*pytest, "-v", "-m", "cuda", "-p", "no:cacheprovider", "-rfE", *paths], {"TRITON_INTERPRET": "0"}


def read_tests(out: Path, log_text: str) -> dict[str, Any]:
    counts: dict[str, int] = {}
    failed = []
    for test, outcome in TEST_OUTCOME.findall(log_text):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(test)
    tail = [line for line in log_text.splitlines() if re.match(r"^=+ .*(passed|failed|skipped|error)", line)]
    bad = counts.get("failed", 0) + counts.get("error", 0)
    verdict = None if not counts.get("passed") and not bad else bad == 0
    return {
        "counts": counts,
        "failed_tests": failed,
        "pytest_summary": tail[-1].strip("= ") if tail else None,
        "targets": [{"target": "every CUDA test (-m cuda) passes", "pass": verdict, "value": counts}],
    }


# --------------------------------------------------------------------------------------------- kernels


def kernels_command(ctx: StageContext) -> tuple[list[str], dict[str, str]]:
    cmd = [PY, "benchmarks/gpu_kernels.py", "--quick", "--no-compile", "--out", str(ctx.out)]
    cmd += ["--time-budget-s", f"{max(20.0, ctx.budget_s - 20):.0f}"]  # its report before the stage cap
    cmd += ["--commit", ctx.commit] if ctx.commit else []
    cmd += ["--ops", ctx.kernel_ops] if ctx.kernel_ops else []
    return cmd + (["--dry-run"] if ctx.dry_run else []), _interpreter(ctx)


def _interpreter(ctx: StageContext) -> dict[str, str]:
    """A dry run runs the Triton kernels (fastrlhf's, the peers') on CPU tensors through the interpreter."""
    return {"TRITON_INTERPRET": "1"} if ctx.dry_run else {}


def compile_command(ctx: StageContext) -> tuple[list[str], dict[str, str]]:
    """torch.compile of the references, only with the time the other stages left (its own report)."""
    cmd = [PY, "benchmarks/gpu_kernels.py", "--quick", "--compile", "--providers", "compile"]
    cmd += ["--skip-peaks", "--tag", "quick-compile", "--out", str(ctx.out)]
    cmd += ["--time-budget-s", f"{max(20.0, ctx.budget_s - 15):.0f}"]
    cmd += ["--commit", ctx.commit] if ctx.commit else []
    ops = ctx.kernel_ops or ("kl_penalty" if ctx.dry_run else None)
    cmd += ["--ops", ops] if ops else []
    return cmd + (["--dry-run"] if ctx.dry_run else []), _interpreter(ctx)


def _newest_json(out: Path, pattern: str) -> dict[str, Any] | None:
    files = sorted(out.glob(pattern), key=lambda p: p.stat().st_mtime)
    for path in reversed(files):
        try:
            return {**json.loads(path.read_text(encoding="utf-8")), "_file": path.name}
        except (OSError, ValueError):
            continue
    return None


LINEAR_PEERS = (
    "fastrlhf",
    "fastrlhf_filtered",
    "bare_gemm",
    "cce",
    "cce_exact",
    "liger_flce",
    "trl",
    "full_logits",
    "eager",
)


def _linear_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every linear_token_logprobs fwd+bwd row: time, TFLOP/s, % of the matmul peak, extra memory, and the
    provider's worst error in the correctness check."""
    worst: dict[str, dict[str, float | None]] = {}
    for c in report.get("correctness", []):
        if c.get("op") != "linear_token_logprobs" or not c.get("errors"):
            continue
        w = worst.setdefault(c["provider"], {"out_rel_l2": 0.0, "grad_rel_l2": 0.0})
        for key, err in c["errors"].items():
            slot = "grad_rel_l2" if key.startswith("grad") else "out_rel_l2"
            w[slot] = max(float(w[slot] or 0.0), float(err["rel_l2_err"]))
    rows = []
    for r in report.get("results", []):
        if r.get("op") != "linear_token_logprobs" or r.get("provider") not in LINEAR_PEERS:
            continue
        if r.get("status") == "unavailable":
            continue
        rows.append(
            {
                "case": " ".join(f"{k}={v}" for k, v in {**r["shape"], **r["params"]}.items()),
                "mode": r["mode"],
                "provider": r["provider"],
                "status": r["status"],
                "ms": r.get("ms"),
                "tflops": r.get("tflops"),
                "pct_matmul_peak": r.get("pct_matmul_peak"),
                "extra_mem_mb": r.get("extra_mem_mb"),
                "extra_mem_excl_outputs_mb": r.get("extra_mem_excl_outputs_mb"),
                **worst.get(r["provider"], {}),
            }
        )
    return rows


def read_kernels(out: Path, log_text: str) -> dict[str, Any]:
    report = _newest_json(out, "kernels-*.json")
    if report is None:
        return {"error": "no kernels-*.json written"}
    fast_checks = [c for c in report.get("correctness", []) if c.get("provider") == "fastrlhf"]
    return {
        "report": report["_file"],
        "peaks": {k: v.get("gbps") or v.get("tflops") for k, v in report.get("peaks", {}).items()},
        "peers": {k: bool(v.get("available")) for k, v in report.get("peers", {}).items()},
        "fastrlhf_correctness": {
            "ok": sum(c.get("status") == "ok" for c in fast_checks),
            "checked": len(fast_checks),
        },
        "statuses": _count(r.get("status") for r in report.get("results", [])),
        "linear_fwd_bwd": [r for r in _linear_table(report) if r["mode"] == "fwd+bwd"],
        "targets": [
            {
                "target": t["description"],
                "pass": t["pass"],
                "value": t["passing"],
                "threshold": f"{t['compare']} {t['threshold']}",
            }
            for t in report.get("targets", {}).values()
        ],
    }


def read_compile(out: Path, log_text: str) -> dict[str, Any]:
    report = _newest_json(out, "kernels-*-quick-compile*.json")
    if report is None:
        return {"error": "no compile report written"}
    return {"report": report["_file"], "statuses": _count(r.get("status") for r in report.get("results", []))}


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[str(item)] = counts.get(str(item), 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------- e2e

E2E_DRY = ["--scale", "tiny", "--systems", "fastrlhf", "--steps", "2", "--repeats", "1", "--batch", "4"]
E2E_DRY += ["--micro-batch", "2", "--num-minibatches", "2", "--ppo-epochs", "1", "--prompt-len", "8"]
E2E_DRY += ["--response-len", "4"]


def e2e_command(ctx: StageContext) -> tuple[list[str], dict[str, str]]:
    cmd = [PY, "benchmarks/e2e_ppo.py", "--out", str(ctx.out)]
    if ctx.dry_run:  # the PyTorch kernel path: the Triton interpreter would take minutes
        return cmd + E2E_DRY, {"FASTRLHF_KERNELS": "torch"}
    # two systems one after the other; what is left after building the models is shared between them
    per_system = max(30.0, (ctx.budget_s - 35) / 2)
    return [*cmd, "--scale", "0.5b", "--steps", "3", "--timeout-s", f"{per_system:.0f}"], {}


def read_e2e(out: Path, log_text: str) -> dict[str, Any]:
    report = _newest_json(out, "e2e-ppo-*.json")
    if report is None:
        return {"error": "no e2e-ppo-*.json written"}
    systems = {}
    for name, rep in report.get("systems", {}).items():
        s = rep.get("summary") or {}
        systems[name] = {
            "status": rep.get("status"),
            "median_step_s": (s.get("median") or {}).get("wall_s"),
            "tokens_per_second": s.get("tokens_per_second"),
            "peak_memory_gib": s.get("peak_memory_gib"),
            "error": rep.get("error") or rep.get("reason"),
        }
    return {"report": report["_file"], "systems": systems, "ratios": report.get("ratios")}


# --------------------------------------------------------------------------------------------- rollout

ROLLOUT = ROOT / "benchmarks" / "rollout.py"


def rollout_command(ctx: StageContext) -> tuple[list[str], dict[str, str]] | None:
    if not ROLLOUT.exists():
        return None
    cmd = [PY, "benchmarks/rollout.py", "--out", str(ctx.out)]
    cmd += ["--time-budget-s", f"{max(20.0, ctx.budget_s - 15):.0f}"]
    return cmd + (["--dry-run"] if ctx.dry_run else []), {}


def _generic_targets(raw: Any) -> list[dict[str, Any]]:
    """Targets as another benchmark writes them: {name: {pass, ...}}, {name: bool} or [{name, pass}]."""
    items = raw.items() if isinstance(raw, dict) else enumerate(raw if isinstance(raw, list) else [])
    targets = []
    for key, value in items:
        if isinstance(value, dict):
            name = value.get("description") or value.get("target") or value.get("name") or str(key)
            verdict = value.get("pass", value.get("passed"))
            targets.append({"target": str(name), "pass": verdict, "value": value.get("value")})
        elif isinstance(value, bool) or value is None:
            targets.append({"target": str(key), "pass": value})
    return targets


def read_rollout(out: Path, log_text: str) -> dict[str, Any]:
    report = _newest_json(out, "rollout-*.json")
    if report is None:
        return {"error": "no rollout-*.json written"}
    # "complete": false when the stage was stopped at its cap; the report then holds the cells measured.
    targets = _generic_targets(report.get("targets"))
    return {"report": report["_file"], "complete": report.get("complete"), "targets": targets}


# The run order: the cheap correctness gate first, then the kernels the targets are about, then the
# end-to-end runs; torch.compile only with whatever time is left.
STAGES: tuple[Stage, ...] = (
    Stage("tests", 90, ("common",), tests_command, read_tests),
    Stage("kernels", 170, ("kernels", "common"), kernels_command, read_kernels),
    Stage("e2e", 150, ("e2e", "common"), e2e_command, read_e2e),
    Stage("rollout", 90, ("common",), rollout_command, read_rollout),
    Stage("compile", 60, (), compile_command, read_compile),
)
OPTIONAL_STAGES = ("compile",)  # run only when at least its cap is left
ABSENT = {"rollout": "benchmarks/rollout.py is not in this checkout (issue 8's benchmark)"}
