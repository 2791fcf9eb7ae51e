"""GPU benchmark of ``fastrlhf.kernels``: time, bandwidth, FLOP rate and extra memory against baselines.

The command line and the run: groups of ops one after another, each in a worker process that is restarted
without a provider that killed it, the time budget shared out between them, and the report rewritten after
every group (so a killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from .cases import ALL_OPS
from .ops import ROOT, ensure_fastrlhf_importable
from .peers import dist_version
from .providers import PROVIDERS
from .records import WorkerConfig, append_record, log, read_records
from .report import build_report, device_slug, write_report
from .timing import describe
from .worker import EXIT_CONTEXT_DIED, GROUPS, run_group

ENTRY = ROOT / "benchmarks" / "gpu_kernels.py"
OP_ABBREV = {
    "token_logprobs": "tlp",
    "linear_token_logprobs": "linear",
    "gae": "gae",
    "kl_penalty": "kl",
    "masked_whiten": "whiten",
    "shape_rewards": "shape",
    "ppo_advantages": "ppo",
}
MAX_ATTEMPTS = 4  # per group: the first run and up to three restarts without a crashing provider


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add = p.add_argument
    add(
        "--out",
        default=None,
        help="output folder (default: $OUT if set, else benchmarks/results; dry run: a temp folder)",
    )
    add("--quick", action="store_true", help="the GPU suite's subset of cases, no torch.compile")
    add("--dry-run", action="store_true", help="CPU: every case at tiny sizes, each provider once")
    add("--smoke", action="store_true", help=argparse.SUPPRESS)  # CPU, tiny, the GPU code path
    add("--skip-peaks", action="store_true", help=argparse.SUPPRESS)  # for the CPU tests
    add("--ops", default=",".join(ALL_OPS), help="comma-separated ops (default: all)")
    add("--providers", default=None, help="comma-separated providers (default: all)")
    add("--tag", default=None, help="suffix of the output file names")
    add("--time-budget-s", type=float, default=520.0, help="whole run, shared between groups")
    add("--commit", default=None, help="git commit to record when .git is not there (a device copy)")
    add("--warmup-ms", type=float, default=None, help="do_bench warmup (default 25, quick 10)")
    add("--rep-ms", type=float, default=None, help="do_bench rep (default 100, quick 40)")
    add("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run eager)")
    add("--compile-timeout-s", type=float, default=90.0, help="per compile provider measurement")
    add("--provider-timeout-s", type=float, default=120.0, help="per other provider measurement")
    add(
        "--gae-compile-max-t",
        type=int,
        default=None,
        help="largest T compiled for gae/ppo (default 2048, quick 512)",
    )
    add("--no-compile", action="store_true", help="skip the torch.compile provider")
    add("--compile", action="store_true", help="with --quick: run the torch.compile provider too")
    add("--in-process", action="store_true", help="no worker processes (the dry run always is)")
    add("--merge", nargs="+", default=None, help="JSON reports to merge into one (no device needed)")
    # internal: worker mode (the orchestrator's own arguments, then these)
    add("--worker", default=None, help=argparse.SUPPRESS)
    add("--parts", default=None, help=argparse.SUPPRESS)
    add("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    add("--exclude", default="", help=argparse.SUPPRESS)
    add("--done-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ops = _csv(args.ops)
    unknown = [o for o in args.ops if o not in ALL_OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {', '.join(ALL_OPS)}")
    args.providers = _csv(args.providers) or None
    known = {x for ps in PROVIDERS.values() for x in ps}
    if args.providers and set(args.providers) - known:
        p.error(f"unknown providers {sorted(set(args.providers) - known)}; choose from {sorted(known)}")
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (10.0 if args.quick else 25.0)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (40.0 if args.quick else 100.0)
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run or args.smoke else "inductor")
    if args.gae_compile_max_t is None:
        args.gae_compile_max_t = 512 if args.quick else 2048
    if args.quick and not args.dry_run and not args.compile:
        args.no_compile = True  # compile times would dominate a quick pass
    return args


def static_env(argv: Sequence[str]) -> dict[str, Any]:
    """Versions, the command and the code that was measured (git commit, or a hash of kernels/*.py)."""
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": dist_version("triton") or dist_version("pytorch-triton"),
        "transformers": dist_version("transformers"),
        "trl": dist_version("trl"),
        "liger_kernel": dist_version("liger-kernel") or dist_version("liger_kernel"),
        "cut_cross_entropy": dist_version("cut-cross-entropy"),
        "fastrlhf": dist_version("fastrlhf"),
        "fastrlhf_import": ensure_fastrlhf_importable(),
        "argv": list(argv),
        "env_vars": {
            k: os.environ.get(k) for k in ("FASTRLHF_KERNELS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
        },
        "git_commit": None,
        "git_dirty": None,
    }

    def git(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)

    with contextlib.suppress(Exception):
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            env["git_commit"] = head.stdout.strip()
            status = git("status", "--porcelain", "--", "kernels", "fastrlhf", "benchmarks")
            env["git_dirty"] = bool(status.stdout.strip())
    digest = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    env["kernels_sha256"] = digest.hexdigest()[:16]
    return env


def _spawn(cmd: list[str], timeout: float, log_fh: IO[str]) -> tuple[int, bool]:
    """Run a worker, echoing its output live (and into the log); kill it past ``timeout``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log_fh.write(line)
            log_fh.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()  # only the worker this run started
        proc.wait()
    reader.join(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode, timed_out


def _unfinished_start(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last measurement a worker started but never recorded (its start record), if any."""
    finished = {(r.get("type"), r.get("case"), r.get("provider")) for r in records}
    for r in reversed(records):
        if r.get("type") == "start":
            return None if (r["kind"], r["case"], r["provider"]) in finished else r
    return None


def _attempt(
    group: str, args: argparse.Namespace, argv: list[str], cfg: WorkerConfig, parts: Path, log_fh: IO[str]
) -> int:
    """One attempt at a group, in this process or in a worker process; returns its exit status."""
    if args.dry_run or args.in_process:
        try:
            return run_group(group, cfg, parts)
        except Exception as e:  # a script bug: record it and carry on with the next group
            append_record(
                parts, type="group_error", group=group, error=describe(e), traceback=traceback.format_exc()
            )
            traceback.print_exc()
            return 1
    done_file = parts.with_suffix(".done.json")
    done_file.write_text(json.dumps(sorted(cfg.done)))
    cmd = [sys.executable, str(ENTRY), *argv, "--worker", group, "--parts", str(parts)]
    cmd += ["--deadline", str(cfg.deadline), "--done-file", str(done_file)]
    cmd += ["--exclude", ",".join(f"{o}:{p}" for o, p in sorted(cfg.exclude))] if cfg.exclude else []
    rc, timed_out = _spawn(cmd, cfg.deadline - time.time() + 30, log_fh)
    if timed_out:
        append_record(parts, type="group_error", group=group, error="worker killed at its deadline")
        return rc
    culprit = _unfinished_start(read_records(parts))
    if rc not in (0, EXIT_CONTEXT_DIED) and culprit:
        # the worker died (segfault, uncaught error): blame the measurement it had started
        error = f"the worker process died (exit status {rc}) during this measurement"
        append_record(parts, **{**culprit, "type": culprit["kind"], "status": "error", "error": error})
        append_record(parts, type="fatal", op=culprit["op"], provider=culprit["provider"], error=error)
    return rc


def run_group_with_restarts(
    group: str, args: argparse.Namespace, argv: list[str], budget: float, parts: Path, log_fh: IO[str]
) -> dict[str, Any]:
    """Run a group until it finishes, restarting it without each provider that killed it (or its worker)."""
    deadline = time.time() + budget
    exclude: set[tuple[str, str]] = set()
    attempts, t0 = 0, time.time()
    log(f"group {group}: budget {budget:.0f} s")
    while True:
        attempts += 1
        done = {r["done_key"] for r in read_records(parts) if r.get("done_key")}
        cfg = WorkerConfig(args, deadline if not args.dry_run else time.time() + 10**6, exclude, done)
        rc = _attempt(group, args, argv, cfg, parts, log_fh)
        crashed = {
            (r["op"], r["provider"]) for r in read_records(parts) if r.get("type") == "fatal"
        } - exclude
        if rc == 0 or not crashed or attempts >= MAX_ATTEMPTS or time.time() >= deadline - 20:
            break
        exclude |= crashed
        log(f"group {group}: restarting without {sorted(crashed)}")
    excluded = [f"{o}:{p}" for o, p in sorted(exclude)]
    return {
        "group": group,
        "rc": rc,
        "attempts": attempts,
        "wall_s": round(time.time() - t0, 1),
        "excluded": excluded,
    }


def _tag(args: argparse.Namespace) -> str | None:
    """Partial runs get a file-name suffix, so they never overwrite a full one."""
    if args.tag is not None:
        return args.tag
    parts = [
        name for name, on in (("dryrun", args.dry_run), ("smoke", args.smoke), ("quick", args.quick)) if on
    ]
    if set(args.ops) != set(ALL_OPS):
        parts.append("ops-" + "-".join(OP_ABBREV[o] for o in args.ops))
    return "-".join(parts) or None


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.dry_run or args.smoke:  # CPU checks of the script stay out of the results folder
        return Path(tempfile.gettempdir()) / "fastrlhf-bench-dryrun"
    return Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")


def dry_run_verdict(report: dict[str, Any]) -> int:
    """Non-zero when the script or a fastrlhf/reference path is broken (peers and compile may be absent)."""
    bad = [
        r
        for r in report["results"]
        if r["provider"] in ("fastrlhf", "eager", "bare_gemm") and r["status"] in ("error", "timeout", "oom")
    ]
    bad += [c for c in report["correctness"] if c["provider"] == "fastrlhf" and c.get("status") != "ok"]
    bad += [r for r in report["records"] if r.get("type") == "group_error"]
    for r in bad:
        print(
            f"DRY RUN PROBLEM: {r.get('case', r.get('group'))} {r.get('provider', '')}: "
            f"{r.get('status', '')} {r.get('error') or r.get('errors') or ''}",
            file=sys.stderr,
        )
    return 1 if bad else 0


def worker_main(args: argparse.Namespace) -> int:
    exclude = {tuple(x.split(":", 1)) for x in args.exclude.split(",") if ":" in x}
    done = set(json.loads(Path(args.done_file).read_text())) if args.done_file else set()
    cfg = WorkerConfig(args, args.deadline or time.time() + 3600, exclude, done)  # type: ignore[arg-type]
    return run_group(args.worker, cfg, Path(args.parts))


def merge_main(args: argparse.Namespace) -> int:
    reports = [json.loads(Path(path).read_text(encoding="utf-8")) for path in args.merge]
    envs = [r.get("env", {}) for r in reports]
    env = dict(envs[0]) if envs else {}
    env["merged_from"] = [str(p) for p in args.merge]
    names = {e.get("device_name") for e in envs}
    if len(names) > 1:
        env["warning"] = f"merged runs from different devices: {sorted(map(str, names))}"
    records = [rec for r in reports for rec in r.get("records", [])]
    report = build_report(records, {"env": env, "groups": [g for r in reports for g in r.get("groups", [])]})
    date = str(env.get("date", ""))[:10]
    stem = f"kernels-{device_slug(env.get('device_name'))}-{date}-{args.tag or 'merged'}"
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    json_path, md_path = write_report(report, out_dir, stem)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_fastrlhf_importable()  # before anything imports fastrlhf.kernels
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.merge:
        return merge_main(args)
    cpu_check = args.dry_run or args.smoke
    if not cpu_check and not torch.cuda.is_available():
        print(
            "gpu_kernels.py: no CUDA device (torch.cuda.is_available() is False). This script times the "
            "Triton kernels on a GPU; on a CPU machine run it with --dry-run to check the script itself.",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    env = static_env(["gpu_kernels.py", *argv])
    env["git_commit"] = env["git_commit"] or args.commit
    env["run_mode"] = (
        "dry-run" if args.dry_run else "smoke" if args.smoke else "quick" if args.quick else "full"
    )
    tag, out_dir = _tag(args), _out_dir(args)
    tmp = Path(tempfile.mkdtemp(prefix="fastrlhf-bench-"))
    log_path = tmp / "run.log"
    groups = [g for g, (ops, _) in GROUPS.items() if set(ops) & set(args.ops)]
    groups = groups if args.skip_peaks else ["peaks", *groups]
    meta: dict[str, Any] = {"env": env, "groups": []}
    with log_path.open("w", encoding="utf-8") as log_fh:
        for gi, group in enumerate(groups):
            remaining = max(0.0, args.time_budget_s - (time.time() - started))
            budget = remaining * GROUPS[group][1] / sum(GROUPS[g][1] for g in groups[gi:])
            meta["groups"].append(
                run_group_with_restarts(group, args, argv, budget, tmp / f"{group}.jsonl", log_fh)
            )
            # every group rewrites the report, so a killed run keeps what it measured
            records = [
                {**r, "run": env["date"]} for g in groups[: gi + 1] for r in read_records(tmp / f"{g}.jsonl")
            ]
            report = build_report(records, meta)
            slug = "cpu" if cpu_check else device_slug(report["env"].get("device_name"))
            stem = f"kernels-{slug}-{env['date'][:10]}" + (f"-{tag}" if tag else "")
            json_path, md_path = write_report(report, out_dir, stem)
            log_fh.flush()
            shutil.copy(log_path, out_dir / f"{stem}.log")
    shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path}, {md_path} and {stem}.log in {time.time() - started:.0f} s")
    rc = 1 if any(g["rc"] not in (0, EXIT_CONTEXT_DIED) for g in meta["groups"]) else 0
    return (dry_run_verdict(report) or rc) if cpu_check else rc
