#!/usr/bin/env python
"""Offline compile check: every Triton kernel specialization the public ops launch, compiled to cubin.

No GPU is needed (Triton ships ptxas)::

    python benchmarks/compile_kernels.py [--arch 80 86 89 90] [--json out.json] [--jobs 2] [--reuse-cache]

How. The public ops of ``fastrlhf.kernels`` run on ``meta`` tensors at realistic sizes (forward and
backward) with the Triton path forced, while ``JITFunction.run`` records each launch instead of running it.
So whatever kernel an op launches is found, with no list of kernels to keep up to date. Each launch is then
specialized the way the JIT would for that architecture (Triton's own binder: i32/i64, ints equal to 1,
16-divisibility of ints and of pointers, constexprs, num_warps / num_stages), the distinct specializations
go through ``triton.compile`` to cubin, and ptxas's ``-v`` report gives registers and spills. Pointers
carry the alignment the real tensors would have (their storage offset; allocations start 16-byte aligned).

Fails (exit 1) on any compile error, any register spill, a grid over CUDA's limits, or no launch recorded.
Prints one line per kernel variant and architecture: registers, spill bytes, shared memory, and the
16-byte vector share of global loads and stores, and cp.async count (pipelining) read from the PTX.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels.py compiles the kernels: run it with TRITON_INTERPRET unset (or 0)")

import torch

DEFAULT_ARCHS = (80, 86, 89, 90)
# CUDA's grid limits: x up to 2^31 - 1, y and z up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# Realistic GPU size for ops that split work by the SM count (an H100 has 132).
_SM_COUNT = 132
META = torch.device("meta")


# ------------------------------------------------------------------------------------------- recording


class _Pointer:
    """What the JIT's binder sees of a tensor: its dtype and an address as aligned as a real allocation's."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self._ptr = 1024 + t.storage_offset() * t.element_size()  # storage bases are 16-byte aligned

    def data_ptr(self) -> int:
        return self._ptr


@dataclass
class Launch:
    kernel: Any  # the JITFunction
    args: list[Any]
    kwargs: dict[str, Any]
    grid: tuple[int, ...]
    case: str


def _stand_in(arg: Any) -> Any:
    return _Pointer(arg) if isinstance(arg, torch.Tensor) else arg


def _kernel_modules() -> list[Any]:
    package = importlib.import_module("fastrlhf.kernels")
    names = [m.name for m in pkgutil.iter_modules(package.__path__)]
    return [importlib.import_module(f"fastrlhf.kernels.{name}") for name in names]


@contextlib.contextmanager
def recording(launches: list[Launch], case: list[str]):
    """Force the Triton path on meta tensors and record every JIT launch instead of running it."""
    from triton.runtime.jit import JITFunction

    def record(self, *args, grid, warmup, **kwargs):
        if callable(grid):
            params = dict(zip([p.name for p in self.params], args, strict=False)) | kwargs
            grid = grid(params)
        grid = tuple(int(g) for g in grid)
        launches.append(Launch(self, [_stand_in(a) for a in args], dict(kwargs), grid, case[0]))

    patched: list[tuple[Any, str, Any]] = [(JITFunction, "run", JITFunction.run)]
    JITFunction.run = record
    for module in _kernel_modules():
        if hasattr(module, "use_triton"):
            patched.append((module, "use_triton", module.use_triton))
            module.use_triton = lambda *tensors: True
        if hasattr(module, "_multiprocessors"):
            patched.append((module, "_multiprocessors", module._multiprocessors))
            module._multiprocessors = lambda device: _SM_COUNT
    try:
        yield
    finally:
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)


# --------------------------------------------------------------------------------------------- the ops


def _t(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META, requires_grad=grad)


def _ids(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int64, device=META)


def _backward(*outputs: torch.Tensor) -> None:
    outs = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def _token_logprobs_cases() -> dict[str, Callable[[], None]]:
    from fastrlhf.kernels import token_logprobs

    def run(logits: torch.Tensor, entropy: bool, temperature: float = 1.0, ent_grad: bool = True) -> None:
        ids = _ids(*logits.shape[:-1])
        out = token_logprobs(logits, ids, temperature=temperature, return_entropy=entropy)
        outs = out if entropy else (out,)
        _backward(*(outs if ent_grad else outs[:1]))

    cases: dict[str, Callable[[], None]] = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        cases[f"token_logprobs 32768x151936 {name} +entropy"] = lambda d=dtype: run(
            _t(32768, 151936, dtype=d, grad=True), True, 0.7
        )
        cases[f"token_logprobs 8x4097x50257[:, :-1] {name}"] = lambda d=dtype: run(
            _t(8, 4097, 50257, dtype=d, grad=True)[:, :-1], False
        )
        cases[f"token_logprobs 4x2050x50257[:, ::2] {name} +entropy, logp grad only"] = lambda d=dtype: run(
            _t(4, 2050, 50257, dtype=d, grad=True)[:, ::2], True, ent_grad=False
        )
    cases["token_logprobs 8x4097x151936[:, :-1] bf16 +entropy"] = lambda: run(
        _t(8, 4097, 151936, dtype=torch.bfloat16, grad=True)[:, :-1], True
    )
    cases["token_logprobs 1000x64 bf16"] = lambda: run(_t(1000, 64, dtype=torch.bfloat16, grad=True), True)
    cases["token_logprobs 7x1 fp32"] = lambda: run(_t(7, 1, grad=True), True)
    cases["token_logprobs 1x1 fp32"] = lambda: run(_t(1, 1, grad=True), False)
    return cases


