"""The performance targets of the kernels, computed pass/fail from the report's rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TARGETS_DOC = {
    "token_logprobs_copy_bw": "token_logprobs fwd+bwd (fastrlhf) reaches >= 85% of the measured copy "
    "bandwidth",
    "token_logprobs_vs_trl": "token_logprobs fwd+bwd: fastrlhf >= 1.3x faster than TRL's fused kernel",
    "linear_vs_bare_gemm": "linear_token_logprobs fwd+bwd: fastrlhf time <= 1.15x its bare GEMMs",
    "linear_vs_cce": "linear_token_logprobs fwd+bwd: fastrlhf time <= 0.9x Cut Cross-Entropy's (its default "
    "options, gradient filtering on)",
    "linear_memory": "linear_token_logprobs fwd+bwd: fastrlhf extra memory <= 1% of the full-logits "
    "path's (bf16 logits + fp32 log_softmax); both exclude the outputs every method returns (logp, dhidden, "
    "dweight)",
    "gae_vs_python_loop": "gae at B=512, T=2048: fastrlhf >= 200x faster than the Python-loop GAE",
}
MEMORY_PROVIDERS = ("fastrlhf", "full_logits", "eager")  # whose memory the linear_memory entries list


def _ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
    """num's time / den's time, when both were measured."""
    return num["ms"] / den["ms"] if num and den else None


def _linear_memory(case: str, cell: Callable[[str, str], dict[str, Any] | None]) -> dict[str, Any]:
    ours, full = cell(case, "fastrlhf"), cell(case, "full_logits")
    entry: dict[str, Any] = {"case": case, "value": None}
    if ours and full and full.get("extra_mem_excl_outputs_mb", 0) > 0:
        entry["value"] = (
            max(ours.get("extra_mem_excl_outputs_mb", 0.0), 0.0) / full["extra_mem_excl_outputs_mb"]
        )
    if ours:
        for key in ("extra_mem_mb", "extra_mem_excl_outputs_mb"):
            entry[key] = {p: r.get(key) for p in MEMORY_PROVIDERS if (r := cell(case, p))}
        if full and full.get("extra_mem_mb"):
            entry["ratio_incl_outputs"] = ours.get("extra_mem_mb", 0.0) / full["extra_mem_mb"]
    return entry


def compute_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per target: each case's value and verdict; ``pass`` is None when no case was measured."""
    ok = {(r["case"], r["provider"]): r for r in rows if r["status"] == "ok"}
    cases = {r["case"]: r for r in rows}

    def cell(case: str, provider: str) -> dict[str, Any] | None:
        return ok.get((case, provider))

    def keys(op: str, mode: str) -> list[str]:
        return [c for c, r in cases.items() if r["op"] == op and r["mode"] == mode]

    def entries(case_keys: list[str], value: Callable[[str], float | None]) -> list[dict[str, Any]]:
        return [{"case": c, "value": value(c)} for c in case_keys]

    tlp = [c for c in keys("token_logprobs", "fwd+bwd") if not cases[c]["params"].get("entropy")]
    # the linear targets are for the default options; the entropy case is reported, not judged
    lin = [c for c in keys("linear_token_logprobs", "fwd+bwd") if not cases[c]["params"].get("entropy")]
    gae = [c for c in keys("gae", "fwd") if cases[c]["shape"] == {"B": 512, "T": 2048}]
    measured = {  # name: (threshold, comparison, per-case values)
        "token_logprobs_copy_bw": (
            85.0,
            ">=",
            entries(tlp, lambda c: (cell(c, "fastrlhf") or {}).get("pct_copy_peak")),
        ),
        "token_logprobs_vs_trl": (
            1.3,
            ">=",
            entries(tlp, lambda c: _ratio(cell(c, "trl"), cell(c, "fastrlhf"))),
        ),
        "linear_vs_bare_gemm": (
            1.15,
            "<=",
            entries(lin, lambda c: _ratio(cell(c, "fastrlhf"), cell(c, "bare_gemm"))),
        ),
        "linear_vs_cce": (
            0.9,
            "<=",
            entries(lin, lambda c: _ratio(cell(c, "fastrlhf"), cell(c, "cce"))),
        ),
        "linear_memory": (0.01, "<=", [_linear_memory(c, cell) for c in lin]),
        "gae_vs_python_loop": (
            200.0,
            ">=",
            entries(gae, lambda c: _ratio(cell(c, "eager"), cell(c, "fastrlhf"))),
        ),
    }
    out: dict[str, Any] = {}
    for name, (threshold, compare, entries) in measured.items():
        done = [e for e in entries if e["value"] is not None]
        for e in done:
            e["pass"] = e["value"] >= threshold if compare == ">=" else e["value"] <= threshold
        out[name] = {
            "description": TARGETS_DOC[name],
            "threshold": threshold,
            "compare": compare,
            "cases": entries,
            "pass": all(e["pass"] for e in done) if done else None,
            "passing": f"{sum(e['pass'] for e in done)}/{len(done)}",
        }
    return out
