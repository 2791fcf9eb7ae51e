#!/usr/bin/env python
"""Offline compile check: every Triton kernel specialization the public ops launch, compiled to cubin with
Triton's bundled ptxas (no GPU needed)::

    python benchmarks/compile_kernels.py [--arch 86 89 90] [--out report.json] [--jobs N]

For each architecture, the public ops run on ``meta`` tensors at realistic sizes (forward and backward) with
the Triton path forced, the device's capability and SM count set to the target's, and ``JITFunction.run``
recording each launch instead of running it: every kernel an op launches is found, with the tiles and warps
that architecture would get. Each launch is specialized as the JIT would (Triton's own binder: i32/i64, ints
equal to 1, 16-divisibility, constexprs, warps, stages); each distinct specialization is compiled once, in a
fresh Triton cache, and ptxas's ``-v`` log gives its registers and spills.

Exits 1 on any compile error, register spill, grid over CUDA's limits, or kernel module with no launch.
Prints one line per kernel; ``--out`` writes a summary per kernel module and architecture, and every
variant's report (registers, spills, shared memory, vectorized loads, cp.async count), as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from types import SimpleNamespace
from typing import Any, NamedTuple
from unittest import mock

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels.py compiles the kernels: run it with TRITON_INTERPRET unset (or 0)")

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastrlhf import kernels as ops

DEFAULT_ARCHS = (86, 89, 90)
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's: x up to 2^31 - 1, y and z up to 65535
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}  # A100, A40 / RTX 3090, L40S / RTX 4090, H100 SXM
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
META = torch.device("meta")
_name = lambda dtype: str(dtype).removeprefix("torch.")  # "bfloat16"

# --------------------------------------------------------------------------------------------- the ops


def _t(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META, requires_grad=grad)


def _ids(*shape: int) -> torch.Tensor:
    return _t(*shape, dtype=torch.int64)


def _backward(*outputs: torch.Tensor) -> None:
    outs = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def _logprobs(logits: torch.Tensor, entropy=False, temperature=1.0, ent_grad=True) -> None:
    ids = _ids(*logits.shape[:-1])
    out = ops.token_logprobs(logits, ids, temperature=temperature, return_entropy=entropy)
    outs = out if entropy else (out,)
    _backward(*(outs if ent_grad else outs[:1]))


def _linear(n, h, v, dtype, bias=False, frozen=False, tf32=False, **options) -> None:
    hidden, weight = _t(n, h, dtype=dtype, grad=True), _t(v, h, dtype=dtype, grad=not frozen)
    bias = _t(v, dtype=dtype, grad=True) if bias else None
    matmul, allow_tf32 = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    matmul.allow_tf32 = tf32  # fp32 operands follow torch's TF32 switch (the kernels' PRECISION constexpr)
    try:
        out = ops.linear_token_logprobs(hidden, weight, _ids(n), bias=bias, **options)
        _backward(*(out if options.get("return_entropy") else (out,)))
    finally:
        matmul.allow_tf32 = allow_tf32


def _rl_ops(b: int, t: int, d: torch.dtype) -> None:
    logp, ref, mask = _t(b, t, dtype=d, grad=True), _t(b, t, dtype=d, grad=True), _t(b, t, dtype=torch.bool)
    for estimator in ("k1", "k2", "k3"):
        _backward(ops.kl_penalty(logp, ref, estimator=estimator))
        scores, lp, rl, values = _t(b, dtype=d), logp.detach(), ref.detach(), _t(b, t, dtype=d)
        ops.shape_rewards(scores, lp, rl, mask, kl_coef=0.05, estimator=estimator)
        whiten = estimator != "k2"
        ops.ppo_advantages(scores, lp, rl, values, mask, kl_coef=_t(), estimator=estimator, whiten=whiten)
    _backward(ops.kl_penalty(logp, ref.detach()))  # one gradient needed only
    ops.gae(_t(b, t, dtype=d), _t(b, t), mask.to(torch.uint8), gamma=0.99, lam=0.95)
    ops.masked_whiten(_t(b, t, dtype=d), mask, shift_mean=False)
    ops.masked_mean(_t(b, t, dtype=d), mask)
    ops.masked_var(_t(b, t), mask, unbiased=False)
    for k, estimator in ((2, "grpo"), (16, "dr_grpo"), (64, "rloo"), (64, "grpo")):
        ops.group_advantages(_t(b * k, dtype=d), k, estimator=estimator)


def op_calls(case) -> None:
    """Every op call, forward and backward; ``with case(name):`` names the calls and catches their errors."""
    for d in DTYPES:
        with case(f"token_logprobs 32768x151936 {_name(d)} entropy"):
            _logprobs(_t(32768, 151936, dtype=d, grad=True), True, 0.7)
        with case(f"token_logprobs 8x4097x50257[:, :-1] {_name(d)}"):
            _logprobs(_t(8, 4097, 50257, dtype=d, grad=True)[:, :-1])
        with case(f"token_logprobs 4x2050x50257[:, ::2] {_name(d)} entropy, logp grad only"):
            _logprobs(_t(4, 2050, 50257, dtype=d, grad=True)[:, ::2], True, ent_grad=False)
    with case("token_logprobs 1000x64 bf16 entropy"):
        _logprobs(_t(1000, 64, dtype=torch.bfloat16, grad=True), True)
    with case("token_logprobs 7x1 fp32 entropy"):
        _logprobs(_t(7, 1, grad=True), True)

    # Each option set once per 16-bit dtype, spread over the (H, V) of Qwen2.5-0.5B, Llama-3-8B, GPT-2 (odd
    # V) and Qwen2.5-7B: the variants differ in their constexprs and in V's 16-divisibility.
    shapes = ((896, 151936), (4096, 128256), (896, 50257), (4096, 151936))
    option_sets: list[dict[str, Any]] = [
        {}, {"bias": True, "return_entropy": True, "temperature": 0.7},
        {"softcap": 30.0, "return_entropy": True}, {"logit_scale": 0.25, "bias": True},
        {"softcap": 30.0, "logit_scale": 0.5, "temperature": 0.9},
        {"grad_filter_eps": 2**-12}, {"grad_filter_eps": 2**-12, "return_entropy": True, "bias": True},
    ]  # fmt: skip
    for shift, d in enumerate(DTYPES[:2]):
        for i, options in enumerate(option_sets):
            h, v = shapes[(i + shift) % len(shapes)]
            with case(f"linear 8192x{h} V={v} {_name(d)} {','.join(options) or 'plain'}"):
                _linear(8192, h, v, d, **options)
    with case("linear 8192x896 V=151936 bf16 frozen weight"):
        _linear(8192, 896, 151936, torch.bfloat16, frozen=True)
    with case("linear 1000x256 V=50021 fp32 bias,entropy"):
        _linear(1000, 256, 50021, torch.float32, bias=True, return_entropy=True)
    with case("linear 1000x256 V=32003 fp32 tf32,softcap"):
        _linear(1000, 256, 32003, torch.float32, tf32=True, softcap=30.0)
    with case("linear 1000x256 V=32003 fp32 grad_filter_eps"):
        _linear(1000, 256, 32003, torch.float32, grad_filter_eps=2**-12)
    with case("linear 1x64 V=1 bf16"):
        _linear(1, 64, 1, torch.bfloat16)

    for b, t in ((512, 2048), (100_000, 7), (1, 1_000_000), (3, 1), (64, 3000)):
        for d in (torch.float32, torch.bfloat16):
            with case(f"rl ops {b}x{t} {_name(d)}"):
                _rl_ops(b, t, d)
    with case("rl ops 3e9 elements"):  # past 2^31: the offsets and loop bounds become i64
        ops.masked_whiten(_t(3, 10**9), _t(3, 10**9, dtype=torch.bool))
        _backward(ops.kl_penalty(_t(3, 10**9, grad=True), _t(3, 10**9)))

    # Every sampling mode on bf16 logits (the models' dtype), one on each other dtype; Qwen's and GPT-2's V.
    greedy, plain, nucleus = {"greedy": True}, {"temperature": 0.7}, {"top_p": 0.9, "suppress_ids": _ids(3)}
    for d, v, options in ((torch.bfloat16, 151936, greedy), (torch.bfloat16, 50257, plain),
                          (torch.bfloat16, 151936, nucleus), (torch.float16, 50257, nucleus),
                          (torch.float32, 151936, plain)):  # fmt: skip
        with case(f"sample_tokens 256x{v} {_name(d)} {','.join(options)}"):
            ops.sample_tokens(_t(256, v, dtype=d), seed=_ids(1), **options)
    with case("sample_tokens 3x1 fp32 top_p"):
        ops.sample_tokens(_t(3, 1), seed=_ids(1), top_p=0.5)


# ------------------------------------------------------------------------------------------- recording


def _pointer(t: torch.Tensor) -> SimpleNamespace:
    """What the JIT's binder sees of a tensor: its dtype and an address as aligned as a real allocation's."""
    address = 1024 + t.storage_offset() * t.element_size()  # allocations are 16-byte aligned
    return SimpleNamespace(dtype=t.dtype, data_ptr=lambda: address)


class Launch(NamedTuple):
    kernel: Any  # the JITFunction
    args: list[Any]
    kwargs: dict[str, Any]
    grid: tuple[int, ...]
    case: str


def kernel_modules() -> dict[str, Any]:
    """fastrlhf.kernels' modules that define Triton kernels, by name."""
    names = [m.name for m in pkgutil.iter_modules(ops.__path__)]
    modules = {name: importlib.import_module(f"fastrlhf.kernels.{name}") for name in names}
    return {n: m for n, m in modules.items() if any(isinstance(x, JITFunction) for x in vars(m).values())}