def _linear_cases() -> dict[str, Callable[[], None]]:
    from fastrlhf.kernels import linear_token_logprobs

    accepted = set(inspect.signature(linear_token_logprobs).parameters)
    cases: dict[str, Callable[[], None]] = {}

    def run(n: int, h: int, v: int, dtype: torch.dtype, **options: Any) -> None:
        options = {k: val for k, val in options.items() if k in accepted}  # options this version has
        entropy = options.get("return_entropy", False)
        if "bias" in options:
            options["bias"] = _t(v, dtype=dtype, grad=True)
        out = linear_token_logprobs(
            _t(n, h, dtype=dtype, grad=True), _t(v, h, dtype=dtype, grad=True), _ids(n), **options
        )
        _backward(*(out if entropy else (out,)))

    option_sets: list[dict[str, Any]] = [
        {},
        {"bias": True, "return_entropy": True, "temperature": 0.7},
        {"softcap": 30.0, "return_entropy": True},
        {"logit_scale": 0.25, "bias": True},
        {"softcap": 30.0, "logit_scale": 0.5, "temperature": 0.9},
    ]
    for h, v in ((896, 151936), (4096, 128256), (896, 50257), (4096, 151936)):
        for dtype in (torch.bfloat16, torch.float16):
            for options in option_sets:
                label = ",".join(f"{k}" for k in options) or "plain"
                cases[f"linear 8192x{h} V={v} {str(dtype).removeprefix('torch.')} {label}"] = (
                    lambda h=h, v=v, d=dtype, o=options: run(8192, h, v, d, **o)
                )
    cases["linear 1000x256 V=50021 fp32 bias,entropy"] = lambda: run(
        1000, 256, 50021, torch.float32, bias=True, return_entropy=True
    )
    cases["linear 1x64 V=1 bf16"] = lambda: run(1, 64, 1, torch.bfloat16)
    return cases


def _rl_cases() -> dict[str, Callable[[], None]]:
    from fastrlhf.kernels import (
        gae,
        kl_penalty,
        masked_mean,
        masked_var,
        masked_whiten,
        ppo_advantages,
        shape_rewards,
    )

    cases: dict[str, Callable[[], None]] = {}
    sizes = ((512, 2048), (100_000, 7), (1, 1_000_000), (3, 1), (64, 3000))
    for b, t in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")

            def rl(b=b, t=t, d=dtype) -> None:
                logp, ref = _t(b, t, dtype=d, grad=True), _t(b, t, dtype=d, grad=True)
                mask = torch.empty((b, t), dtype=torch.bool, device=META)
                for estimator in ("k1", "k2", "k3"):
                    _backward(kl_penalty(logp, ref, estimator=estimator))
                    shape_rewards(
                        _t(b, dtype=d), logp.detach(), ref.detach(), mask, kl_coef=0.05, estimator=estimator
                    )
                    ppo_advantages(
                        _t(b, dtype=d), logp.detach(), ref.detach(), _t(b, t, dtype=d), mask, kl_coef=_t(),
                        estimator=estimator, whiten=estimator != "k2",
                    )  # fmt: skip
                _backward(kl_penalty(logp, ref.detach()))  # one gradient needed only
                gae(_t(b, t, dtype=d), _t(b, t), mask.to(torch.uint8), gamma=0.99, lam=0.95)
                masked_whiten(_t(b, t, dtype=d), mask, shift_mean=False)
                masked_mean(_t(b, t, dtype=d), mask)
                masked_var(_t(b, t), mask, unbiased=False)

            cases[f"rl ops {b}x{t} {name}"] = rl
    # Element counts past 2^31: the offsets and loop bounds become i64.
    cases["rl ops 3e9 elements"] = lambda: (
        masked_whiten(_t(3, 10**9), torch.empty((3, 10**9), dtype=torch.bool, device=META)),
        _backward(kl_penalty(_t(3, 10**9, grad=True), _t(3, 10**9))),
    )
    return cases


