"""CPU benchmark suite of fastrlhf.kernels (pytest-benchmark), and a check that the GPU script still runs.

Each benchmark times one provider at a CPU-sized shape: ``fastrlhf`` (the public op on its PyTorch backend,
forced with FASTRLHF_KERNELS=torch: the CPU production path) or ``reference`` (the eager ``<op>_reference``;
for gae that is the Python loop over T that TRL, verl and OpenRLHF run). Every test also checks its result
against the reference computed in float64, so the default run (pyproject: --benchmark-disable, each body
once) is a fast correctness check. Timing::

    pytest benchmarks/test_bench_kernels.py --benchmark-enable --benchmark-only
    pytest benchmarks/test_bench_kernels.py --benchmark-enable --benchmark-only --benchmark-group-by=func

The last tests run the GPU script (``gpu_kernels.py``, code in ``kernelbench/``) on the CPU: its ``--dry-run``
(in process, tiny sizes), its worker-process path and its restart after a CUDA-context fault, so CI catches a
broken GPU script.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kernelbench import cli, ops, targets
from kernelbench.cases import ALL_OPS, full_cases
from kernelbench.inputs import linear_inputs, rl_inputs, token_logprobs_inputs, upcast
from kernelbench.providers import Forward, Providers
from kernelbench.report import build_report, render_markdown

# CPU-sized shapes
N, V = 512, 8000  # token_logprobs
LN, LH, LV = 256, 256, 8000  # linear_token_logprobs
B, T = 64, 256  # RL ops


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU production path; also overrides TRITON_INTERPRET=1 that tests/conftest.py may have set."""
    monkeypatch.setenv("FASTRLHF_KERNELS", "torch")
    torch.manual_seed(0)


def _op(op: str, provider: str) -> Callable[..., Any]:
    fns = ops.resolve_op(op)
    fn = fns.fn if provider == "fastrlhf" else fns.reference
    assert fn is not None, fns.fn_error if provider == "fastrlhf" else fns.reference_error
    return fn