def record_launches(arch: int) -> tuple[list[Launch], list[str]]:
    """Every launch of ``op_calls`` as an ``arch`` GPU would get it (none runs), and the calls that failed."""
    launches, errors, current = [], [], [""]  # current: the op call running

    def record(self, *args, grid, warmup, **kwargs):
        if callable(grid):
            grid = grid(dict(zip([p.name for p in self.params], args, strict=False)) | kwargs)
        args = [_pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        launches.append(Launch(self, args, kwargs, tuple(int(g) for g in grid), current[0]))

    @contextlib.contextmanager
    def case(name: str):
        current[0] = name
        try:
            yield
        except Exception as err:  # a launcher that cannot even set up its launch is a failure too
            errors.append(f"sm_{arch} {name}: {type(err).__name__}: {err}")

    fakes = {
        "use_triton": lambda *tensors: True,
        "_multiprocessors": lambda device: SM_COUNT.get(arch, 132),
        "_capability": lambda device: divmod(arch, 10),  # linear_token_logprobs' tiles for this arch
    }
    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(JITFunction, "run", record))
        for module in kernel_modules().values():
            for name, fake in fakes.items():
                if hasattr(module, name):
                    patches.enter_context(mock.patch.object(module, name, fake))
        op_calls(case)
    return launches, errors