def all_cases() -> dict[str, Callable[[], None]]:
    return {**_token_logprobs_cases(), **_linear_cases(), **_rl_cases()}


def record_launches() -> tuple[list[Launch], list[str]]:
    launches: list[Launch] = []
    errors: list[str] = []
    current = [""]
    with recording(launches, current):
        for name, case in all_cases().items():
            current[0] = name
            try:
                case()
            except Exception as err:  # a launcher that cannot even set up its launch is a failure too
                errors.append(f"{name}: {type(err).__name__}: {err}")
    return launches, errors


# ---------------------------------------------------------------------------------------- specializing


@dataclass
class Variant:
    kernel_index: int
    kernel: str
    arch: int
    signature: dict[str, str]
    constexprs: dict[tuple, Any]  # keyed by argument path, as triton.compile takes them
    attrs: dict[tuple, Any]
    options: dict[str, Any]
    case: str  # the first op call that launched it
    grids: set[tuple[int, ...]] = field(default_factory=set)

    def describe(self) -> str:
        names = [p.name for p in _KERNELS[self.kernel_index].params] if _KERNELS else []
        named = {names[k[0]] if len(k) == 1 and names else str(k): v for k, v in self.constexprs.items()}
        special = sorted(
            (names[k[0]] if len(k) == 1 and names else str(k))
            + ("%16" if any("divisibility" in str(a) for a in v) else "")
            for k, v in self.attrs.items()
            if v and names and self.signature[names[k[0]]][0] != "*"
        )
        return (
            _key_text(named)
            + (" " + ",".join(special) if special else "")
            + f" warps={self.options.get('num_warps')}"
        )


def _key_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def specialize(launches: list[Launch], archs: list[int]) -> tuple[list[Any], list[Variant]]:
    """The distinct compiles the launches need, per architecture, as Triton's JIT would specialize them."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernels: list[Any] = []
    variants: dict[str, Variant] = {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders: dict[int, Any] = {}
        for launch in launches:
            fn = launch.kernel
            if id(fn) not in binders:
                binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
                if fn not in kernels:
                    kernels.append(fn)
            kwargs = dict(launch.kwargs)
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            bound, specialization, options = binders[id(fn)](*launch.args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(
                backend, kwargs, bound, specialization, options
            )
            key = _key_text(
                [
                    fn.__name__,
                    arch,
                    signature,
                    sorted(constexprs.items()),
                    sorted(attrs.items()),
                    options.__dict__,
                ]
            )
            if key not in variants:
                variants[key] = Variant(
                    kernels.index(fn),
                    fn.__name__,
                    arch,
                    signature,
                    constexprs,
                    attrs,
                    options.__dict__,
                    launch.case,
                )
            variants[key].grids.add(launch.grid)
    return kernels, list(variants.values())


# ------------------------------------------------------------------------------------------- compiling

_KERNELS: list[Any] = []  # the JITFunctions, inherited by forked workers
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Result:
    kernel: str
    arch: int
    case: str
    constexprs: str
    signature: str
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    global_loads: int = 0
    vector_loads: int = 0
    global_stores: int = 0
    vector_stores: int = 0
    cp_async: int = 0
    seconds: float = 0.0
    grids_ok: bool = True
    error: str | None = None


def _ptx_counts(ptx: str) -> dict[str, int]:
    loads = re.findall(r"\bld\.global[.\w]*", ptx)
    stores = re.findall(r"\bst\.global[.\w]*", ptx)
    is_vector = re.compile(r"\.v[248]\b")
    return {
        "global_loads": len(loads),
        "vector_loads": sum(bool(is_vector.search(x)) for x in loads),
        "global_stores": len(stores),
        "vector_stores": sum(bool(is_vector.search(x)) for x in stores),
        "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx)),
    }


def _ptxas_report(ptx: str, arch: int) -> str:
    """ptxas -v on the PTX, for a kernel that came from Triton's cache (no fresh ptxas log to read)."""
    import subprocess

    from triton.backends.nvidia import compiler as nv

    tool = nv.get_ptxas(arch) if "arch" in inspect.signature(nv.get_ptxas).parameters else nv.get_ptxas()
    gpu = nv.sm_arch_from_capability(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [tool.path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_variant(variant: Variant) -> Result:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result(
        variant.kernel, variant.arch, variant.case, variant.describe(), _key_text(variant.signature)
    )
    result.grids_ok = all(
        all(0 < g <= limit for g, limit in zip(grid, GRID_LIMITS, strict=False)) for grid in variant.grids
    )
    fn = _KERNELS[variant.kernel_index]
    start = time.perf_counter()
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, variant.signature, variant.constexprs, variant.attrs),
                target=GPUTarget("cuda", variant.arch, 32),
                options=variant.options,
            )
        report = log.getvalue()
        if not _PTXAS_USED.search(report):
            report = _ptxas_report(compiled.asm["ptx"], variant.arch)
        used, spill = _PTXAS_USED.search(report), _PTXAS_SPILL.search(report)
        result.registers = int(used.group(1)) if used else None
        result.spill_bytes = int(spill.group(1)) + int(spill.group(2)) if spill else None
        result.shared_bytes = int(compiled.metadata.shared)
        for k, v in _ptx_counts(compiled.asm["ptx"]).items():
            setattr(result, k, v)
        if "cubin" not in compiled.asm:
            result.error = "no cubin produced"
    except Exception as err:
        result.error = f"{type(err).__name__}: {str(err)[-2000:]}"
    result.seconds = time.perf_counter() - start
    return result


