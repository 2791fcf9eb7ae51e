"""The correctness check that runs before an op is timed: every provider against the reference computed on
float64 copies of the same inputs (float32 where the reference cannot run in float64)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .cases import Case, check_cases, label, tolerance
from .inputs import case_inputs, upcast
from .ops import error_stats
from .providers import FORWARD_ONLY, PROVIDERS, Forward, Providers, Unavailable, as_list, backward
from .records import Recorder, WorkerConfig, case_record, log
from .timing import cleanup, context_alive, describe, is_oom

CHECK_SEED = 1  # not the timing inputs' seed


def outputs_and_grads(f: Forward, mode: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    outs = as_list(f.fn())
    grads = backward(f, outs) if mode == "fwd+bwd" and f.wrt and f.grad is not None else ()
    return [o.detach() for o in outs], [g.detach() for g in grads]


def reference_outputs(
    providers: Providers, case: Case, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """The reference's outputs and gradients in float64 (float32 if that fails), TF32 off; and which."""
    base = case_inputs(case, device, seed=CHECK_SEED)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        try:
            f = providers.forward("eager", case, upcast(base, torch.float64))
            return (*outputs_and_grads(f, case.mode), "reference in float64 on upcast inputs")
        except Unavailable:
            raise
        except Exception as e:
            f = providers.forward("eager", case, upcast(base, torch.float32))
            note = f"reference in float32 on upcast inputs (float64 failed: {describe(e, 120)})"
            return (*outputs_and_grads(f, case.mode), note)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32


def compare(
    f: Forward,
    outs: list[torch.Tensor],
    grads: list[torch.Tensor],
    ref_outs: list[torch.Tensor],
    ref_grads: list[torch.Tensor],
) -> dict[str, dict[str, float]]:
    errs = {}
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=False)):
        errs[f"out{i}"] = error_stats(o, f.ref_view(r) if f.ref_view else r)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=False)):
        errs[f"grad{i}"] = error_stats(g, r)
    return errs


def check_provider(
    providers: Providers, case: Case, provider: str, device: torch.device, row: dict[str, Any]
) -> tuple[Forward, list[torch.Tensor], list[torch.Tensor]]:
    """Run one provider on the check inputs; a forward-only provider is checked on its outputs alone."""
    try:
        f = providers.forward(provider, case, case_inputs(case, device, seed=CHECK_SEED))
        return (f, *outputs_and_grads(f, case.mode))
    except Unavailable as e:
        if case.mode == "fwd" or str(e) != FORWARD_ONLY:
            raise
    fwd = case.with_mode("fwd")  # inputs that need no gradient
    f = providers.forward(provider, fwd, case_inputs(fwd, device, seed=CHECK_SEED))
    row["note_mode"] = "forward only: outputs checked, no gradient"
    return (f, *outputs_and_grads(f, "fwd"))


def check_op(op: str, providers: Providers, cfg: WorkerConfig, rec: Recorder, device: torch.device) -> bool:
    """Compare every provider but compile and bare_gemm with the reference; False when the context died."""
    cuda = device.type == "cuda"
    names = [p for p in PROVIDERS[op] if p not in ("eager", "compile", "bare_gemm") and cfg.wants(p)]
    for case in check_cases(op, cfg.tiny):
        try:
            ref_outs, ref_grads, ref_note = reference_outputs(providers, case, device)
        except Exception as e:
            rec.write(**case_record("check", case, "eager", status="error", error=describe(e)))
            log(f"check {op}: reference failed: {describe(e)}")
            cleanup(cuda)
            continue
        for provider in names:
            done_key = f"check|{case.key}|{provider}"
            if done_key in cfg.done:
                continue
            row = case_record("check", case, provider, done_key=done_key)
            if (op, provider) in cfg.exclude:
                rec.write(**row, status="excluded", note="crashed the CUDA context earlier in this run")
                continue
            rec.write(**case_record("start", case, provider, kind="check"))
            try:
                f, outs, grads = check_provider(providers, case, provider, device, row)
                errs = compare(f, outs, grads, ref_outs, ref_grads)
                tol = tolerance(case)
                ok = bool(errs) and all(
                    v["rel_l2_err"] <= tol["grad" if k.startswith("grad") else "out"] for k, v in errs.items()
                )
                row.update(status="ok" if ok else "above_tol", errors=errs, tolerance=tol, reference=ref_note)
                row.update(note=f.note)
                worst = max((v["rel_l2_err"] for v in errs.values()), default=math.nan)
                verdict = "ok" if ok else "ABOVE TOLERANCE"
                what = f"{label(case.dims, case.opts)} {case.dtype}"
                log(f"check {op} [{what}] {provider}: {verdict} (worst rel-L2 {worst:.2e})")
            except Unavailable as e:
                row.update(status="unavailable", note=str(e))
            except Exception as e:
                row.update(status="oom" if is_oom(e) else "error", error=describe(e))
                log(f"check {op} {provider}: {describe(e, 300)}")
                if not context_alive(cuda):
                    rec.write(**row)
                    rec.write(type="fatal", op=op, provider=provider, error=describe(e))
                    return False
            finally:
                f = outs = grads = None  # type: ignore[assignment]
            rec.write(**row)
            cleanup(cuda)
    return True
