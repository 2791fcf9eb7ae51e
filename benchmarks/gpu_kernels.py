#!/usr/bin/env python
"""GPU benchmark of ``fastrlhf.kernels``: time, bandwidth, FLOP rate and extra memory against baselines.

Run on a CUDA machine (see benchmarks/README.md)::

    python benchmarks/gpu_kernels.py [--out DIR] [--quick] [--ops token_logprobs,gae,...]
    python benchmarks/gpu_kernels.py --dry-run          # CPU: every case at tiny sizes, each provider once
    python benchmarks/gpu_kernels.py --merge A.json B.json --out DIR   # one report from several runs

Per op it first checks every provider against the PyTorch reference (float64 where the reference takes it)
at a moderate shape and records the errors, then times each case for each provider: ``fastrlhf`` (the
Triton kernels), ``eager`` (the reference), ``compile`` (``torch.compile`` of the reference) and peers
where importable (TRL's fused log-prob kernels, Liger-Kernel's fused selective log-softmax, cross entropy
and fused linear cross entropy; ``bare_gemm`` for the linear op). It also measures the device's own peaks
(device-to-device copy bandwidth, bf16 8192^3 matmul) in the same run, and writes
``kernels-<device>-<date>.json`` (every raw record, the derived ratios and pass/fail targets) and a markdown
summary ``kernels-<device>-<date>.md``, which it also prints.

Robustness: each group of ops runs in its own worker process, so a kernel that kills the CUDA context costs
that provider only (the worker is restarted without it); OOM, errors and torch.compile failures are
recorded per case; a time budget (``--time-budget-s``, default 540 s, under the device's 10-minute command
limit) is shared out between the groups and cases past it are recorded as skipped; the report is rewritten
after every group, so even a killed run leaves its results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMA = "fastrlhf-kernel-bench/1"


def _load_common() -> types.ModuleType:
    """benchmarks/common.py under a private name (benchmarks/ is not a package; 'common' is too generic)."""
    name = "fastrlhf_bench_common"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "common.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HERE / 'common.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


C = _load_common()
try:
    FASTRLHF_IMPORT = C.ensure_fastrlhf_importable()
except Exception as _e:  # recorded; every fastrlhf/eager provider then reports the import error
    FASTRLHF_IMPORT = f"failed: {type(_e).__name__}: {_e}"

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
ALL_OPS = (
    "token_logprobs",
    "linear_token_logprobs",
    "gae",
    "kl_penalty",
    "masked_whiten",
    "shape_rewards",
    "ppo_advantages",
)
RL_OPS = ("gae", "kl_penalty", "masked_whiten", "shape_rewards", "ppo_advantages")
# Worker groups, run in this order, each in its own process; weight = its share of the time budget.
GROUPS: dict[str, tuple[tuple[str, ...], float]] = {
    "peaks": ((), 0.04),
    "token_logprobs": (("token_logprobs",), 0.36),
    "linear_token_logprobs": (("linear_token_logprobs",), 0.24),
    "rl": (RL_OPS, 0.36),
}
OP_ABBREV = {
    "token_logprobs": "tlp",
    "linear_token_logprobs": "linear",
    "gae": "gae",
    "kl_penalty": "kl",
    "masked_whiten": "whiten",
    "shape_rewards": "shape",
    "ppo_advantages": "ppo",
}

PROVIDERS: dict[str, tuple[str, ...]] = {
    "token_logprobs": ("fastrlhf", "eager", "compile", "trl", "liger_selective", "liger_ce"),
    "linear_token_logprobs": (
        "fastrlhf",
        "eager",
        "compile",
        "full_logits",
        "trl",
        "liger_flce",
        "bare_gemm",
    ),
    **{op: ("fastrlhf", "eager", "compile") for op in RL_OPS},
}
PROVIDER_DOCS: dict[str, str] = {
    "fastrlhf": "fastrlhf.kernels public op (Triton on CUDA tensors; the backend used is recorded per row)",
    "eager": "the op's PyTorch reference (<op>_reference), run eagerly; for gae and ppo_advantages this is "
    "the Python loop over T vectorized over B, as TRL, verl and OpenRLHF compute GAE",
    "compile": "torch.compile of the reference (default options: dynamic=None, so shapes go dynamic after "
    "the first recompile); compile time is excluded from the timing, failures are recorded",
    "trl": "TRL: trl.kernels.selective_log_softmax_and_entropy (token_logprobs; always computes entropy "
    "too) / trl.kernels.ChunkedLogProbFunction with outputs=() (linear_token_logprobs)",
    "liger_selective": "Liger-Kernel liger_kernel.ops.grpo_loss.fused_selective_log_softmax: forward only "
    "(torch.no_grad), scores N-1 rows by design (drops the last position of the [1, N, V] view)",
    "liger_ce": "Liger-Kernel liger_kernel.transformers.functional.liger_cross_entropy(reduction='none'), "
    "logp = -loss; when logits require grad it computes the gradient in the forward, in place into the "
    "logits",
    "liger_flce": "Liger-Kernel liger_kernel.transformers.functional.liger_fused_linear_cross_entropy"
    "(reduction='none'), logp = -loss",
    "full_logits": "the full-logits path as Hugging Face models and TRL run it: logits = hidden @ weight.T "
    "in the inputs' dtype (bf16), then token_logprobs_reference (float32 log_softmax + gather)",
    "bare_gemm": "the GEMMs the fused linear op cannot avoid, torch.matmul in the inputs' dtype: fwd = the "
    "logits GEMM; fwd+bwd = logits GEMM + recompute GEMM + dhidden GEMM + dweight GEMM",
}

TARGETS_DOC = {
    "token_logprobs_copy_bw": "token_logprobs fwd+bwd (fastrlhf) reaches >= 85% of the measured copy "
    "bandwidth",
    "token_logprobs_vs_trl": "token_logprobs fwd+bwd: fastrlhf >= 1.3x faster than TRL's fused kernel",
    "linear_vs_bare_gemm": "linear_token_logprobs fwd+bwd: fastrlhf time <= 1.15x its bare GEMMs",
    "linear_memory": "linear_token_logprobs fwd+bwd: fastrlhf extra memory <= 3% of the full-logits "
    "path's (bf16 logits + fp32 log_softmax); both exclude the outputs every method returns (logp, dhidden, "
    "dweight)",
    "gae_vs_python_loop": "gae at B=512, T=2048: fastrlhf >= 200x faster than the Python-loop GAE",
}

FATAL_PATTERNS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "cuda_error_illegal",
    "an illegal",
    "cudaerrorlaunchfailure",
    "context is destroyed",
)


class Unavailable(Exception):
    """The provider cannot run this case (not installed, unsupported mode...)."""


class TimeLimitExceeded(Exception):
    pass


# ------------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    op: str
    mode: str  # "fwd" | "fwd+bwd"
    shape: tuple[tuple[str, int], ...]
    dtype: str  # "bf16" | "fp32"
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.shape)

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape)

    @property
    def key(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.op}|{self.mode}|{self.shape_str}|{self.dtype}|{params}"


def _tlp(n: int, v: int, dtype: str, mode: str, **params: Any) -> Case:
    return Case("token_logprobs", mode, (("N", n), ("V", v)), dtype, tuple(sorted(params.items())))


def _lin(n: int, h: int, v: int, mode: str) -> Case:
    return Case("linear_token_logprobs", mode, (("N", n), ("H", h), ("V", v)), "bf16")


def _rl(op: str, b: int, t: int, **params: Any) -> Case:
    return Case(op, "fwd", (("B", b), ("T", t)), "fp32", tuple(sorted(params.items())))


def full_cases() -> dict[str, list[Case]]:
    """The default run, most important cases first (a run that hits its time budget drops the tail)."""
    tlp_bf16 = [
        (4096, 32000),
        (4096, 151936),
        (16384, 128256),
        (16384, 151936),
        (32768, 32000),
        (32768, 151936),
    ]
    tlp_fp32 = [(4096, 32000), (16384, 151936)]
    token = [_tlp(n, v, "bf16", "fwd+bwd") for n, v in tlp_bf16]
    token += [_tlp(n, v, "bf16", "fwd") for n, v in tlp_bf16]
    token += [_tlp(n, v, "fp32", "fwd+bwd") for n, v in tlp_fp32]
    token += [_tlp(n, v, "fp32", "fwd") for n, v in tlp_fp32]
    token += [_tlp(16384, 151936, "bf16", m, entropy=True) for m in ("fwd+bwd", "fwd")]
    lin_shapes = [(8192, 896, 151936), (8192, 2048, 151936), (8192, 4096, 128256)]
    linear = [_lin(n, h, v, "fwd+bwd") for n, h, v in lin_shapes] + [
        _lin(n, h, v, "fwd") for n, h, v in lin_shapes
    ]
    gae_shapes = [(512, 2048), (64, 512), (256, 1024)]
    return {
        "token_logprobs": token,
        "linear_token_logprobs": linear,
        "gae": [_rl("gae", b, t) for b, t in gae_shapes],
        "kl_penalty": [_rl("kl_penalty", 512, 2048, estimator=e) for e in ("k1", "k2", "k3")],
        "masked_whiten": [_rl("masked_whiten", 512, 2048)],
        "shape_rewards": [_rl("shape_rewards", 512, 2048, estimator="k1")],
        "ppo_advantages": [_rl("ppo_advantages", b, t, estimator="k1") for b, t in gae_shapes],
    }


def quick_cases() -> dict[str, list[Case]]:
    """A small sanity subset of every op (one or two shapes each)."""
    return {
        "token_logprobs": [
            _tlp(8192, 151936, "bf16", "fwd+bwd"),
            _tlp(4096, 32000, "bf16", "fwd"),
            _tlp(4096, 32000, "fp32", "fwd+bwd", entropy=True),
        ],
        "linear_token_logprobs": [_lin(4096, 896, 151936, "fwd+bwd")],
        "gae": [_rl("gae", 512, 2048), _rl("gae", 64, 512)],
        "kl_penalty": [_rl("kl_penalty", 512, 2048, estimator="k3")],
        "masked_whiten": [_rl("masked_whiten", 512, 2048)],
        "shape_rewards": [_rl("shape_rewards", 512, 2048, estimator="k1")],
        "ppo_advantages": [_rl("ppo_advantages", 512, 2048, estimator="k1")],
    }


def tiny(case: Case) -> Case:
    """The dry-run version of a case: same structure, sizes small enough for a CPU (distinct per case)."""
    d = case.dims
    if case.op == "token_logprobs":
        shape = (("N", max(4, d["N"] // 512)), ("V", max(17, d["V"] // 256)))
    elif case.op == "linear_token_logprobs":
        shape = (("N", max(4, d["N"] // 512)), ("H", max(8, d["H"] // 64)), ("V", max(17, d["V"] // 256)))
    else:
        shape = (("B", max(2, d["B"] // 16)), ("T", max(4, d["T"] // 64)))
    return Case(case.op, case.mode, shape, case.dtype, case.params)


def check_cases(op: str, dry: bool) -> list[Case]:
    """Moderate shapes for the correctness check that runs before an op is timed."""
    if op == "token_logprobs":
        n, v = (8, 301) if dry else (2048, 32000)
        return [_tlp(n, v, dt_, "fwd+bwd", entropy=True) for dt_ in ("bf16", "fp32")] + [
            _tlp(n, v, dt_, "fwd+bwd") for dt_ in ("bf16", "fp32")
        ]
    if op == "linear_token_logprobs":
        return [_lin(*((8, 16, 301) if dry else (1024, 896, 32000)), "fwd+bwd")]
    b, t = (3, 37) if dry else (64, 512)
    if op == "kl_penalty":
        return [_rl(op, b, t, estimator=e) for e in ("k1", "k2", "k3")]
    if op in ("shape_rewards", "ppo_advantages"):
        return [_rl(op, b, t, estimator="k3")]
    return [_rl(op, b, t)]


# --------------------------------------------------------------------------------------------- timing


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


def _events_bench(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> float:
    """Median ms with CUDA events, L2 flushed before each run (the fallback for triton's do_bench)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return float(times[len(times) // 2])


class Timer:
    """Median milliseconds of ``fn``: triton.testing.do_bench on CUDA, one perf_counter call on CPU."""

    def __init__(self, cuda: bool, warmup_ms: float, rep_ms: float, single_call: bool = False) -> None:
        self.cuda = cuda
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.single_call = single_call
        self.method = (
            "perf_counter, one call (CPU dry run)" if single_call else "perf_counter median of 3 (CPU)"
        )
        self._do_bench: Callable[..., Any] | None = None
        self._median_kw: dict[str, Any] = {}
        if cuda:
            try:
                from triton.testing import do_bench

                params = inspect.signature(do_bench).parameters
                self._median_kw = (
                    {"return_mode": "median"} if "return_mode" in params else {"quantiles": [0.5]}
                )
                self._do_bench = do_bench
                self.method = f"triton.testing.do_bench(warmup={warmup_ms}, rep={rep_ms}) median, L2 flushed"
            except Exception as e:  # triton missing or changed: CUDA events instead
                self.method = f"CUDA events median, L2 flushed (do_bench unavailable: {e!r})"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            times = []
            for _ in range(1 if self.single_call else 3):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return sorted(times)[len(times) // 2]
        if self._do_bench is None:
            return _events_bench(fn, self.warmup_ms, self.rep_ms)
        ms = self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, **self._median_kw)
        if isinstance(ms, (list, tuple)):
            ms = ms[0]
        return float(ms)


def _cleanup(cuda: bool, full: bool = False) -> None:
    """Free what the last measurement left. A full gc pass costs ~0.2 s, so only after failures."""
    gc.collect() if full else gc.collect(1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _is_timeout(e: BaseException) -> bool:
    """torch.compile wraps exceptions raised inside it (BackendCompilerFailed, InductorError...)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, TimeLimitExceeded) or "TimeLimitExceeded" in str(cur)[:2000]:
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _is_oom(e: BaseException) -> bool:
    oom_types: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)
    return isinstance(e, oom_types) or "out of memory" in str(e).lower()


def _context_alive(cuda: bool) -> bool:
    """False once a kernel fault has poisoned the CUDA context (every later CUDA call would fail)."""
    if _FAULT["fired"]:
        return False
    if not cuda:
        return True
    try:
        torch.cuda.synchronize()
        return float(torch.ones(1, device="cuda").sum().item()) == 1.0
    except Exception:
        return False


# Test hook: FASTRLHF_BENCH_INJECT_FAULT=op:provider makes that provider fail as a dead CUDA context would
# (op:provider:exit: the worker process dies), so the restart paths can be exercised on a CPU.
_FAULT: dict[str, Any] = {"fired": False}


def _inject_fault(case: Case, provider: str) -> None:
    spec = os.environ.get("FASTRLHF_BENCH_INJECT_FAULT")
    if spec == f"{case.op}:{provider}:exit":  # a worker that dies outright (segfault-like)
        os._exit(139)
    if spec == f"{case.op}:{provider}":
        _FAULT["fired"] = True
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by the test hook)")


def _short(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- peers


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except Exception:
        return None


@dataclass
class Peer:
    fn: Callable[..., Any] | None = None
    error: str | None = None
    note: str | None = None
    source: str | None = None


def _import_first(candidates: Sequence[tuple[str, str]]) -> tuple[Any, str | None, str | None]:
    errors = []
    for module, attr in candidates:
        try:
            return getattr(importlib.import_module(module), attr), f"{module}.{attr}", None
        except Exception as e:
            errors.append(f"{module}.{attr}: {_short(e, 200)}")
    return None, None, "; ".join(errors)


def _stub_trl_trainer_utils() -> str | None:
    """TRL's ChunkedLogProbFunction.backward imports ``trl.trainer.utils`` (for a DeepSpeed ZeRO-3 gather),
    which pulls in ``datasets`` and more. Where that import fails, stand in a module whose
    ``maybe_gather_lm_head_ctx`` is a null context: exactly what it is without ZeRO-3 (one GPU)."""
    try:
        importlib.import_module("trl.trainer.utils")
        return None
    except Exception as e:
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()  # type: ignore[attr-defined]
        sys.modules["trl.trainer.utils"] = stub
        return (
            f"trl.trainer.utils not importable ({_short(e, 160)}); its maybe_gather_lm_head_ctx was "
            "replaced by a null context, which is what it is without DeepSpeed ZeRO-3"
        )


def _trl_slot(name: str, position: int) -> str | None:
    """Which value a parameter of TRL's ChunkedLogProbFunction.forward takes (its names vary by version)."""
    n = name.lower()
    if "weight" in n:
        return "weight"
    if position == 0 or "hidden" in n or n in ("input", "x"):
        return "hidden"
    if "bias" in n or "softcap" in n:
        return "none"
    if any(s in n for s in ("target", "label", "index", "ids")):
        return "ids"
    if "temp" in n or "scale" in n:
        return "one"
    if "chunk" in n:
        return "chunk"
    if n == "outputs":
        return "no_outputs"
    return None


class Peers:
    """Lazily imported peer implementations; each import is attempted once and its outcome recorded."""

    def __init__(self, on_load: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self._cache: dict[str, Peer] = {}
        self._on_load = on_load

    def get(self, name: str) -> Peer:
        if name not in self._cache:
            try:
                peer = getattr(self, f"_load_{name}")()
            except Exception as e:
                peer = Peer(error=_short(e))
            self._cache[name] = peer
            if self._on_load is not None:
                info = {"available": peer.fn is not None, "source": peer.source, "error": peer.error}
                self._on_load(name, {**info, "note": peer.note})
        return self._cache[name]

    @staticmethod
    def _load_trl() -> Peer:
        fn, src, err = _import_first(
            [
                ("trl.kernels", "selective_log_softmax_and_entropy"),
                ("trl.kernels.logprob_entropy", "selective_log_softmax_and_entropy"),
            ]
        )
        if fn is None:
            return Peer(error=f"not installed or no fused kernel (trl {_dist_version('trl')}): {err}")

        def run(logits: torch.Tensor, ids: torch.Tensor, entropy: bool) -> Any:
            logp, ent = fn(logits, ids, temperature=1.0)
            return (logp, ent) if entropy else logp

        return Peer(run, source=src, note=f"trl {_dist_version('trl')}; computes entropy on every call")

    @staticmethod
    def _load_trl_linear() -> Peer:
        cls, src, err = _import_first(
            [
                ("trl.kernels", "ChunkedLogProbFunction"),
                ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction"),
                ("trl.trainer.utils", "_ChunkedLogProbFunction"),
            ]
        )
        if cls is None:
            return Peer(
                error=f"not installed or no chunked log-prob function (trl {_dist_version('trl')}): {err}"
            )
        notes = [f"trl {_dist_version('trl')}"]
        stub_note = _stub_trl_trainer_utils()
        if stub_note:
            notes.append(stub_note)
        chunk = 32768
        with contextlib.suppress(Exception):
            chunk = int(importlib.import_module("trl.trainer.utils")._CHUNKED_LOGPROB_CHUNK_SIZE)
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop ctx
        notes.append(f"apply({', '.join(p.name for p in params)}), chunk_size={chunk}")
        slots: list[str] = []  # what to pass for each leading parameter; the rest keep their defaults
        for i, p in enumerate(params):
            slot = _trl_slot(p.name, i)
            if slot is None:
                if p.default is inspect.Parameter.empty:
                    raise Unavailable(f"unsupported ChunkedLogProbFunction signature: {notes[-1]}")
                break
            slots.append(slot)

        def run(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            values: dict[str, Any] = {
                "hidden": hidden,
                "weight": weight,
                "ids": ids,
                "none": None,
                "one": 1.0,
                "chunk": chunk,
                "no_outputs": (),
            }
            out = cls.apply(*[values[s] for s in slots])
            return out[0] if isinstance(out, (tuple, list)) else out

        return Peer(run, source=src, note="; ".join(notes))

    @staticmethod
    def _load_liger_selective() -> Peer:
        fn, src, err = _import_first([("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax")])
        if fn is None:
            return Peer(error=f"not installed or no fused_selective_log_softmax: {err}")

        def run(logits: torch.Tensor, shifted_ids: torch.Tensor) -> torch.Tensor:
            # [1, N, V] -> log-probs of rows 0..N-2 with ids shifted_ids[1:] (= ids[:-1]).
            return fn(logits.unsqueeze(0), shifted_ids.unsqueeze(0), temperature=1.0).squeeze(0)

        return Peer(run, source=src, note=f"liger-kernel {_dist_version('liger-kernel')}")

    @staticmethod
    def _load_liger_ce() -> Peer:
        fn, src, err = _import_first([("liger_kernel.transformers.functional", "liger_cross_entropy")])
        if fn is None:
            return Peer(error=f"not installed: {err}")

        def run(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return -fn(logits, ids, reduction="none")

        return Peer(run, source=src, note=f"liger-kernel {_dist_version('liger-kernel')}")

    @staticmethod
    def _load_liger_flce() -> Peer:
        fn, src, err = _import_first(
            [("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy")]
        )
        if fn is None:
            return Peer(error=f"not installed: {err}")

        def run(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return -fn(hidden, weight, ids, reduction="none")

        return Peer(run, source=src, note=f"liger-kernel {_dist_version('liger-kernel')}")


# ---------------------------------------------------------------------------------------------- ops


@dataclass
class Fwd:
    """A provider's forward for one case: ``fn()`` returns a tensor or a tuple of tensors."""

    fn: Callable[[], Any]
    wrt: tuple[torch.Tensor, ...] = ()  # what the backward differentiates with respect to
    grad: torch.Tensor | None = None  # upstream gradient for every output
    ref_view: Callable[[torch.Tensor], torch.Tensor] | None = None  # reference rows this provider scores
    raw: bool = False  # fn already does all the work of the mode (bare GEMMs)
    note: str | None = None


def _fwd_bwd(f: Fwd) -> Callable[[], Any]:
    """fn() then torch.autograd.grad (no .grad accumulation, so repeated calls do the same work)."""
    assert f.grad is not None
    grad = f.grad

    def run() -> Any:
        out = f.fn()
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        grads = [grad if grad.dtype == o.dtype else grad.to(o.dtype) for o in outs]
        return torch.autograd.grad(outs, f.wrt, grads)

    return run


def _raise_recompile_limits() -> None:
    """Every (shape, dtype, mode) of a reference is a recompile; past dynamo's default limit (8) it would
    silently run eager and the 'compile' numbers would be eager ones."""
    with contextlib.suppress(Exception):
        import torch._dynamo.config as dynamo_config

        for name, value in (
            ("cache_size_limit", 64),
            ("recompile_limit", 64),
            ("accumulated_cache_size_limit", 1024),
        ):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), value))


class Benches:
    """Builds inputs and each provider's forward for every op."""

    def __init__(self, device: torch.device, peers: Peers, compile_backend: str) -> None:
        self.device = device
        self.peers = peers
        self.compile_backend = compile_backend
        self.fns = {op: C.resolve_op(op) for op in ALL_OPS}
        self._compiled: dict[str, Callable[..., Any]] = {}

    # inputs ------------------------------------------------------------------------------------------
    def inputs(self, case: Case, *, seed: int = 0) -> dict[str, torch.Tensor]:
        d, grad = case.dims, case.mode == "fwd+bwd"
        if case.op == "token_logprobs":
            return C.token_logprobs_inputs(
                d["N"], d["V"], DTYPES[case.dtype], self.device, requires_grad=grad, seed=seed
            )
        if case.op == "linear_token_logprobs":
            return C.linear_inputs(
                d["N"], d["H"], d["V"], DTYPES[case.dtype], self.device, requires_grad=grad, seed=seed
            )
        return C.rl_inputs(d["B"], d["T"], self.device, seed=seed)

    # availability -----------------------------------------------------------------------------------
    def op_problem(self, op: str) -> str | None:
        """Why the fastrlhf op cannot run at all (still a placeholder, import error), else None."""
        fns = self.fns[op]
        if fns.fn is None:
            return f"import failed: {fns.fn_error}"
        if C.is_placeholder(fns.fn):
            return "placeholder (kernel not written yet)"
        return None

    def _reference(self, op: str) -> Callable[..., Any]:
        if op not in self.fns:
            self.fns[op] = C.resolve_op(op)
        ref = self.fns[op].reference
        if ref is None:
            raise Unavailable(f"no reference: {self.fns[op].reference_error}")
        return ref

    def _compiled_reference(self, op: str) -> Callable[..., Any]:
        if not self._compiled:
            _raise_recompile_limits()
        if op not in self._compiled:
            self._compiled[op] = torch.compile(self._reference(op), backend=self.compile_backend)
        return self._compiled[op]

    def reset_compiled(self) -> None:
        self._compiled.clear()
        with contextlib.suppress(Exception):
            torch._dynamo.reset()

    def _impl(self, op: str, provider: str) -> Callable[..., Any]:
        if provider == "fastrlhf":
            problem = self.op_problem(op)
            if problem:
                raise Unavailable(problem)
            fn = self.fns[op].fn
            assert fn is not None
            return fn
        if provider == "eager":
            return self._reference(op)
        if provider == "compile":
            return self._compiled_reference(op)
        raise Unavailable(f"no provider {provider!r} for {op}")

    def _peer(self, name: str) -> Callable[..., Any]:
        peer = self.peers.get(name)
        if peer.fn is None:
            raise Unavailable(peer.error or "unavailable")
        return peer.fn

    # forwards ---------------------------------------------------------------------------------------
    def forward(self, provider: str, case: Case, inp: dict[str, torch.Tensor]) -> Fwd:
        op, o = case.op, case.opts
        if op == "token_logprobs":
            return self._token_forward(provider, case, inp)
        if op == "linear_token_logprobs":
            return self._linear_forward(provider, case, inp)
        fn = self._impl(op, provider)
        if op == "gae":
            r, v, m = inp["rewards"], inp["values"], inp["mask"]
            return Fwd(lambda: fn(r, v, m, gamma=C.GAMMA, lam=C.LAM))
        if op == "kl_penalty":
            lp, rl, est = inp["logp"], inp["ref_logp"], o["estimator"]
            return Fwd(lambda: fn(lp, rl, estimator=est))
        if op == "masked_whiten":
            x, m = inp["x"], inp["mask"]
            return Fwd(lambda: fn(x, m))
        if op == "shape_rewards":
            s, lp, rl, m, est = inp["scores"], inp["logp"], inp["ref_logp"], inp["mask"], o["estimator"]
            return Fwd(lambda: fn(s, lp, rl, m, kl_coef=C.KL_COEF, estimator=est))
        if op == "ppo_advantages":
            s, lp, rl, v, m = inp["scores"], inp["logp"], inp["ref_logp"], inp["values"], inp["mask"]
            est = o["estimator"]
            return Fwd(
                lambda: tuple(
                    fn(
                        s,
                        lp,
                        rl,
                        v,
                        m,
                        kl_coef=C.KL_COEF,
                        estimator=est,
                        gamma=C.GAMMA,
                        lam=C.LAM,
                        whiten=True,
                    )
                )
            )
        raise ValueError(op)

    def _token_forward(self, provider: str, case: Case, inp: dict[str, torch.Tensor]) -> Fwd:
        logits, ids, grad = inp["logits"], inp["ids"], inp["grad"]
        ent = bool(case.opts.get("entropy", False))
        common = {"wrt": (logits,), "grad": grad}
        if provider in ("fastrlhf", "eager", "compile"):
            fn = self._impl(case.op, provider)
            return Fwd(lambda: fn(logits, ids, return_entropy=ent), **common)
        if provider == "trl":
            trl = self._peer("trl")
            return Fwd(lambda: trl(logits, ids, ent), **common)
        if ent:
            raise Unavailable("no entropy output")
        if provider == "liger_selective":
            if case.mode != "fwd":
                raise Unavailable("forward only (runs under torch.no_grad)")
            sel = self._peer("liger_selective")
            shifted = torch.cat([ids[:1], ids[:-1]])
            return Fwd(lambda: sel(logits, shifted), ref_view=lambda t: t[:-1], note="N-1 rows")
        if provider == "liger_ce":
            ce = self._peer("liger_ce")
            note = (
                "gradient computed in the forward, in place into the logits" if case.mode != "fwd" else None
            )
            return Fwd(lambda: ce(logits, ids), note=note, **common)
        raise Unavailable(f"no provider {provider!r} for {case.op}")

    def _linear_forward(self, provider: str, case: Case, inp: dict[str, torch.Tensor]) -> Fwd:
        hidden, weight, ids, grad = inp["hidden"], inp["weight"], inp["ids"], inp["grad"]
        common = {"wrt": (hidden, weight), "grad": grad}
        if provider in ("fastrlhf", "eager", "compile"):
            fn = self._impl(case.op, provider)
            return Fwd(lambda: fn(hidden, weight, ids), **common)
        if provider == "full_logits":
            ref = self._reference("token_logprobs")
            return Fwd(lambda: ref(hidden @ weight.t(), ids), **common)
        if provider == "trl":
            trl = self._peer("trl_linear")
            return Fwd(lambda: trl(hidden, weight, ids), **common)
        if provider == "liger_flce":
            flce = self._peer("liger_flce")
            return Fwd(lambda: flce(hidden, weight, ids), **common)
        if provider == "bare_gemm":
            h, w = hidden.detach(), weight.detach()
            if case.mode == "fwd":
                return Fwd(lambda: h @ w.t(), raw=True)
            # the logits gradient is an input here, so it is not counted as extra memory
            g = torch.randn((h.shape[0], w.shape[0]), device=h.device, dtype=h.dtype)
            inp["_dlogits"] = g

            def four_gemms() -> tuple[torch.Tensor, ...]:
                logits = h @ w.t()  # forward
                logits = h @ w.t()  # recompute in the backward
                return logits, g @ w, g.t() @ h  # dhidden, dweight

            return Fwd(four_gemms, raw=True)
        raise Unavailable(f"no provider {provider!r} for {case.op}")

    def runner(
        self, provider: str, case: Case, inp: dict[str, torch.Tensor]
    ) -> tuple[Callable[[], Any], Fwd]:
        f = self.forward(provider, case, inp)
        if f.raw or case.mode == "fwd":
            return f.fn, f
        return _fwd_bwd(f), f

    # models -----------------------------------------------------------------------------------------
    @staticmethod
    def bytes_moved(case: Case) -> int | None:
        d = case.dims
        if case.op == "token_logprobs":
            elem = DTYPES[case.dtype].itemsize
            return C.token_logprobs_bytes(d["N"], d["V"], elem, case.mode, bool(case.opts.get("entropy")))
        if case.op == "linear_token_logprobs":
            return None
        return C.rl_bytes(case.op, d["B"], d["T"])

    @staticmethod
    def flops(case: Case) -> int | None:
        if case.op != "linear_token_logprobs":
            return None
        d = case.dims
        return C.linear_flops(d["N"], d["H"], d["V"], case.mode)

    @staticmethod
    def output_bytes(case: Case) -> int | None:
        """Bytes of the outputs every method must return (excluded from 'extra memory excl. outputs')."""
        d = case.dims
        elem = DTYPES[case.dtype].itemsize
        if case.op == "token_logprobs":
            out = d["N"] * 4 * (2 if case.opts.get("entropy") else 1)
            return out + (d["N"] * d["V"] * elem if case.mode == "fwd+bwd" else 0)
        if case.op == "linear_token_logprobs":
            out = d["N"] * 4
            return out + ((d["N"] + d["V"]) * d["H"] * elem if case.mode == "fwd+bwd" else 0)
        return None


# ------------------------------------------------------------------------------------------ worker


class Recorder:
    """Appends one JSON object per line to the parts file (a killed worker leaves every finished line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _append(path: Path, **record: Any) -> None:
    rec = Recorder(path)
    try:
        rec.write(**record)
    finally:
        rec.close()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
        env["nvidia_smi"] = dict(
            zip(q.split(","), [s.strip() for s in smi.stdout.splitlines()[0].split(",")], strict=False)
        )
    return env


def _peak_copy(device: str, n_bytes: int, timer: Timer) -> float:
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def _peak_matmul(device: str, m: int, timer: Timer) -> float:
    a = torch.randn((m, m), device=device, dtype=torch.bfloat16)
    b = torch.randn((m, m), device=device, dtype=torch.bfloat16)
    return timer(lambda: a @ b)


def measure_peaks(cuda: bool, timer: Timer, rec: Recorder) -> None:
    """The device's own ceilings, measured in this run: copy bandwidth and bf16 matmul rate."""
    device = "cuda" if cuda else "cpu"
    n_bytes = 2 * 2**30 if cuda else 4 * 2**20
    try:
        ms = _peak_copy(device, n_bytes, timer)
        gbps = 2 * n_bytes / ms / 1e6
        method = "dst.copy_(src) of fp32 tensors, bytes read + written"
        rec.write(type="peak", name="copy", bytes=2 * n_bytes, ms=ms, gbps=gbps, method=method)
        log(f"peak copy: {gbps:.0f} GB/s ({2 * n_bytes / 1e9:.2f} GB in {ms:.3f} ms)")
    except Exception as e:
        rec.write(type="peak", name="copy", error=_short(e))
    _cleanup(cuda)
    m = 8192 if cuda else 128
    try:
        ms = _peak_matmul(device, m, timer)
        tflops = 2 * m**3 / ms / 1e9
        method = f"torch.matmul of random bf16 {m}x{m} matrices"
        rec.write(type="peak", name="matmul_bf16", m=m, ms=ms, tflops=tflops, method=method)
        log(f"peak bf16 matmul: {tflops:.0f} TFLOP/s ({m}^3 in {ms:.3f} ms)")
    except Exception as e:
        rec.write(type="peak", name="matmul_bf16", error=_short(e))
    _cleanup(cuda)


@dataclass
class WorkerConfig:
    dry_run: bool
    smoke: bool
    quick: bool
    ops: tuple[str, ...]
    providers: tuple[str, ...] | None
    warmup_ms: float
    rep_ms: float
    compile_backend: str
    compile_timeout_s: float
    provider_timeout_s: float
    gae_compile_max_t: int
    no_compile: bool
    deadline: float
    exclude: set[tuple[str, str]] = field(default_factory=set)
    done: set[str] = field(default_factory=set)


def tolerance(case: Case) -> dict[str, float]:
    """rel-L2 tolerances of the correctness check (against a float64 reference)."""
    if case.op == "token_logprobs":
        return {"out": 1e-5, "grad": 1e-5} if case.dtype == "fp32" else {"out": 1e-4, "grad": 1e-2}
    if case.op == "linear_token_logprobs":
        return {"out": 2e-2, "grad": 5e-2}
    return {"out": 1e-5, "grad": 1e-5}


def _upcast(inp: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in inp.items():
        if v.is_floating_point():
            out[k] = v.detach().to(dtype).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _outputs_and_grads(f: Fwd, mode: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    out = f.fn()
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    grads: list[torch.Tensor] = []
    if mode == "fwd+bwd" and f.wrt and f.grad is not None:
        gs = [f.grad if f.grad.dtype == o.dtype else f.grad.to(o.dtype) for o in outs]
        grads = list(torch.autograd.grad(outs, f.wrt, gs))
    return [o.detach() for o in outs], [g.detach() for g in grads]


def check_op(op: str, benches: Benches, cfg: WorkerConfig, rec: Recorder, cuda: bool) -> bool:
    """Compare every non-compile provider with the reference; returns False when the context died."""
    providers = [p for p in PROVIDERS[op] if p not in ("compile", "bare_gemm")]
    if cfg.providers is not None:
        providers = [p for p in providers if p in cfg.providers]
    for case in check_cases(op, cfg.dry_run or cfg.smoke):
        ref_out: list[torch.Tensor] = []
        ref_grads: list[torch.Tensor] = []
        ref_note = None
        try:
            base = benches.inputs(case, seed=1)
            for ref_dtype in (torch.float64, torch.float32):
                try:
                    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = False
                    try:
                        ref_f = benches.forward("eager", case, _upcast(base, ref_dtype))
                        ref_out, ref_grads = _outputs_and_grads(ref_f, case.mode)
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
                    ref_note = f"reference in {str(ref_dtype).replace('torch.', '')} on upcast inputs"
                    break
                except Unavailable:
                    raise
                except Exception as e:
                    if ref_dtype == torch.float32:
                        raise
                    ref_note = f"float64 reference failed ({_short(e, 120)})"
            del base
        except Exception as e:
            rec.write(type="check", op=op, case=case.key, provider="eager", status="error", error=_short(e))
            log(f"check {op}: reference failed: {_short(e)}")
            _cleanup(cuda)
            continue
        for provider in providers:
            done_key = f"check|{case.key}|{provider}"
            if done_key in cfg.done or provider == "eager":
                continue
            row: dict[str, Any] = {"type": "check", "op": op, "case": case.key, "provider": provider}
            row.update(shape=case.dims, dtype=case.dtype, mode=case.mode, params=case.opts, done_key=done_key)
            if (op, provider) in cfg.exclude:
                rec.write(**row, status="excluded", note="crashed the CUDA context earlier in this run")
                continue
            rec.write(**{**row, "type": "start", "kind": "check", "done_key": None})
            try:
                inp = benches.inputs(case, seed=1)
                try:
                    f = benches.forward(provider, case, inp)
                    mode = case.mode
                except Unavailable as e:
                    if case.mode == "fwd" or "forward only" not in str(e):
                        raise
                    # a forward-only provider: check its outputs on inputs that need no gradient
                    mode = "fwd"
                    inp = benches.inputs(Case(op, "fwd", case.shape, case.dtype, case.params), seed=1)
                    f = benches.forward(provider, Case(op, "fwd", case.shape, case.dtype, case.params), inp)
                    row["note_mode"] = "forward only: outputs checked, no gradient"
                outs, grads = _outputs_and_grads(f, mode)
                errs: dict[str, Any] = {}
                for i, (o, r) in enumerate(zip(outs, ref_out, strict=False)):
                    errs[f"out{i}"] = C.error_stats(o, f.ref_view(r) if f.ref_view else r)
                for i, (g, r) in enumerate(zip(grads, ref_grads, strict=False)):
                    errs[f"grad{i}"] = C.error_stats(g, r)
                tol = tolerance(case)
                ok = bool(errs) and all(
                    v["rel_l2_err"] <= tol["grad" if k.startswith("grad") else "out"] for k, v in errs.items()
                )
                row.update(status="ok" if ok else "above_tol", errors=errs, tolerance=tol, reference=ref_note)
                row.update(note=f.note)
                worst = max((v["rel_l2_err"] for v in errs.values()), default=math.nan)
                log(
                    f"check {op} [{case.shape_str} {case.dtype}{' ent' if case.opts.get('entropy') else ''}] "
                    f"{provider}: {'ok' if ok else 'ABOVE TOLERANCE'} (worst rel-L2 {worst:.2e})"
                )
            except Unavailable as e:
                row.update(status="unavailable", note=str(e))
            except Exception as e:
                row.update(status="oom" if _is_oom(e) else "error", error=_short(e))
                log(f"check {op} {provider}: {_short(e, 300)}")
                if not _context_alive(cuda):
                    rec.write(**row)
                    rec.write(type="fatal", op=op, provider=provider, error=_short(e))
                    return False
            finally:
                inp = f = None  # type: ignore[assignment]
            rec.write(**row)
            _cleanup(cuda)
    return True


def measure(
    benches: Benches, case: Case, provider: str, timer: Timer, cfg: WorkerConfig, cuda: bool
) -> dict[str, Any]:
    """One (case, provider): warm-up (JIT / compile), extra memory, median time."""
    row: dict[str, Any] = {
        "type": "row",
        "case": case.key,
        "op": case.op,
        "mode": case.mode,
        "shape": case.dims,
    }
    row.update(dtype=case.dtype, params=case.opts, provider=provider)
    t0 = time.time()
    inp: dict[str, torch.Tensor] | None = None
    run: Callable[[], Any] | None = None
    f: Fwd | None = None
    failed = False
    limit: float | None = None
    try:
        inp = benches.inputs(case)
        row["input_mb"] = _tensor_bytes(inp) / 2**20
        run, f = benches.runner(provider, case, inp)
        row["input_mb"] = _tensor_bytes(inp) / 2**20  # bare_gemm adds its dlogits input
        if f.note:
            row["note"] = f.note
        if provider == "fastrlhf":
            with contextlib.suppress(Exception):
                from fastrlhf.kernels._backend import use_triton

                row["backend"] = (
                    "triton" if use_triton(*[t for t in inp.values() if t.dim() > 0][:1]) else "torch"
                )
        limit = cfg.compile_timeout_s if provider == "compile" else cfg.provider_timeout_s
        limit = None if cfg.dry_run else min(limit, max(5.0, cfg.deadline - time.time()))
        with time_limit(limit):
            if cfg.dry_run:  # each provider once, timed with perf_counter
                row["ms"] = timer(run)
            else:
                _inject_fault(case, provider)
                out = run()  # warm-up: Triton JIT, torch.compile, cuBLAS handles
                del out
                _cleanup(cuda)
                if cuda:
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    out = run()
                    torch.cuda.synchronize()
                    extra = torch.cuda.max_memory_allocated() - base
                    del out
                    row["extra_mem_mb"] = extra / 2**20
                    out_bytes = Benches.output_bytes(case)
                    if out_bytes is not None:
                        row["output_mb"] = out_bytes / 2**20
                        row["extra_mem_excl_outputs_mb"] = (extra - out_bytes) / 2**20
                row["ms"] = timer(run)
        row["status"] = "ok"
        n_bytes, n_flops = Benches.bytes_moved(case), Benches.flops(case)
        if n_bytes is not None:
            row["bytes"] = n_bytes
            row["gbps"] = n_bytes / row["ms"] / 1e6
        if n_flops is not None:
            row["flops"] = n_flops
            row["tflops"] = n_flops / row["ms"] / 1e9
    except Unavailable as e:
        row.update(status="unavailable", note=str(e))
    except Exception as e:
        failed = True
        if _is_timeout(e):
            row.update(status="timeout", error=f"exceeded the {limit or 0:.0f} s limit of one measurement")
        else:
            row.update(status="oom" if _is_oom(e) else "error", error=_short(e))
            if not _is_oom(e):
                row["traceback"] = traceback.format_exc(limit=8)[-3000:]
        if provider == "compile":  # an interrupted or failed compile can leave dynamo's caches inconsistent
            benches.reset_compiled()
    finally:
        run = f = inp = None
    _cleanup(cuda, full=failed)
    row["wall_s"] = round(time.time() - t0, 2)
    return row


def _fmt_row(row: dict[str, Any]) -> str:
    head = (
        f"{row['op']} {row['mode']} [{' '.join(f'{k}={v}' for k, v in row['shape'].items())} {row['dtype']}"
    )
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


def _row_stub(case: Case, provider: str, status: str, note: str) -> dict[str, Any]:
    row: dict[str, Any] = {"type": "row", "case": case.key, "op": case.op, "mode": case.mode}
    row.update(
        shape=case.dims, dtype=case.dtype, params=case.opts, provider=provider, status=status, note=note
    )
    return row


def run_group(group: str, cfg: WorkerConfig, parts: Path) -> int:
    """Run one group of ops, appending records to ``parts``. 0: done; 3: the CUDA context died.

    Two passes: first every case of every op with every provider but torch.compile (correctness check
    first per op), then the torch.compile provider, whose compile times would otherwise eat the budget.
    """
    cuda = torch.cuda.is_available() and not (cfg.dry_run or cfg.smoke)
    _FAULT["fired"] = False
    rec = Recorder(parts)
    try:
        timer = Timer(cuda, cfg.warmup_ms, cfg.rep_ms, single_call=cfg.dry_run)
        rec.write(type="worker_env", group=group, env=device_env(cuda), timer=timer.method, pid=os.getpid())
        if group == "peaks":
            if "peaks" not in cfg.done:
                measure_peaks(cuda, timer, rec)
                rec.write(type="done", done_key="peaks")
            return 0
        peers = Peers(on_load=lambda name, info: rec.write(type="peer", name=name, **info))
        benches = Benches(torch.device("cuda" if cuda else "cpu"), peers, cfg.compile_backend)
        cases_by_op = quick_cases() if cfg.quick else full_cases()
        ops = [op for op in GROUPS[group][0] if op in cfg.ops]
        for op in ops:
            fns = benches.fns[op]
            problem = benches.op_problem(op)
            rec.write(
                type="op_info",
                op=op,
                fastrlhf_problem=problem,
                reference=fns.reference_name,
                reference_error=fns.reference_error,
            )
        for compile_pass in (False, True):
            # the compile pass takes the unrolled-loop GAE ops last: their compiles are the long ones
            order = sorted(ops, key=lambda o: o in ("gae", "ppo_advantages")) if compile_pass else ops
            for op in order:
                cases = [tiny(c) if cfg.dry_run or cfg.smoke else c for c in cases_by_op[op]]
                providers = [p for p in PROVIDERS[op] if cfg.providers is None or p in cfg.providers]
                providers = [p for p in providers if (p == "compile") == compile_pass]
                if not providers:
                    continue
                if compile_pass:  # small shapes first: a compile timeout then skips the larger ones
                    cases.sort(key=lambda c: math.prod(c.dims.values()))
                else:
                    problem = benches.op_problem(op)
                    log(f"=== {op}" + (f" (fastrlhf: {problem})" if problem else ""))
                    checkable = problem is None and time.time() < cfg.deadline
                    if checkable and not check_op(op, benches, cfg, rec, cuda):
                        return 3
                compile_timed_out_at: int | None = None
                for case in cases:
                    for provider in providers:
                        done_key = f"{case.key}|{provider}"
                        if done_key in cfg.done:
                            continue
                        if (op, provider) in cfg.exclude:
                            rec.write(
                                **_row_stub(case, provider, "excluded", "crashed the CUDA context earlier")
                            )
                            continue
                        skip = _skip_reason(case, provider, cfg, compile_timed_out_at)
                        if skip:
                            rec.write(**_row_stub(case, provider, "skipped", skip))
                            continue
                        # if the worker dies inside this measurement, the orchestrator blames this marker
                        rec.write(
                            **{**_row_stub(case, provider, "started", ""), "type": "start", "kind": "row"}
                        )
                        row = measure(benches, case, provider, timer, cfg, cuda)
                        rec.write(**row, done_key=done_key)
                        log(_fmt_row(row))
                        if provider == "compile" and row["status"] == "timeout":
                            compile_timed_out_at = math.prod(case.dims.values())
                        if row["status"] == "error" and not _context_alive(cuda):
                            rec.write(
                                type="fatal", op=op, provider=provider, case=case.key, error=row.get("error")
                            )
                            log(f"FATAL: {provider} killed the CUDA context on {case.key}; restarting")
                            return 3
        return 0
    finally:
        rec.close()


def _skip_reason(
    case: Case, provider: str, cfg: WorkerConfig, compile_timed_out_at: int | None
) -> str | None:
    if not cfg.dry_run and time.time() > cfg.deadline:
        return "time budget exhausted"
    if provider == "compile":
        if cfg.no_compile:
            return "--no-compile"
        if case.op in ("gae", "ppo_advantages"):
            t = case.dims["T"]
            if t > cfg.gae_compile_max_t:
                return (
                    f"T={t} > --gae-compile-max-t={cfg.gae_compile_max_t}: torch.compile unrolls the "
                    "T-step loop and compiles for minutes"
                )
        if compile_timed_out_at is not None and math.prod(case.dims.values()) >= compile_timed_out_at:
            return "compile timed out on a smaller shape of this op; larger shapes not attempted"
    return None


# ------------------------------------------------------------------------------------------ report


def _static_env(argv: Sequence[str]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton") or _dist_version("pytorch-triton"),
        "transformers": _dist_version("transformers"),
        "trl": _dist_version("trl"),
        "liger_kernel": _dist_version("liger-kernel") or _dist_version("liger_kernel"),
        "fastrlhf": _dist_version("fastrlhf"),
        "fastrlhf_import": FASTRLHF_IMPORT,
        "argv": list(argv),
        "env_vars": {
            k: os.environ.get(k) for k in ("FASTRLHF_KERNELS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
        },
        "git_commit": None,
        "git_dirty": None,
    }
    with contextlib.suppress(Exception):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            env["git_commit"] = head.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--", "kernels", "fastrlhf", "benchmarks"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            )
            env["git_dirty"] = bool(status.stdout.strip())
    digest = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    env["kernels_sha256"] = digest.hexdigest()[:16]
    return env


def _read_parts(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def _case_order() -> dict[str, int]:
    order: dict[str, int] = {}
    for cases in (full_cases(), quick_cases()):
        for op_cases in cases.values():
            for case in op_cases:
                order.setdefault(case.key, len(order))
                order.setdefault(tiny(case).key, len(order))
    return order


def build_report(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything derived (ratios, % of peak, targets) is computed here from the raw records."""
    env = dict(meta.get("env", {}))
    for r in records:
        if r.get("type") == "worker_env":
            for k, v in r["env"].items():
                env.setdefault(k, v)
            env.setdefault("timer", r.get("timer"))
    peaks = {r["name"]: r for r in records if r.get("type") == "peak" and "error" not in r}
    # each row is set against the peaks of its own run (a merged report holds several runs)
    run_peaks: dict[Any, dict[str, dict[str, Any]]] = {}
    for r in records:
        if r.get("type") == "peak" and "error" not in r:
            run_peaks.setdefault(r.get("run"), {})[r["name"]] = r

    # one row per (case, provider): a measured row beats a skipped/excluded one from a restarted worker
    rank = {"ok": 0, "oom": 1, "error": 1, "timeout": 1, "unavailable": 2, "excluded": 3, "skipped": 4}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r.get("type") != "row":
            continue
        k = (r["case"], r["provider"])
        if k not in rows or rank.get(r["status"], 5) < rank.get(rows[k]["status"], 5):
            rows[k] = dict(r)
    fatal = {(r["op"], r["provider"]): r.get("error") for r in records if r.get("type") == "fatal"}
    for r in rows.values():
        if r["status"] == "excluded" and (r["op"], r["provider"]) in fatal:
            r["note"] = (
                f"not run: this provider killed its worker earlier ({fatal[(r['op'], r['provider'])]})"
            )
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for (case, provider), r in rows.items():
        by_case.setdefault(case, {})[provider] = r
    for provs in by_case.values():
        for r in provs.values():
            if r["status"] != "ok":
                continue
            own = run_peaks.get(r.get("run")) or peaks
            copy_gbps = own.get("copy", {}).get("gbps")
            mm_tflops = own.get("matmul_bf16", {}).get("tflops")
            if copy_gbps and "gbps" in r:
                r["pct_copy_peak"] = 100 * r["gbps"] / copy_gbps
            if mm_tflops and "tflops" in r:
                r["pct_matmul_peak"] = 100 * r["tflops"] / mm_tflops
            r["speedup_vs"] = {
                p: o["ms"] / r["ms"] for p, o in provs.items() if p != r["provider"] and o["status"] == "ok"
            }
            if "eager" in r["speedup_vs"]:
                r["speedup_vs_eager"] = r["speedup_vs"]["eager"]
    order = _case_order()
    prov_rank = {p: i for ps in PROVIDERS.values() for i, p in enumerate(ps)}
    row_list = sorted(
        rows.values(),
        key=lambda r: (
            ALL_OPS.index(r["op"]),
            order.get(r["case"], 10**6),
            r["case"],
            prov_rank.get(r["provider"], 99),
        ),
    )
    checks: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r.get("type") == "check":
            k = (r["case"], r["provider"])
            if k not in checks or r.get("status") == "ok":
                checks[k] = r
    op_info = {r["op"]: r for r in records if r.get("type") == "op_info"}
    peers = {
        r["name"]: {k: v for k, v in r.items() if k not in ("type", "name")}
        for r in records
        if r.get("type") == "peer"
    }
    report = {
        "schema": SCHEMA,
        "env": env,
        "peaks": {k: {kk: vv for kk, vv in v.items() if kk != "type"} for k, v in peaks.items()},
        "peaks_by_run": {
            str(run): {k: v.get("gbps") or v.get("tflops") for k, v in p.items()}
            for run, p in run_peaks.items()
        },
        "byte_models": C.BYTE_MODELS,
        "memory_model": "extra_mem = torch.cuda.max_memory_allocated() during one call (after "
        "reset_peak_memory_stats) minus torch.cuda.memory_allocated() before it (the inputs); "
        "extra_mem_excl_outputs also subtracts the outputs every method returns (logp, entropy, gradients)",
        "timing": env.get("timer"),
        "providers": PROVIDER_DOCS,
        "peers": peers,
        "ops": op_info,
        "correctness": sorted(
            checks.values(), key=lambda r: (ALL_OPS.index(r["op"]), r["case"], r["provider"])
        ),
        "results": row_list,
        "targets": compute_targets(row_list),
        "groups": meta.get("groups", []),
        "records": records,
    }
    return report


def compute_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def cell(case: str, provider: str) -> dict[str, Any] | None:
        for r in rows:
            if r["case"] == case and r["provider"] == provider and r["status"] == "ok":
                return r
        return None

    cases = {r["case"]: r for r in rows}
    out: dict[str, Any] = {}

    def add(name: str, threshold: float, compare: str, entries: list[dict[str, Any]]) -> None:
        measured = [e for e in entries if e["value"] is not None]
        for e in measured:
            e["pass"] = e["value"] >= threshold if compare == ">=" else e["value"] <= threshold
        out[name] = {
            "description": TARGETS_DOC[name],
            "threshold": threshold,
            "compare": compare,
            "cases": entries,
            "pass": all(e["pass"] for e in measured) if measured else None,
            "passing": f"{sum(e['pass'] for e in measured)}/{len(measured)}",
        }

    tlp = [c for c, r in cases.items() if r["op"] == "token_logprobs" and r["mode"] == "fwd+bwd"]
    tlp = [c for c in tlp if not cases[c]["params"].get("entropy")]
    bw, trl = [], []
    for c in tlp:
        ours, theirs = cell(c, "fastrlhf"), cell(c, "trl")
        bw.append({"case": c, "value": ours.get("pct_copy_peak") if ours else None})
        trl.append({"case": c, "value": theirs["ms"] / ours["ms"] if ours and theirs else None})
    add("token_logprobs_copy_bw", 85.0, ">=", bw)
    add("token_logprobs_vs_trl", 1.3, ">=", trl)

    lin = [c for c, r in cases.items() if r["op"] == "linear_token_logprobs" and r["mode"] == "fwd+bwd"]
    gemm, mem = [], []
    for c in lin:
        ours, bare, full = cell(c, "fastrlhf"), cell(c, "bare_gemm"), cell(c, "full_logits")
        gemm.append({"case": c, "value": ours["ms"] / bare["ms"] if ours and bare else None})
        value = None
        if ours and full and full.get("extra_mem_excl_outputs_mb", 0) > 0:
            value = max(ours.get("extra_mem_excl_outputs_mb", 0.0), 0.0) / full["extra_mem_excl_outputs_mb"]
        entry: dict[str, Any] = {"case": c, "value": value}
        if ours:
            entry["extra_mem_mb"] = {
                p: r.get("extra_mem_mb") for p in ("fastrlhf", "full_logits", "eager") if (r := cell(c, p))
            }
            entry["extra_mem_excl_outputs_mb"] = {
                p: r.get("extra_mem_excl_outputs_mb")
                for p in ("fastrlhf", "full_logits", "eager")
                if (r := cell(c, p))
            }
            if full and full.get("extra_mem_mb"):
                entry["ratio_incl_outputs"] = ours.get("extra_mem_mb", 0.0) / full["extra_mem_mb"]
        mem.append(entry)
    add("linear_vs_bare_gemm", 1.15, "<=", gemm)
    add("linear_memory", 0.03, "<=", mem)

    g = [c for c, r in cases.items() if r["op"] == "gae" and r["shape"] in ({"B": 512, "T": 2048},)]
    gae = []
    for c in g:
        ours, loop = cell(c, "fastrlhf"), cell(c, "eager")
        gae.append({"case": c, "value": loop["ms"] / ours["ms"] if ours and loop else None})
    add("gae_vs_python_loop", 200.0, ">=", gae)
    return out


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if fmt == ".0f" and abs(v) < 10:  # small rates (CPU runs, tiny ops) keep 3 significant digits
        return format(v, ".3g")
    return format(v, fmt)


def render_markdown(report: dict[str, Any]) -> str:
    env, peaks = report["env"], report["peaks"]
    lines = [f"# fastrlhf.kernels benchmark — {env.get('device_name', '?')}", ""]
    if env.get("run_mode") in ("dry-run", "smoke"):
        lines += [
            f"**{env['run_mode']} on a CPU at tiny sizes: a check of the script; numbers and targets "
            "mean nothing.**",
            "",
        ]
    lines.append(
        f"{env.get('date')} · torch {env.get('torch')} (CUDA {env.get('torch_cuda')}) · "
        f"triton {env.get('triton')} · "
        f"transformers {env.get('transformers')} · python {env.get('python')} · trl {env.get('trl')} · "
        f"liger-kernel {env.get('liger_kernel')} · git {str(env.get('git_commit'))[:12]}"
        f"{' (dirty)' if env.get('git_dirty') else ''} · kernels sha256 {env.get('kernels_sha256')}"
    )
    lines.append("")
    copy, mm = peaks.get("copy", {}), peaks.get("matmul_bf16", {})
    lines.append(
        f"Device peaks (same run): copy {_num(copy.get('gbps'), '.0f')} GB/s (read + write), "
        f"bf16 matmul {_num(mm.get('tflops'), '.0f')} TFLOP/s ({mm.get('m', '?')}^3). "
        f"Timing: {report.get('timing')}."
    )
    lines += ["", "## Targets", "", "| target | threshold | passing | pass |", "| --- | --- | --- | --- |"]
    for t in report["targets"].values():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"| {t['description']} | {t['compare']} {t['threshold']} | {t['passing']} | {verdict} |")
    lines += ["", "## Correctness (vs reference, before timing)", ""]
    lines.append(
        "rel-L2 = ||out - ref|| / ||ref|| against the reference on float64 copies of the same inputs."
    )
    lines.append("")
    lines.append(
        "| op | case | provider | status | out rel-L2 | grad rel-L2 | max abs err | tolerance | note |"
    )
    lines.append(header_sep(lines[-1]))
    for c in report["correctness"]:
        if c.get("status") == "unavailable":  # peers not installed: listed under Peers
            continue
        errs = c.get("errors") or {}
        out_err = max((v["rel_l2_err"] for k, v in errs.items() if k.startswith("out")), default=None)
        grad_err = max((v["rel_l2_err"] for k, v in errs.items() if k.startswith("grad")), default=None)
        mabs = max((v["max_abs_err"] for v in errs.values()), default=None)
        tol = c.get("tolerance") or {}
        tol_s = f"{tol['out']:.0e} / {tol['grad']:.0e}" if tol else "—"
        shape = " ".join(f"{k}={v}" for k, v in (c.get("shape") or {}).items())
        shape += "".join(f" {k}={v}" for k, v in (c.get("params") or {}).items())
        case = f"{shape} {c.get('dtype', '')} {c.get('mode', '')}".strip()
        note = " ".join(str(x) for x in (c.get("error"), c.get("note_mode"), c.get("note")) if x)
        lines.append(
            f"| {c['op']} | {case} | {c['provider']} | {c.get('status')} | {_num(out_err, '.2e')} "
            f"| {_num(grad_err, '.2e')} | {_num(mabs, '.2e')} | {tol_s} | {note[:120].replace('|', '/')} |"
        )
    extra_col = {"token_logprobs": ("vs TRL", "trl"), "linear_token_logprobs": ("÷ bare GEMM", "bare_gemm")}
    for op in ALL_OPS:
        all_rows = [r for r in report["results"] if r["op"] == op]
        if not all_rows:
            continue
        rows = [r for r in all_rows if r["status"] != "unavailable"]
        not_run: dict[tuple[str, str], int] = {}
        for r in all_rows:
            if r["status"] == "unavailable":
                key = (r["provider"], str(r.get("note") or ""))
                not_run[key] = not_run.get(key, 0) + 1
        info = report["ops"].get(op, {})
        lines += ["", f"## {op}", ""]
        if info.get("fastrlhf_problem"):
            lines += [f"fastrlhf: {info['fastrlhf_problem']}", ""]
        lines.append(f"Byte/FLOP model: {C.BYTE_MODELS[op]}")
        lines.append("")
        x_title, x_prov = extra_col.get(op, ("", ""))
        gemm_op = op == "linear_token_logprobs"
        pct_title = "% bf16 matmul peak" if gemm_op else "% copy peak"
        header = f"| case | dtype | mode | provider | ms | GB/s | {pct_title} | TFLOP/s | vs eager |"
        header += f" {x_title} |" if x_title else ""
        header += " extra MiB | extra excl. outputs MiB | status |"
        lines += [header, header_sep(header)]
        for r in rows:
            shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
            shape += "".join(f" {k}={v}" for k, v in r["params"].items())
            sv = r.get("speedup_vs", {})
            cells = [
                shape,
                r["dtype"],
                r["mode"],
                r["provider"],
                _num(r.get("ms"), ".4f"),
                _num(r.get("gbps"), ".0f"),
                _num(r.get("pct_matmul_peak" if gemm_op else "pct_copy_peak"), ".1f"),
                _num(r.get("tflops"), ".0f"),
                _num(r.get("speedup_vs_eager"), ".2f") + ("x" if r.get("speedup_vs_eager") else ""),
            ]
            if x_title:
                if x_prov == "trl":
                    v = sv.get("trl")
                    cells.append(_num(v, ".2f") + ("x" if v else ""))
                else:
                    bare = sv.get("bare_gemm")
                    cells.append(_num(1 / bare if bare else None, ".2f"))
            status = (
                r["status"]
                if r["status"] == "ok"
                else f"{r['status']}: {r.get('error') or r.get('note') or ''}"
            )
            if r["status"] == "ok" and r.get("note"):
                status += f" ({r['note']})"
            cells += [_num(r.get("extra_mem_mb"), ".0f"), _num(r.get("extra_mem_excl_outputs_mb"), ".0f")]
            cells.append(status.replace("|", "/").replace("\n", " ")[:160])
            lines.append("| " + " | ".join(cells) + " |")
        if not_run:
            lines.append("")
            for (provider, why), n in not_run.items():
                lines.append(f"- not run: {provider} ({n} case{'s' if n > 1 else ''}): {why[:300]}")
    peers = report.get("peers") or {}
    if peers:
        lines += ["", "## Peers", ""]
        for name, p in peers.items():
            state = "available" if p.get("available") else f"unavailable: {p.get('error')}"
            lines.append(f"- {name}: {state}" + (f" — {p['note']}" if p.get("note") else ""))
    groups = report.get("groups") or []
    if groups:
        lines += ["", "## Worker groups", ""]
        for g in groups:
            lines.append(
                f"- {g['group']}: rc={g.get('rc')} wall {g.get('wall_s')} s, attempts {g.get('attempts')}"
                + (f", excluded {g['excluded']}" if g.get("excluded") else "")
            )
    return "\n".join(lines) + "\n"


def header_sep(header: str) -> str:
    return "|" + " --- |" * (header.count("|") - 1)


def device_slug(name: str | None) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", (name or "unknown").lower()).strip("-")
    return slug[:48] or "unknown"


def _strict_json(obj: Any) -> Any:
    """NaN/inf become strings, so the file is strict JSON (jq, browsers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def write_report(report: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    tmp = json_path.with_suffix(".json.tmp")
    text = json.dumps(_strict_json(report), indent=1, default=str, allow_nan=False)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(json_path)
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path


# ------------------------------------------------------------------------------------ orchestration


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: $OUT if set, else benchmarks/results; dry run: a temp folder)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a small subset of cases, no torch.compile (sanity pass)"
    )
    p.add_argument("--dry-run", action="store_true", help="CPU: every case at tiny sizes, each provider once")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # CPU, tiny, the GPU code path
    p.add_argument("--skip-peaks", action="store_true", help=argparse.SUPPRESS)  # for the CPU tests
    p.add_argument("--ops", default=",".join(ALL_OPS), help="comma-separated ops (default: all)")
    p.add_argument("--providers", default=None, help="comma-separated providers (default: all)")
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument("--time-budget-s", type=float, default=520.0, help="whole run, shared between groups")
    p.add_argument(
        "--commit", default=None, help="git commit to record when .git is not there (a device copy)"
    )
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup (default 25, quick 10)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench rep (default 100, quick 40)")
    p.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; dry run eager)"
    )
    p.add_argument("--compile-timeout-s", type=float, default=90.0, help="per compile provider measurement")
    p.add_argument("--provider-timeout-s", type=float, default=120.0, help="per other provider measurement")
    p.add_argument(
        "--gae-compile-max-t",
        type=int,
        default=None,
        help="largest T compiled for gae/ppo (default 2048, quick 512)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--in-process", action="store_true", help="no worker processes (the dry run always is)")
    p.add_argument(
        "--merge", nargs="+", default=None, help="JSON reports to merge into one (no device needed)"
    )
    # internal: worker mode
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parts", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--exclude", default="", help=argparse.SUPPRESS)
    p.add_argument("--done-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    unknown = [o for o in ops if o not in ALL_OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {', '.join(ALL_OPS)}")
    args.ops = ops
    if args.providers:
        args.providers = tuple(x.strip() for x in args.providers.split(",") if x.strip())
        known = {x for ps in PROVIDERS.values() for x in ps}
        if set(args.providers) - known:
            p.error(f"unknown providers {sorted(set(args.providers) - known)}; choose from {sorted(known)}")
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (10.0 if args.quick else 25.0)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (40.0 if args.quick else 100.0)
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run or args.smoke else "inductor")
    if args.gae_compile_max_t is None:
        args.gae_compile_max_t = 512 if args.quick else 2048
    if args.quick and not args.dry_run:
        args.no_compile = True  # compile times would dominate a sanity pass
    return args


def worker_config(
    args: argparse.Namespace, deadline: float, exclude: set[tuple[str, str]], done: set[str]
) -> WorkerConfig:
    return WorkerConfig(
        dry_run=args.dry_run,
        smoke=args.smoke,
        quick=args.quick,
        ops=args.ops,
        providers=args.providers,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        compile_backend=args.compile_backend,
        compile_timeout_s=args.compile_timeout_s,
        provider_timeout_s=args.provider_timeout_s,
        gae_compile_max_t=args.gae_compile_max_t,
        no_compile=args.no_compile,
        deadline=deadline,
        exclude=exclude,
        done=done,
    )


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--ops", ",".join(args.ops), "--warmup-ms", str(args.warmup_ms), "--rep-ms", str(args.rep_ms)]
    out += ["--compile-backend", args.compile_backend, "--compile-timeout-s", str(args.compile_timeout_s)]
    out += [
        "--provider-timeout-s",
        str(args.provider_timeout_s),
        "--gae-compile-max-t",
        str(args.gae_compile_max_t),
    ]
    if args.providers:
        out += ["--providers", ",".join(args.providers)]
    if args.quick:
        out.append("--quick")
    if args.smoke:
        out.append("--smoke")
    if args.no_compile:
        out.append("--no-compile")
    return out


def _spawn(cmd: list[str], timeout: float, log_fh: Any) -> tuple[int, bool]:
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


def worker_main(args: argparse.Namespace) -> int:
    exclude = {tuple(x.split(":", 1)) for x in args.exclude.split(",") if ":" in x}
    done: set[str] = set()
    if args.done_file and Path(args.done_file).exists():
        done = set(json.loads(Path(args.done_file).read_text()))
    cfg = worker_config(args, args.deadline or time.time() + 3600, exclude, done)  # type: ignore[arg-type]
    return run_group(args.worker, cfg, Path(args.parts))


def merge_main(args: argparse.Namespace) -> int:
    records: list[dict[str, Any]] = []
    envs: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    for path in args.merge:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        records += data.get("records", [])
        envs.append(data.get("env", {}))
        groups += data.get("groups", [])
    env = dict(envs[0]) if envs else {}
    env["merged_from"] = [str(p) for p in args.merge]
    names = {e.get("device_name") for e in envs}
    if len(names) > 1:
        env["warning"] = f"merged runs from different devices: {sorted(map(str, names))}"
    report = build_report(records, {"env": env, "groups": groups})
    date = str(env.get("date", ""))[:10]
    stem = f"kernels-{device_slug(env.get('device_name'))}-{date}-{args.tag or 'merged'}"
    out = Path(args.out or os.environ.get("OUT") or HERE / "results")
    json_path, md_path = write_report(report, out, stem)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.merge:
        return merge_main(args)
    if not (args.dry_run or args.smoke) and not torch.cuda.is_available():
        print(
            "gpu_kernels.py: no CUDA device (torch.cuda.is_available() is False). This script times the "
            "Triton kernels on a GPU; on a CPU machine run it with --dry-run to check the script itself.",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    env = _static_env(sys.argv if argv is None else ["gpu_kernels.py", *argv])
    if env["git_commit"] is None and args.commit:
        env["git_commit"] = args.commit
    env["run_mode"] = (
        "dry-run" if args.dry_run else "smoke" if args.smoke else "quick" if args.quick else "full"
    )
    date = env["date"][:10]
    tag = args.tag
    if tag is None:
        parts = []
        if args.dry_run:
            parts.append("dryrun")
        if args.smoke:
            parts.append("smoke")
        if args.quick:
            parts.append("quick")
        if set(args.ops) != set(ALL_OPS):
            parts.append("ops-" + "-".join(OP_ABBREV[o] for o in args.ops))
        tag = "-".join(parts) or None
    if args.out:
        out_dir = Path(args.out)
    elif args.dry_run or args.smoke:  # CPU checks of the script stay out of the results folder
        out_dir = Path(tempfile.gettempdir()) / "fastrlhf-bench-dryrun"
    else:
        out_dir = Path(os.environ.get("OUT") or HERE / "results")
    tmp = Path(tempfile.mkdtemp(prefix="fastrlhf-bench-"))
    log_path = tmp / "run.log"
    groups = [g for g, (ops, _) in GROUPS.items() if set(ops) & set(args.ops)]
    groups = groups if args.skip_peaks else ["peaks", *groups]
    in_process = args.dry_run or args.in_process
    meta: dict[str, Any] = {"env": env, "groups": []}
    all_records: list[dict[str, Any]] = []
    stem = ""
    rc_total = 0
    with log_path.open("w", encoding="utf-8") as log_fh:
        for gi, group in enumerate(groups):
            remaining = args.time_budget_s - (time.time() - started)
            weights = [GROUPS[g][1] for g in groups[gi:]]
            budget = max(0.0, remaining) * GROUPS[group][1] / sum(weights)
            deadline = time.time() + budget
            parts = tmp / f"{group}.jsonl"
            exclude: set[tuple[str, str]] = set()
            attempts, rc, t0, timed_out = 0, 0, time.time(), False
            log(f"group {group}: budget {budget:.0f} s")
            while True:
                attempts += 1
                done = {r["done_key"] for r in _read_parts(parts) if r.get("done_key")}
                if in_process:
                    cfg = worker_config(
                        args, deadline if not args.dry_run else time.time() + 10**6, exclude, done
                    )
                    try:
                        rc = run_group(group, cfg, parts)
                    except Exception as e:  # a script bug: record it and carry on with the next group
                        rc = 1
                        _append(
                            parts,
                            type="group_error",
                            group=group,
                            error=_short(e),
                            traceback=traceback.format_exc(),
                        )
                        traceback.print_exc()
                else:
                    done_file = tmp / f"{group}.done.json"
                    done_file.write_text(json.dumps(sorted(done)))
                    cmd = [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--worker",
                        group,
                        "--parts",
                        str(parts),
                    ]
                    cmd += ["--deadline", str(deadline), "--done-file", str(done_file)]
                    cmd += ["--exclude", ",".join(f"{o}:{p}" for o, p in sorted(exclude))] if exclude else []
                    cmd += _passthrough(args)
                    rc, timed_out = _spawn(cmd, deadline - time.time() + 30, log_fh)
                    if timed_out:
                        _append(parts, type="group_error", group=group, error="worker killed at its deadline")
                records = _read_parts(parts)
                new = {(r["op"], r["provider"]) for r in records if r.get("type") == "fatal"} - exclude
                if rc not in (0, 3) and not in_process and not timed_out:
                    # the worker died (segfault, uncaught error): blame the measurement it had started
                    culprit = _unfinished_start(records)
                    if culprit:
                        new.add((culprit["op"], culprit["provider"]))
                        error = f"the worker process died (exit status {rc}) during this measurement"
                        died = {**culprit, "type": culprit["kind"], "status": "error", "error": error}
                        _append(parts, **died)
                        _append(parts, type="fatal", op=died["op"], provider=died["provider"], error=error)
                if rc != 0 and new and attempts < 4 and time.time() < deadline - 20:
                    exclude |= new
                    log(f"group {group}: restarting without {sorted(new)}")
                    continue
                break
            if rc not in (0, 3):
                rc_total = 1
            meta["groups"].append(
                {
                    "group": group,
                    "rc": rc,
                    "attempts": attempts,
                    "wall_s": round(time.time() - t0, 1),
                    "excluded": [f"{o}:{p}" for o, p in sorted(exclude)],
                }
            )
            all_records = [
                {**r, "run": env["date"]} for g in groups[: gi + 1] for r in _read_parts(tmp / f"{g}.jsonl")
            ]
            report = build_report(all_records, meta)
            slug = "cpu" if args.dry_run or args.smoke else device_slug(report["env"].get("device_name"))
            stem = f"kernels-{slug}-{date}" + (f"-{tag}" if tag else "")
            write_report(report, out_dir, stem)
            log_fh.flush()
            shutil.copy(log_path, out_dir / f"{stem}.log")
    shutil.copy(log_path, out_dir / f"{stem}.log")
    report = build_report(all_records, meta)
    json_path, md_path = write_report(report, out_dir, stem)
    shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path}, {md_path} and {stem}.log in {time.time() - started:.0f} s")
    if args.dry_run or args.smoke:
        return dry_run_verdict(report) or rc_total
    return rc_total


def _unfinished_start(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last measurement a worker started but never recorded (its start record), if any."""
    finished = {(r.get("type"), r.get("case"), r.get("provider")) for r in records}
    for r in reversed(records):
        if r.get("type") == "start":
            return None if (r["kind"], r["case"], r["provider"]) in finished else r
    return None


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


if __name__ == "__main__":
    sys.exit(main())