def _as_list(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_close(got: Any, want: Any, tol: float, what: str) -> None:
    got_l, want_l = _as_list(got), _as_list(want)
    assert len(got_l) == len(want_l), f"{what}: {len(got_l)} outputs, reference has {len(want_l)}"
    for i, (g, w) in enumerate(zip(got_l, want_l, strict=True)):
        err = ops.error_stats(g, w)
        assert err["rel_l2_err"] <= tol, f"{what}[{i}]: {err} (tolerance {tol})"


def _grads(out: Any, wrt: tuple[torch.Tensor, ...], grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    outs = _as_list(out)
    return torch.autograd.grad(outs, wrt, [grad.to(o.dtype) for o in outs])


# ------------------------------------------------------------------------------------ token_logprobs


@pytest.mark.parametrize("provider", ["fastrlhf", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(
    ("dtype", "entropy"), [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)], ids=str
)
def test_token_logprobs(benchmark: Any, provider: str, mode: str, dtype: torch.dtype, entropy: bool) -> None:
    fn = _op("token_logprobs", provider)
    inp = token_logprobs_inputs(N, V, dtype, "cpu", requires_grad=mode == "fwd+bwd")
    logits, ids, grad = inp["logits"], inp["ids"], inp["grad"]

    def run() -> Any:
        out = fn(logits, ids, return_entropy=entropy)
        return out if mode == "fwd" else (out, _grads(out, (logits,), grad))

    result = benchmark(run)
    ref = _op("token_logprobs", "reference")
    ref_inp = upcast(inp)
    ref_out = ref(ref_inp["logits"], ids, return_entropy=entropy)
    out = result if mode == "fwd" else result[0]
    _assert_close(out, ref_out, 1e-5, "logp/entropy")
    if mode == "fwd+bwd":
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is stored in the logits' dtype
        _assert_close(result[1], _grads(ref_out, (ref_inp["logits"],), grad.double()), tol, "dlogits")


# ----------------------------------------------------------------------------- linear_token_logprobs


@pytest.mark.parametrize("provider", ["fastrlhf", "reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_linear_token_logprobs(benchmark: Any, provider: str, mode: str) -> None:
    fn = _op("linear_token_logprobs", provider)
    inp = linear_inputs(LN, LH, LV, torch.float32, "cpu", requires_grad=mode == "fwd+bwd")
    hidden, weight, ids, grad = inp["hidden"], inp["weight"], inp["ids"], inp["grad"]

    def run() -> Any:
        out = fn(hidden, weight, ids)
        return out if mode == "fwd" else (out, _grads(out, (hidden, weight), grad))

    result = benchmark(run)
    ref_inp = upcast(inp)
    ref_out = _op("linear_token_logprobs", "reference")(ref_inp["hidden"], ref_inp["weight"], ids)
    _assert_close(result if mode == "fwd" else result[0], ref_out, 1e-5, "logp")
    if mode == "fwd+bwd":
        want = _grads(ref_out, (ref_inp["hidden"], ref_inp["weight"]), grad.double())
        _assert_close(result[1], want, 1e-4, "dhidden/dweight")


# ------------------------------------------------------------------------------------------- RL ops


def _rl_call(op: str, fn: Callable[..., Any], x: dict[str, torch.Tensor], estimator: str) -> Any:
    args, kwargs = ops.rl_arguments(op, x, estimator)
    out = fn(*args, **kwargs)
    return tuple(out) if op == "ppo_advantages" else out


RL_CASES = [
    ("gae", "k1"),
    ("kl_penalty", "k1"),
    ("kl_penalty", "k2"),
    ("kl_penalty", "k3"),
    ("masked_whiten", "k1"),
    ("shape_rewards", "k3"),
    ("ppo_advantages", "k3"),
]


@pytest.mark.parametrize("provider", ["fastrlhf", "reference"])
@pytest.mark.parametrize(("op", "estimator"), RL_CASES, ids=[f"{o}-{e}" for o, e in RL_CASES])
def test_rl_ops(benchmark: Any, provider: str, op: str, estimator: str) -> None:
    """For gae, ``reference`` is the Python-loop GAE (the peers' way)."""
    fn = _op(op, provider)
    x = rl_inputs(B, T, "cpu")
    result = benchmark(lambda: _rl_call(op, fn, x, estimator))
    want = _rl_call(op, _op(op, "reference"), upcast(x), estimator)
    _assert_close(result, want, 1e-5, op)


# ------------------------------------------------------------------------------ the GPU script on CPU


def _report(out: Path) -> dict[str, Any]:
    paths = sorted(out.glob("kernels-*.json"))
    assert len(paths) == 1, paths
    assert paths[0].with_suffix(".md").exists()
    return json.loads(paths[0].read_text())


def test_gpu_script_dry_run(tmp_path: Path) -> None:
    """Every case at tiny sizes, in process: fastrlhf, the reference and the bare GEMMs run and agree.

    (Peers and torch.compile are left out to keep this fast; ``--dry-run`` alone runs them too.)
    """
    providers = "fastrlhf,fastrlhf_filtered,eager,bare_gemm"
    rc = cli.main(["--dry-run", "--no-compile", "--providers", providers, "--out", str(tmp_path)])
    assert rc == 0
    report = _report(tmp_path)
    rows = report["results"]
    assert {r["op"] for r in rows} == set(ALL_OPS)
    n_cases = sum(len(v) for v in full_cases().values())
    assert len({r["case"] for r in rows}) == n_cases
    filtered = [r for r in rows if r["provider"] == "fastrlhf_filtered"]
    assert {(r["mode"], r["status"]) for r in filtered} == {("fwd+bwd", "ok"), ("fwd", "unavailable")}
    others = [r for r in rows if r["provider"] not in ("compile", "fastrlhf_filtered")]
    bad = [(r["case"], r["provider"], r.get("error")) for r in others if r["status"] != "ok"]
    assert not bad
    checked = [c for c in report["correctness"] if c["provider"].startswith("fastrlhf")]
    assert {c["provider"] for c in checked} == {"fastrlhf", "fastrlhf_filtered"}
    assert all(c["status"] == "ok" for c in checked)
    assert set(report["targets"]) == set(targets.TARGETS_DOC)


def test_gpu_script_worker_process(tmp_path: Path) -> None:
    """The GPU code path on CPU (--smoke): a worker process, warm-up, time limits, repeated timing."""
    args = ["--smoke", "--skip-peaks", "--ops", "shape_rewards", "--providers", "fastrlhf,eager"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 0
    report = _report(tmp_path)
    rows = report["results"]
    assert {r["provider"] for r in rows} == {"fastrlhf", "eager"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    assert [g["attempts"] for g in report["groups"]] == [1]
    assert report["env"]["timer"].startswith("perf_counter median")
    assert any(r["type"] == "worker_env" and r["pid"] != os.getpid() for r in report["records"])


def test_gpu_script_worker_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider that kills the 'CUDA context' is recorded, the group restarts without it, and the rest of
    the op is still measured (in process here; on a GPU each attempt is a new worker process)."""
    runner = Providers.runner

    def faulty_runner(
        self: Providers, provider: str, case: Any, inp: Any
    ) -> tuple[Callable[[], Any], Forward]:
        run, f = runner(self, provider, case, inp)
        if (case.op, provider) != ("masked_whiten", "fastrlhf"):
            return run, f

        def fault() -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by the test)")

        return fault, f

    # the timed call of masked_whiten's fastrlhf provider fails as a dead CUDA context would
    monkeypatch.setattr(Providers, "runner", faulty_runner)
    monkeypatch.setattr("kernelbench.worker.context_alive", lambda cuda: False)
    args = [
        "--smoke",
        "--in-process",
        "--skip-peaks",
        "--ops",
        "masked_whiten",
        "--providers",
        "fastrlhf,eager",
    ]
    rc = cli.main([*args, "--out", str(tmp_path)])
    report = _report(tmp_path)
    assert rc == 1  # a fastrlhf failure fails a CPU run
    assert [g["attempts"] for g in report["groups"]] == [2]
    statuses = {r["provider"]: r["status"] for r in report["results"]}
    assert statuses == {"fastrlhf": "error", "eager": "ok"}, statuses
    assert {"worker_env", "op_info", "check", "row", "fatal"} <= {r["type"] for r in report["records"]}


def test_targets_and_markdown() -> None:
    """Pass/fail arithmetic of the targets on synthetic rows."""

    def row(
        case: str, op: str, mode: str, shape: dict[str, int], provider: str, ms: float, **kw: Any
    ) -> dict:
        r = {
            "type": "row",
            "case": case,
            "op": op,
            "mode": mode,
            "shape": shape,
            "dtype": "bf16",
            "params": {},
        }
        r.update(provider=provider, status="ok", ms=ms, **kw)
        return r

    tlp, lin, gae = (
        "token_logprobs|fwd+bwd|N=1 V=1|bf16|",
        "linear_token_logprobs|fwd+bwd|x|bf16|",
        "gae|fwd|B|fp32|",
    )
    records = [
        {"type": "peak", "name": "copy", "gbps": 1000.0},
        row(tlp, "token_logprobs", "fwd+bwd", {"N": 1, "V": 1}, "fastrlhf", 1.0, gbps=900.0),
        row(tlp, "token_logprobs", "fwd+bwd", {"N": 1, "V": 1}, "trl", 1.2),
        row(
            lin, "linear_token_logprobs", "fwd+bwd", {"N": 1}, "fastrlhf", 1.1, extra_mem_excl_outputs_mb=10.0
        ),
        row(lin, "linear_token_logprobs", "fwd+bwd", {"N": 1}, "bare_gemm", 1.0),
        row(lin, "linear_token_logprobs", "fwd+bwd", {"N": 1}, "cce", 1.2),  # 1.1 / 1.2 = 0.92 > 0.9
        row(
            lin,
            "linear_token_logprobs",
            "fwd+bwd",
            {"N": 1},
            "full_logits",
            3.0,
            extra_mem_excl_outputs_mb=1e3,
        ),
        row(gae, "gae", "fwd", {"B": 512, "T": 2048}, "fastrlhf", 0.1),
        row(gae, "gae", "fwd", {"B": 512, "T": 2048}, "eager", 30.0),
    ]
    report = build_report(records, {"env": {"device_name": "test"}})
    t = report["targets"]
    assert t["token_logprobs_copy_bw"]["pass"] is True  # 90% >= 85%
    assert t["token_logprobs_vs_trl"]["pass"] is False  # 1.2x < 1.3x
    assert t["linear_vs_bare_gemm"]["pass"] is True  # 1.1 <= 1.15
    assert t["linear_vs_cce"]["pass"] is False
    assert t["linear_vs_cce"]["cases"][0]["value"] == pytest.approx(1.1 / 1.2)
    assert t["linear_memory"]["pass"] is True  # 10 MiB / 1000 MiB = 1% <= 1%
    assert t["gae_vs_python_loop"]["pass"] is True  # 300x
    fast = next(r for r in report["results"] if r["provider"] == "fastrlhf" and r["op"] == "gae")
    assert fast["speedup_vs_eager"] == pytest.approx(300.0)
    md = render_markdown(report)
    assert "| PASS |" in md and "| FAIL |" in md
