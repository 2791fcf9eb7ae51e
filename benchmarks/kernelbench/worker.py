"""One group of ops, run in its own worker process: the correctness check, then one measurement per
(case, provider), each appended to the group's parts file as soon as it is done."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from .cases import RL_OPS, Case, bytes_moved, flops, full_cases, label, output_bytes, quick_cases, tiny
from .check import check_op
from .inputs import case_inputs
from .peers import Peers
from .providers import PROVIDERS, Providers, Unavailable
from .records import Recorder, WorkerConfig, case_record, log
from .timing import Timer, cleanup, context_alive, describe, is_oom, is_timeout, measure_peaks, time_limit

# Worker groups, run in this order, each in its own process; weight = its share of the time budget.
GROUPS: dict[str, tuple[tuple[str, ...], float]] = {
    "peaks": ((), 0.04),
    "token_logprobs": (("token_logprobs",), 0.36),
    "linear_token_logprobs": (("linear_token_logprobs",), 0.24),
    "rl": (RL_OPS, 0.36),
}
# torch.compile unrolls the T-step loop of the reference GAE: these compile for minutes
LOOP_OPS = ("gae", "ppo_advantages")
EXIT_CONTEXT_DIED = 3


def device_env(cuda: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"cuda_available": cuda}
    with contextlib.suppress(Exception):
        import triton

        env["triton_imported"] = triton.__version__
    if not cuda:
        env["device_name"] = f"cpu ({platform.processor() or platform.machine()})"
        return env
    props = torch.cuda.get_device_properties(0)
    env.update(
        device_name=torch.cuda.get_device_name(0),
        capability=list(torch.cuda.get_device_capability(0)),
        sm_count=props.multi_processor_count,
        total_memory_gib=round(props.total_memory / 2**30, 2),
        l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
        allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
    )
    with contextlib.suppress(Exception):
        q = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        values = [s.strip() for s in smi.stdout.splitlines()[0].split(",")]
        env["nvidia_smi"] = dict(zip(q.split(","), values, strict=False))
    return env


def _measure_memory(run: Any, case: Case, row: dict[str, Any]) -> None:
    """Peak memory of one call on top of what was allocated before it (the inputs)."""
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out
    row["extra_mem_mb"] = extra / 2**20
    out_bytes = output_bytes(case)
    if out_bytes is not None:
        row["output_mb"] = out_bytes / 2**20
        row["extra_mem_excl_outputs_mb"] = (extra - out_bytes) / 2**20


def measure(
    providers: Providers, case: Case, provider: str, timer: Timer, cfg: WorkerConfig, device: torch.device
) -> dict[str, Any]:
    """One (case, provider): warm-up (JIT / compile), extra memory, median time."""
    cuda = device.type == "cuda"
    row = case_record("row", case, provider)
    t0 = time.time()
    limit: float | None = None
    inp = run = f = None
    failed = False
    try:
        inp = case_inputs(case, device)
        input_mb = lambda: sum(t.numel() * t.element_size() for t in inp.values()) / 2**20
        row["input_mb"] = input_mb()
        run, f = providers.runner(provider, case, inp)
        row["input_mb"] = input_mb()  # bare_gemm adds its dlogits input
        if f.note:
            row["note"] = f.note
        if provider == "fastrlhf":
            with contextlib.suppress(Exception):
                from fastrlhf.kernels._backend import use_triton

                row["backend"] = (
                    "triton" if use_triton(*[t for t in inp.values() if t.dim() > 0][:1]) else "torch"
                )
        if not cfg.args.dry_run:
            limit = cfg.args.compile_timeout_s if provider == "compile" else cfg.args.provider_timeout_s
            limit = min(limit, max(5.0, cfg.deadline - time.time()))
        with time_limit(limit):
            if not cfg.args.dry_run:  # a dry run calls each provider once, in the timer
                run()  # warm-up: Triton JIT, torch.compile, cuBLAS handles
                cleanup(cuda)
                if cuda:
                    _measure_memory(run, case, row)
            row["ms"] = timer(run)
        row["status"] = "ok"
        n_bytes, n_flops = bytes_moved(case), flops(case)
        if n_bytes is not None:
            row.update(bytes=n_bytes, gbps=n_bytes / row["ms"] / 1e6)
        if n_flops is not None:
            row.update(flops=n_flops, tflops=n_flops / row["ms"] / 1e9)
    except Unavailable as e:
        row.update(status="unavailable", note=str(e))
    except Exception as e:
        failed = True
        if is_timeout(e):
            row.update(status="timeout", error=f"exceeded the {limit or 0:.0f} s limit of one measurement")
        else:
            row.update(status="oom" if is_oom(e) else "error", error=describe(e))
            if not is_oom(e):
                row["traceback"] = traceback.format_exc(limit=8)[-3000:]
        if provider == "compile":  # an interrupted or failed compile can leave dynamo's caches inconsistent
            providers.reset_compiled()
    finally:
        run = f = inp = None
    cleanup(cuda, full=failed)
    row["wall_s"] = round(time.time() - t0, 2)
    return row


def _row_summary(row: dict[str, Any]) -> str:
    head = f"{row['op']} {row['mode']} [{label(row['shape'], {})} {row['dtype']}"
    head += "".join(f" {k}={v}" for k, v in row["params"].items()) + f"] {row['provider']}: "
    if row["status"] != "ok":
        return head + f"{row['status']} {row.get('error') or row.get('note') or ''}"[:300]
    parts = [f"{row['ms']:.4f} ms"]
    if "gbps" in row:
        parts.append(f"{row['gbps']:.0f} GB/s")
    if "tflops" in row:
        parts.append(f"{row['tflops']:.0f} TFLOP/s")
    if "extra_mem_mb" in row:
        parts.append(f"extra {row['extra_mem_mb']:.0f} MiB")
    return head + ", ".join(parts)


def _skip_reason(
    case: Case, provider: str, cfg: WorkerConfig, compile_timed_out_at: int | None
) -> str | None:
    if not cfg.args.dry_run and time.time() > cfg.deadline:
        return "time budget exhausted"
    if provider != "compile":
        return None
    if cfg.args.no_compile:
        return "--no-compile"
    max_t = cfg.args.gae_compile_max_t
    if case.op in LOOP_OPS and case.dims["T"] > max_t:
        return (
            f"T={case.dims['T']} > --gae-compile-max-t={max_t}: torch.compile unrolls the "
            "T-step loop and compiles for minutes"
        )
    if compile_timed_out_at is not None and case.size >= compile_timed_out_at:
        return "compile timed out on a smaller shape of this op; larger shapes not attempted"
    return None


def _measure_op(
    op: str,
    compile_pass: bool,
    providers: Providers,
    timer: Timer,
    cfg: WorkerConfig,
    rec: Recorder,
    device: torch.device,
) -> bool:
    """Every case of ``op`` with the providers of this pass; False when the CUDA context died."""
    cases = [tiny(c) if cfg.tiny else c for c in (quick_cases() if cfg.args.quick else full_cases())[op]]
    names = [p for p in PROVIDERS[op] if cfg.wants(p) and (p == "compile") == compile_pass]
    if not names:
        return True
    if compile_pass:  # small shapes first: a compile timeout then skips the larger ones
        cases.sort(key=lambda c: c.size)
    else:
        problem = providers.problem(op)
        log(f"=== {op}" + (f" (fastrlhf: {problem})" if problem else ""))
        if problem is None and time.time() < cfg.deadline and not check_op(op, providers, cfg, rec, device):
            return False
    compile_timed_out_at: int | None = None
    for case in cases:
        for provider in names:
            done_key = f"{case.key}|{provider}"
            if done_key in cfg.done:
                continue
            if (op, provider) in cfg.exclude:
                rec.write(
                    **case_record(
                        "row", case, provider, status="excluded", note="crashed the CUDA context earlier"
                    )
                )
                continue
            skip = _skip_reason(case, provider, cfg, compile_timed_out_at)
            if skip:
                rec.write(**case_record("row", case, provider, status="skipped", note=skip))
                continue
            # if the worker dies inside this measurement, the orchestrator blames this marker
            rec.write(**case_record("start", case, provider, kind="row"))
            row = measure(providers, case, provider, timer, cfg, device)
            rec.write(**row, done_key=done_key)
            log(_row_summary(row))
            if provider == "compile" and row["status"] == "timeout":
                compile_timed_out_at = case.size
            if row["status"] == "error" and not context_alive(device.type == "cuda"):
                rec.write(type="fatal", op=op, provider=provider, case=case.key, error=row.get("error"))
                log(f"FATAL: {provider} killed the CUDA context on {case.key}; restarting")
                return False
    return True


def run_group(group: str, cfg: WorkerConfig, parts: Path) -> int:
    """Run one group of ops, appending records to ``parts``. 0: done; EXIT_CONTEXT_DIED: restart me.

    Two passes: first every case of every op with every provider but torch.compile (correctness check
    first per op), then the torch.compile provider, whose compile times would otherwise eat the budget.
    """
    cuda = torch.cuda.is_available() and not cfg.tiny
    device = torch.device("cuda" if cuda else "cpu")
    rec = Recorder(parts)
    try:
        timer = Timer(cuda, cfg.args.warmup_ms, cfg.args.rep_ms, single_call=cfg.args.dry_run)
        rec.write(type="worker_env", group=group, env=device_env(cuda), timer=timer.method, pid=os.getpid())
        if group == "peaks":
            if "peaks" not in cfg.done:
                for peak in measure_peaks(cuda, timer):
                    rec.write(**peak)
                    rate = (
                        f"{peak['gbps']:.0f} GB/s"
                        if "gbps" in peak
                        else f"{peak.get('tflops', 0):.0f} TFLOP/s"
                    )
                    log(f"peak {peak['name']}: " + (peak.get("error") or f"{rate} in {peak['ms']:.3f} ms"))
                rec.write(type="done", done_key="peaks")
            return 0
        providers = Providers(
            Peers(on_load=lambda name, info: rec.write(type="peer", name=name, **info)),
            cfg.args.compile_backend,
        )
        ops = [op for op in GROUPS[group][0] if op in cfg.args.ops]
        for op in ops:
            fns = providers.fns[op]
            rec.write(
                type="op_info",
                op=op,
                fastrlhf_problem=providers.problem(op),
                reference=fns.reference_name,
                reference_error=fns.reference_error,
            )
        for op in ops:
            if not _measure_op(op, False, providers, timer, cfg, rec, device):
                return EXIT_CONTEXT_DIED
        for op in sorted(ops, key=lambda o: o in LOOP_OPS):  # the long compiles last
            if not _measure_op(op, True, providers, timer, cfg, rec, device):
                return EXIT_CONTEXT_DIED
        return 0
    finally:
        rec.close()
