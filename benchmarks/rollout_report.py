"""The rollout benchmark's report (``benchmarks/rollout.py``): speed-ups over hf, issue 8's targets as the GPU
suite reads them, and the Markdown table."""

from __future__ import annotations

from typing import Any


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups of each backend over hf, and the static backend's memory against its KV cache."""
    by = {(c["shape"], c["batch"], c["backend"]): c for c in result["generation"] if c.get("status") == "ok"}
    rows = []
    for (shape, batch, backend), cell in by.items():
        hf = by.get((shape, batch, "hf"))
        row = {"shape": shape, "batch": batch, "backend": backend, "ran_as": cell["ran_as"],
               "tokens_per_second": cell["tokens_per_second"], "peak_extra_gib": cell["peak_extra_gib"],
               "kv_cache_gib": cell["kv_cache_gib"]}  # fmt: skip
        row["speedup_vs_hf"] = cell["tokens_per_second"] / hf["tokens_per_second"] if hf else None
        if cell["kv_cache_gib"] > 0 and cell["peak_extra_gib"] > 0:
            row["extra_over_kv_cache"] = cell["peak_extra_gib"] / cell["kv_cache_gib"] - 1
        rows.append(row)
    ppo = {c["backend"]: c for c in result["ppo_step"] if c.get("status") == "ok"}
    ppo_speedup = {
        b: ppo["hf"]["step_s_median"] / c["step_s_median"]
        for b, c in ppo.items()
        if "hf" in ppo and b != "hf"
    }
    return {"generation": rows, "ppo_step_speedup_vs_hf": ppo_speedup}


def targets(summary: dict[str, Any], dry_run: bool) -> dict[str, dict[str, Any]]:
    """Issue 8's targets as {name: {pass, value, description}}; pass is None when not measured (dry run,
    a cell skipped, or static fell back to hf)."""
    out: dict[str, dict[str, Any]] = {}
    for row in summary["generation"]:
        if row["backend"] != "static":
            continue
        name = f"{row['shape']}-b{row['batch']}"
        measured = not dry_run and row["ran_as"] == "static"
        speedup, extra = row["speedup_vs_hf"], row.get("extra_over_kv_cache")
        out[f"static_4x_hf_tokens_per_s_{name}"] = {
            "description": f"static >= 4x hf generated tokens/s ({name})",
            "value": speedup,
            "pass": None if not measured or speedup is None else speedup >= 4.0,
        }
        out[f"static_memory_within_kv_plus_10pct_{name}"] = {
            "description": f"static peak memory above the weights <= KV cache + 10% ({name})",
            "value": extra,
            "pass": None if not measured or extra is None else extra <= 0.10,
        }
    ppo = summary["ppo_step_speedup_vs_hf"].get("static")
    out["ppo_step_static_2x_hf"] = {
        "description": "PPO step with static >= 2x faster than with hf (0.5B end-to-end preset)",
        "value": ppo,
        "pass": None if dry_run or ppo is None else ppo >= 2.0,
    }
    return out


def markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    lines = [
        f"# Rollout backends on {dev.get('name')} ({report['date']})",
        "",
        f"Plan: {report['plan']}. Wall {report['result']['wall_s']:.1f} s of a "
        f"{report['time_budget_s']} s budget."
        + (" DRY RUN (tiny model, CPU): not a measurement." if report["dry_run"] else ""),
        "",
        "| shape | batch | backend (ran as) | tokens/s | x hf | peak extra GiB | KV GiB | extra over KV |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x, nd=2):
        return "-" if x is None else f"{x:.{nd}f}"

    for r in report["summary"]["generation"]:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['backend']} ({r['ran_as']}) | "
            f"{r['tokens_per_second']:.0f} | "
            f"{f(r['speedup_vs_hf'])} | {f(r['peak_extra_gib'], 3)} | {f(r['kv_cache_gib'], 3)} | "
            f"{f(r.get('extra_over_kv_cache'))} |"
        )
    skipped = [c for c in report["result"]["generation"] if c.get("status") != "ok"]
    for c in skipped:
        lines.append(f"| {c['shape']} | {c['batch']} | {c['backend']} | {c['status']} | | | | |")
    lines += [
        "",
        "| PPO step | status | step s | generate s | evaluate s | update s | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["result"]["ppo_step"]:
        lines.append(
            f"| {c['backend']} | {c['status']} | {f(c.get('step_s_median'))} | {f(c.get('time/generate'))} | "
            f"{f(c.get('time/evaluate'))} | {f(c.get('time/update'))} | {f(c.get('memory_gib/step'))} |"
        )
    lines += ["", f"PPO step speed-up vs hf: {report['summary']['ppo_step_speedup_vs_hf']}"]
    lines += [f"{report['vllm']['note']}; not measured.", ""]
    if not report.get("complete", True):
        lines.insert(3, "INCOMPLETE: the run was stopped before its last cell; what follows was measured.")
    lines += ["| target | value | pass |", "|---|---|---|"]
    for t in report["targets"].values():
        lines.append(f"| {t['description']} | {f(t['value'])} | {t['pass']} |")
    lines.append("")
    return "\n".join(lines)