def failures(results: list[Result], setup_errors: list[str]) -> list[str]:
    out = list(setup_errors)
    for r in results:
        where = f"{r.kernel} sm_{r.arch} ({r.case})"
        if r.error:
            out.append(f"{where}: {r.error}")
        elif r.registers is None or r.spill_bytes is None:
            out.append(f"{where}: no ptxas register report")
        elif r.spill_bytes:
            out.append(f"{where}: {r.spill_bytes} bytes of register spills")
        if not r.grids_ok:
            out.append(f"{where}: a grid exceeds CUDA's limits")
    if not results:
        out.append("no kernel launch was recorded")
    return out


def _table(results: list[Result]) -> str:
    columns = (
        ("sm", 3),
        ("regs", 4),
        ("spill", 5),
        ("shared", 7),
        ("vec ld", 7),
        ("vec st", 7),
        ("cp.async", 8),
    )
    header = f"{'kernel':<34} " + " ".join(f"{name:>{width}}" for name, width in columns)
    lines = [header, "-" * len(header)]
    for r in sorted(results, key=lambda r: (r.kernel, r.constexprs, r.signature, r.arch)):
        if r.error:
            lines.append(f"{r.kernel:<34} {r.arch:>3} ERROR {r.error.splitlines()[0][:80]}")
            continue
        lines.append(
            f"{r.kernel:<34} {r.arch:>3} {r.registers!s:>4} {r.spill_bytes!s:>5} {r.shared_bytes:>7} "
            f"{f'{r.vector_loads}/{r.global_loads}':>7} {f'{r.vector_stores}/{r.global_stores}':>7} "
            f"{r.cp_async:>8}   {r.constexprs}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities"
    )
    parser.add_argument("--json", help="write every variant's result to this file")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument(
        "--reuse-cache",
        action="store_true",
        help="use Triton's kernel cache (default: a fresh one, so all compile)",
    )
    args = parser.parse_args(argv)
    if any(a < 70 for a in args.arch):
        parser.error(f"--arch takes compute capabilities such as 80 or 90, got {args.arch}")
    cache = None if args.reuse_cache else tempfile.TemporaryDirectory(prefix="fastrlhf-compile-")
    if cache is not None:
        os.environ["TRITON_CACHE_DIR"] = cache.name

    import triton

    begin = time.perf_counter()
    launches, setup_errors = record_launches()
    kernels, variants = specialize(launches, args.arch)
    _KERNELS[:] = kernels
    recorded = time.perf_counter() - begin
    # Largest kernels first, so the two workers finish together.
    variants.sort(key=lambda v: -len(v.signature) - 10 * ("linear" in v.kernel))
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
            results = list(pool.map(compile_variant, variants))
    else:
        results = [compile_variant(v) for v in variants]
    elapsed = time.perf_counter() - begin

    print(_table(results))
    per_arch = len(variants) // max(1, len(args.arch))
    print(
        f"\n{len(launches)} launches from {len({launch.case for launch in launches})} op calls -> "
        f"{len(kernels)} kernels, ~{per_arch} specializations per arch x {len(args.arch)} archs = "
        f"{len(variants)} compiles; triton {triton.__version__}; recorded in {recorded:.1f} s, "
        f"{elapsed:.1f} s in all with {args.jobs} process(es)"
    )
    problems = failures(results, setup_errors)
    if args.json:
        payload = {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "archs": args.arch,
            "seconds": elapsed,
            "kernels": sorted({fn.__name__ for fn in kernels}),
            "results": [asdict(r) for r in results],
            "failures": problems,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    for problem in problems:
        print("FAIL", problem, file=sys.stderr)
    if cache is not None:
        cache.cleanup()
    print("FAILED" if problems else "OK: every variant compiled without spills")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
