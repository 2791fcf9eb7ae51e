"""One system's run in a fresh Python process, so that peak memory is per run and an OOM or fragmentation
never leaks into the next run.

The parent calls :func:`run_worker`; the child (``python -m e2e.worker SPEC RESULT``) runs the system's
driver and always writes a result record: status ok / oom / error, the driver's steps, and peak memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from e2e.probes import peak_rss_gib, rss_gib
from e2e.spec import RunSpec

BENCHMARKS = Path(__file__).resolve().parent.parent  # the child imports e2e from here


def _setup(spec: RunSpec) -> dict[str, Any]:
    import torch

    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    info: dict[str, Any] = {"device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available() and spec.memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, spec.memory_cap_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        info["memory_fraction"] = fraction
    info["rss_baseline_gib"] = rss_gib()
    return info


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cuda_error_out_of_memory" in text


def _peak_memory(device: str, driver_peak_gpu_gib: float | None) -> dict[str, Any]:
    """Peak RSS, and on GPU peak allocated/reserved memory.

    fastrlhf resets the CUDA peak counter at every phase, so the process-wide peak read here covers only its
    last phase; its driver reports the peak of its logged steps, and the larger of the two is the run's.
    """
    import torch

    out: dict[str, Any] = {"peak_rss_gib": peak_rss_gib()}
    if device != "cuda":
        return out
    out["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if driver_peak_gpu_gib is not None:
        out["peak_gpu_allocated_end_of_run_gib"] = out["peak_gpu_allocated_gib"]
        out["peak_gpu_allocated_gib"] = max(out["peak_gpu_allocated_gib"], driver_peak_gpu_gib)
        out["peak_gpu_reserved_note"] = "reset by fastrlhf at each phase: last phase only"
    return out


def worker_main(spec_path: str, out_path: str) -> int:
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    result: dict[str, Any] = {"system": spec.system, "status": "ok"}
    info: dict[str, Any] = {}
    try:
        info = _setup(spec)
        if spec.system == "fastrlhf":
            from e2e.run_fastrlhf import run_fastrlhf as run
        else:
            from e2e.run_trl import run_trl as run
        result.update(run(spec, info))
    except BaseException as e:  # OOM and any failure become a record; the parent decides what it means
        result["status"] = "oom" if _is_oom(e) else "error"
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
    result.update(info)
    driver_peak = result.pop("peak_gpu_allocated_of_steps_gib", None)
    try:
        result["memory"] = _peak_memory(info.get("device", "cpu"), driver_peak)
    except Exception as e:
        result["memory"] = {"error": str(e)}
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))
    return 0


def run_worker(spec: RunSpec, timeout_s: float) -> dict[str, Any]:
    """Run one system in a fresh Python process; returns its result record (status ok / oom / error /
    timeout / crashed)."""
    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / f"spec-{spec.system}.json", work / f"result-{spec.system}.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "e2e.worker", str(spec_path), str(out_path)]
    env = {"TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", **os.environ}
    if spec.threads > 0:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    failed = {"system": spec.system}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=BENCHMARKS)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return {**failed, "status": "timeout", "error": f"over {timeout_s:.0f} s", "stderr": stderr[-2000:]}
    wall = time.perf_counter() - t0
    if not out_path.exists():
        error = f"worker exited {proc.returncode} without a result"
        return {
            **failed,
            "status": "crashed",
            "error": error,
            "stderr": proc.stderr[-4000:],
            "process_s": wall,
        }
    result = json.loads(out_path.read_text())
    result["process_s"] = wall
    if result.get("status") != "ok":
        result["stderr"] = proc.stderr[-4000:]
    return result


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], sys.argv[2]))
