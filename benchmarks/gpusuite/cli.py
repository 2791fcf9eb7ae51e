"""The one GPU script: every stage in turn, each a subprocess with its own time budget under one global
deadline, the summary and the archive rewritten after every stage (a killed run keeps what it measured)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .stages import ABSENT, OPTIONAL_STAGES, ROOT, STAGES, Stage, StageContext
from .summary import build_summary, write_summary
from .wheels import install, stage_wheels

MIN_STAGE_S = 15.0  # a stage with less than this left is skipped, not started
KILL_GRACE_S = 10.0  # after SIGTERM, before SIGKILL


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--out", default=None, help="output folder (default: $OUT if set, else benchmarks/results)")
    add("--commit", default=None, help="git commit to record (.git does not travel to the device)")
    add("--time-budget-s", type=float, default=480.0, help="the whole run, set-up included")
    add("--wheels", default=str(ROOT / ".whl"), help="folder of peer wheels (benchmarks/fetch_wheels.sh)")
    add("--stages", default=",".join(s.name for s in STAGES), help="comma-separated subset, in run order")
    add("--kernel-ops", default=None, help="--ops for the kernel stages (default: every op)")
    add("--dry-run", action="store_true", help="CPU: every stage at tiny sizes (a check of the script)")
    args = p.parse_args(argv)
    names = [s.name for s in STAGES]
    args.stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = sorted(set(args.stages) - set(names))
    if unknown:
        p.error(f"--stages: unknown {unknown}; choose from {names}")
    if args.time_budget_s <= 0:
        p.error("--time-budget-s must be > 0")
    return args


def _log(fh: IO[str], msg: str) -> None:
    line = f"[suite {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


def run_logged(
    cmd: list[str], env: dict[str, str], timeout_s: float, log_path: Path, suite_log: IO[str]
) -> tuple[int | None, bool, str]:
    """Run ``cmd`` in its own process group, its output echoed and kept; the group is killed past
    ``timeout_s``. Returns (exit status, timed out, output)."""
    chunks: list[str] = []
    with log_path.open("w", encoding="utf-8") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: a timeout stops its workers too
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                chunks.append(line)
                for sink in (fh, suite_log):
                    sink.write(line)
                    sink.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):  # the group this call started, nothing else
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=KILL_GRACE_S)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        reader.join(timeout=10)
    return proc.returncode, timed_out, "".join(chunks)


def static_env(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import torch
    from kernelbench.peers import dist_version

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": dist_version("triton") or dist_version("pytorch-triton"),
        "transformers": dist_version("transformers"),
        "peft": dist_version("peft"),
        "accelerate": dist_version("accelerate"),
        "argv": ["gpu_suite.py", *argv],
        "time_budget_s": args.time_budget_s,
        "git_commit": args.commit,
    }
    if not args.commit:
        try:
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
            env["git_commit"] = head.stdout.strip() if head.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return env


def ensure_fastrlhf_installed(dry_run: bool) -> str:
    """The tests and the end-to-end workers import ``fastrlhf`` (and ``fastrlhf.kernels``, which only
    pyproject's package-dir mapping provides). A bare copy of the repository gets an offline editable
    install; a dry run never changes the environment."""
    probe = [sys.executable, "-P", "-c", "import fastrlhf.kernels, sys; print(fastrlhf.kernels.__file__)"]
    found = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if found.returncode == 0:
        return f"installed: {found.stdout.strip()}"
    if dry_run:
        return "not installed (dry run: left as is)"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation"]
    done = subprocess.run([*cmd, "-e", str(ROOT)], capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        return f"editable install failed: {(done.stderr or done.stdout)[-600:]}"
    return "editable install (pip install --no-index --no-deps --no-build-isolation -e .)"


def stage_budget(stage: Stage, remaining: float, later: list[Stage]) -> float:
    """This stage's share of what is left, in proportion to its cap and the caps of the stages after it
    (optional stages claim nothing ahead of time); never more than 1.25x its cap."""
    if stage.name in OPTIONAL_STAGES:
        return remaining - 5
    claims = stage.cap_s + sum(s.cap_s for s in later if s.name not in OPTIONAL_STAGES)
    return min(1.25 * stage.cap_s, remaining * stage.cap_s / claims)


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.dry_run:  # a CPU check never lands in the results folder
        return Path(tempfile.gettempdir()) / "fastrlhf-suite-dryrun"
    return Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "unknown"


def pack(stages_dir: Path, archive: Path) -> None:
    """One archive of every stage's files (the device returns at most 8 files), written atomically."""
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(stages_dir.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(stages_dir)))
    tmp.replace(archive)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_suite.py: no CUDA device (torch.cuda.is_available() is False). This suite times the "
            "kernels and the end-to-end runs on a GPU; on a CPU run it with --dry-run to check the script.",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    deadline = started + args.time_budget_s
    env = static_env(args, argv)
    out = _out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-suite-{'cpu' if args.dry_run else _slug(env['device_name'])}-{env['date'][:10]}"
    stem += "-dryrun" if args.dry_run else ""
    work = Path(tempfile.mkdtemp(prefix="fastrlhf-suite-"))
    stages_dir = work / "stages"
    archive = out / f"{stem}-files.tar.gz"
    env["archive"] = archive.name
    records: list[dict[str, Any]] = []

    def save() -> None:
        env["wall_s"] = round(time.time() - started, 1)
        pack(stages_dir, archive)
        write_summary(build_summary(env, records, args.dry_run), out, stem)

    with (out / f"{stem}.log").open("w", encoding="utf-8") as log_fh:
        env["fastrlhf_install"] = ensure_fastrlhf_installed(args.dry_run)
        _log(log_fh, f"fastrlhf: {env['fastrlhf_install']}")
        peer_dirs: dict[str, Path] = {}
        env["peers"] = {}
        wheel_dir = Path(args.wheels)
        selected = [s for s in STAGES if s.name in args.stages]
        needed = {key for s in selected for key in s.peers}
        if wheel_dir.is_dir():
            for key, wheels in stage_wheels(wheel_dir).items():
                if key not in needed:
                    continue
                info = install(
                    wheels, work / f"peers-{key}", timeout_s=max(10.0, min(120.0, deadline - time.time()))
                )
                env["peers"][key] = info
                if info["status"] == "ok":
                    peer_dirs[key] = work / f"peers-{key}"
                _log(log_fh, f"peers for {key}: {info['status']} {info['wheels']}")
        else:
            env["peers"] = {"note": f"no wheel folder {wheel_dir}: peers not installed"}
            _log(log_fh, env["peers"]["note"])
        stages_dir.mkdir(parents=True)
        for i, stage in enumerate(selected):
            record: dict[str, Any] = {"name": stage.name, "cap_s": stage.cap_s}
            records.append(record)
            remaining = deadline - time.time()
            budget = stage_budget(stage, remaining, selected[i + 1 :])
            record["budget_s"] = round(budget, 1)
            stage_out = stages_dir / stage.name
            stage_out.mkdir()
            paths = [peer_dirs[k] for k in stage.peers if k in peer_dirs]
            ctx = StageContext(args.dry_run, env["git_commit"], budget, stage_out, paths, args.kernel_ops)
            command = stage.command(ctx)
            if command is None:
                record.update(status="absent", reason=ABSENT.get(stage.name, "nothing to run"))
            elif budget < MIN_STAGE_S or (
                stage.name in OPTIONAL_STAGES and budget < stage.cap_s and not args.dry_run
            ):
                record.update(status="skipped", reason=f"{remaining:.0f} s left of the time budget")
            else:
                cmd, extra_env = command
                stage_env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
                if ctx.pythonpath:
                    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
                    stage_env["PYTHONPATH"] = os.pathsep.join([*map(str, ctx.pythonpath), *inherited])
                    record["peers"] = {
                        name: version
                        for key in stage.peers
                        if key in peer_dirs
                        for name, version in env["peers"][key]["wheels"].items()
                    }
                record["command"] = " ".join(cmd)
                _log(log_fh, f"stage {stage.name}: budget {budget:.0f} s: {record['command']}")
                t0 = time.time()
                rc, timed_out, text = run_logged(
                    cmd, stage_env, budget, stage_out / f"{stage.name}.log", log_fh
                )
                record.update(rc=rc, wall_s=round(time.time() - t0, 1))
                record["status"] = "timeout" if timed_out else "ok" if rc == 0 else "failed"
                try:
                    record["summary"] = stage.read(stage_out, text)
                except Exception as e:  # a report that cannot be read must not lose the others
                    record["summary"] = {
                        "error": f"could not read the stage's results: {type(e).__name__}: {e}"
                    }
            _log(log_fh, f"stage {stage.name}: {record['status']} {record.get('reason') or ''}")
            save()
    save()  # the final wall time
    shutil.rmtree(work, ignore_errors=True)
    print((out / f"{stem}.md").read_text(encoding="utf-8"))
    print(f"wrote {out / stem}.json, .md, .log and {archive.name} in {time.time() - started:.0f} s")
    broken = [r for r in records if r["status"] in ("failed", "timeout")]
    return 1 if broken else 0