# ---------------------------------------------------------------------------------------- specializing


@dataclass
class Variant:
    """One distinct compile: triton.compile's inputs, where they came from, and the compile's report."""

    module: str  # the kernel's module in fastrlhf.kernels
    kernel: str
    arch: int
    case: str  # the first op call that launched it
    label: str  # its constexprs and warps
    grids_ok: bool
    source: tuple[Any, ...]  # (signature, constexprs, attrs, options), as triton.compile takes them
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    vector_loads: str = ""  # 16-byte global loads / all global loads, in the PTX
    cp_async: int = 0  # pipelined (cp.async) copies in the PTX
    seconds: float = 0.0
    error: str | None = None


def specialize(launches: list[Launch], arch: int) -> list[Variant]:
    """The distinct compiles the launches need on ``arch``, specialized as Triton's JIT would."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders: dict[int, Any] = {}
    variants: dict[str, Variant] = {}
    for launch in launches:
        fn = launch.kernel
        if id(fn) not in binders:
            binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = launch.kwargs | {"debug": launch.kwargs.get("debug", fn.debug) or knobs.runtime.debug}
        bound, specialization, options = binders[id(fn)](*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        source = (signature, constexprs, attrs, options.__dict__)
        key = json.dumps([fn.__name__, *(sorted(x.items()) for x in source)], sort_keys=True, default=repr)
        grid_ok = all(0 < g <= limit for g, limit in zip(launch.grid, GRID_LIMITS, strict=False))
        if key in variants:
            variants[key].grids_ok &= grid_ok
            continue
        shown = [f"{p.name}={constexprs[(i,)]}" for i, p in enumerate(fn.params) if p.is_constexpr]
        label = " ".join([*shown, f"warps={options.num_warps}"])
        module = fn.fn.__module__.removeprefix("fastrlhf.kernels.")
        variants[key] = Variant(module, fn.__name__, arch, launch.case, label, grid_ok, source)
    return list(variants.values())


# ------------------------------------------------------------------------------------------- compiling

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(v: Variant) -> Variant:
    """triton.compile to cubin and read ptxas's -v log (printed: the cache is fresh, so ptxas always runs)."""
    signature, constexprs, attrs, options = v.source
    fn = getattr(importlib.import_module(f"fastrlhf.kernels.{v.module}"), v.kernel)
    start, log = time.perf_counter(), io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            source, target = ASTSource(fn, signature, constexprs, attrs), GPUTarget("cuda", v.arch, 32)
            compiled = triton.compile(source, target=target, options=options)
        used, spill = _PTXAS_USED.search(log.getvalue()), _PTXAS_SPILL.search(log.getvalue())
        v.registers = int(used.group(1)) if used else None
        v.spill_bytes = int(spill.group(1)) + int(spill.group(2)) if spill else None
        v.shared_bytes = int(compiled.metadata.shared)
        loads = re.findall(r"\bld\.global[.\w]*", compiled.asm["ptx"])
        v.vector_loads = f"{sum('.v4' in x or '.v8' in x for x in loads)}/{len(loads)}"
        v.cp_async = len(re.findall(r"\bcp\.async\.c[ag]\b", compiled.asm["ptx"]))
        if "cubin" not in compiled.asm:
            v.error = "no cubin produced"
    except Exception as err:
        v.error = f"{type(err).__name__}: {str(err)[-2000:]}"
    v.seconds = round(time.perf_counter() - start, 2)
    return v


