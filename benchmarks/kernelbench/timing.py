"""How time and memory are measured: the timer, per-measurement time limits, telling failures apart
(timeout, OOM, a dead CUDA context), and the device's own peaks measured in the same run."""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


class TimeLimitExceeded(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise TimeLimitExceeded in the main thread after ``seconds`` (SIGALRM; a no-op where unavailable).

    Interrupts Python code (torch.compile's tracing and code generation), not a blocking CUDA call.
    """
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def _handler(signum: int, frame: Any) -> None:
        raise TimeLimitExceeded(f"exceeded {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _handler)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))  # type: ignore[arg-type]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Timer:
    """Median milliseconds of ``fn``: triton.testing.do_bench on CUDA (it flushes the L2 before each run),
    perf_counter on a CPU (median of 3, or one call in a dry run, which only checks that things run)."""

    def __init__(self, cuda: bool, warmup_ms: float, rep_ms: float, single_call: bool = False) -> None:
        self.cuda, self.warmup_ms, self.rep_ms = cuda, warmup_ms, rep_ms
        self.calls = 1 if single_call else 3
        if cuda:
            self.method = f"triton.testing.do_bench(warmup={warmup_ms}, rep={rep_ms}) median, L2 flushed"
        else:
            self.method = (
                "perf_counter, one call (CPU dry run)" if single_call else "perf_counter median of 3 (CPU)"
            )

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        times = []
        for _ in range(self.calls):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]


def cleanup(cuda: bool, full: bool = False) -> None:
    """Free what the last measurement left. A full gc pass costs ~0.2 s, so only after failures."""
    gc.collect() if full else gc.collect(1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def describe(e: BaseException, limit: int = 600) -> str:
    """An exception as one bounded line for the records."""
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_timeout(e: BaseException) -> bool:
    """torch.compile wraps exceptions raised inside it (BackendCompilerFailed, InductorError...)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, TimeLimitExceeded) or "TimeLimitExceeded" in str(cur)[:2000]:
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def context_alive(cuda: bool) -> bool:
    """False once a kernel fault has poisoned the CUDA context (every later CUDA call would fail)."""
    if not cuda:
        return True
    try:
        torch.cuda.synchronize()
        return float(torch.ones(1, device="cuda").sum().item()) == 1.0
    except Exception:
        return False


def measure_peaks(cuda: bool, timer: Timer) -> list[dict[str, Any]]:
    """The device's own ceilings, measured in this run: copy bandwidth and bf16 matmul rate (peak records)."""
    device = "cuda" if cuda else "cpu"
    n_bytes = 2 * 2**30 if cuda else 4 * 2**20
    m = 8192 if cuda else 128

    def copy() -> dict[str, Any]:
        src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        ms = timer(lambda: dst.copy_(src))
        method = "dst.copy_(src) of fp32 tensors, bytes read + written"
        return {"bytes": 2 * n_bytes, "ms": ms, "gbps": 2 * n_bytes / ms / 1e6, "method": method}

    def matmul() -> dict[str, Any]:
        a = torch.randn((m, m), device=device, dtype=torch.bfloat16)
        b = torch.randn((m, m), device=device, dtype=torch.bfloat16)
        ms = timer(lambda: a @ b)
        method = f"torch.matmul of random bf16 {m}x{m} matrices"
        return {"m": m, "ms": ms, "tflops": 2 * m**3 / ms / 1e9, "method": method}

    records = []
    for name, measure in (("copy", copy), ("matmul_bf16", matmul)):
        try:
            records.append({"type": "peak", "name": name, **measure()})
        except Exception as e:
            records.append({"type": "peak", "name": name, "error": describe(e)})
        cleanup(cuda)
    return records