# ---------------------------------------------------------------------------------------------- report


def summarize(results: list[Variant], archs: list[int], names: list[str], key=lambda r: r.module) -> dict:
    """Per kernel module (or other ``key``) and architecture: kernels, variants, errors, registers, spill and
    shared bytes."""
    summary: dict[str, Any] = {}
    for name in names:
        for arch in archs:
            rs = [r for r in results if key(r) == name and r.arch == arch]
            regs = [r.registers for r in rs if r.registers is not None]
            summary.setdefault(name, {})[str(arch)] = {
                "kernels": sorted({r.kernel for r in rs}),
                "variants": len(rs),
                "errors": sum(r.error is not None for r in rs),
                "registers": [min(regs), max(regs)] if regs else None,
                "spill_bytes": sum(r.spill_bytes or 0 for r in rs),
                "shared_bytes": max((r.shared_bytes or 0 for r in rs), default=0),
            }
    return summary


def failures(results: list[Variant], summary: dict[str, Any], setup_errors: list[str]) -> list[str]:
    out = list(setup_errors)
    for r in results:
        where = f"{r.module}.{r.kernel} sm_{r.arch} [{r.label}] ({r.case})"
        if r.error:
            out.append(f"{where}: {r.error}")
        elif r.registers is None or r.spill_bytes is None:
            out.append(f"{where}: no ptxas register report")
        elif r.spill_bytes:
            out.append(f"{where}: {r.spill_bytes} bytes of register spills, {r.registers} registers")
        if not r.grids_ok:
            out.append(f"{where}: a grid exceeds CUDA's limits")
    no_launch = [f"{m} sm_{a}" for m, per in summary.items() for a, s in per.items() if not s["variants"]]
    return out + [f"{where}: no kernel launch recorded" for where in no_launch]


def table(by_kernel: dict[str, Any], archs: list[int]) -> str:
    """One line per kernel: per architecture, variants, register range and spill bytes (! = errors)."""
    lines = [f"{'kernel':<46}" + "".join(f"{f'sm_{a}: n  registers spill':>29}" for a in archs)]
    for name, per_arch in by_kernel.items():
        cells = [(s["variants"], *(s["registers"] or (0, 0)), s["spill_bytes"], "!" if s["errors"] else " ")
                 for s in per_arch.values()]  # fmt: skip
        lines.append(
            f"{name:<46}" + "".join(f"{n:>15} {lo:>5}-{hi:<3} {sp:>5}{e}" for n, lo, hi, sp, e in cells)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="e.g. 80 86 89 90")
    parser.add_argument("--out", help="write the per-module summary and every variant's report as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = parser.parse_args(argv)
    if any(a < 80 for a in args.arch):
        parser.error(f"--arch takes compute capabilities from 80 up, such as 86 or 90, got {args.arch}")
    cache = tempfile.TemporaryDirectory(prefix="fastrlhf-compile-")
    os.environ["TRITON_CACHE_DIR"] = cache.name  # fresh: every variant compiles, and ptxas reports on it

    begin = time.perf_counter()
    variants: list[Variant] = []
    setup_errors: list[str] = []  # op calls that failed before launching
    for arch in args.arch:
        launches, errors = record_launches(arch)
        variants += specialize(launches, arch)
        setup_errors += errors
    variants.sort(key=lambda v: v.module != "linear_token_logprobs")  # slowest first: workers end together
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
            results = list(pool.map(compile_variant, variants))
    else:
        results = [compile_variant(v) for v in variants]
    elapsed = time.perf_counter() - begin
    cache.cleanup()

    summary = summarize(results, args.arch, sorted(kernel_modules()))
    problems = failures(results, summary, setup_errors)
    kernel_name = lambda r: f"{r.module}.{r.kernel}"
    by_kernel = summarize(results, args.arch, sorted({kernel_name(r) for r in results}), kernel_name)
    print(table(by_kernel, args.arch))
    archs = ", ".join(f"sm_{a}" for a in args.arch)
    print(f"\n{len(results)} compiles for {archs} in {elapsed:.0f} s (triton {triton.__version__})")
    if args.out:
        reports = [{k: x for k, x in asdict(r).items() if k != "source"} for r in results]
        payload = {"triton": triton.__version__, "torch": torch.__version__, "archs": args.arch,
                   "seconds": round(elapsed, 1), "failures": problems, "modules": summary,
                   "kernels": by_kernel, "variants": reports}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    for problem in problems:
        print("FAIL", problem, file=sys.stderr)
    print("FAILED" if problems else "OK: every variant compiled without spills")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
