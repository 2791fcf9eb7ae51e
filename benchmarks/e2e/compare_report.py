"""The comparison's result: each system's runs combined, medians over the measured steps, TRL/fastrlhf ratios,
and the markdown table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from e2e.spec import RunSpec

PHASES = ("generate_s", "score_s", "advantages_s", "update_s", "other_s")


def fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def combine_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One system record from its repeated runs: all their steps (the first of each run marked warm-up), the
    largest peak memory; a failed run makes the record that run's failure."""
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed:
        return {**failed[0], "runs_ok": len(runs) - len(failed), "repeats": len(runs)}
    out = dict(runs[0])
    out["repeats"] = len(runs)
    out["steps"] = [
        {**rec, "run": i, "warmup": j == 0} for i, r in enumerate(runs) for j, rec in enumerate(r["steps"])
    ]
    mems = [r.get("memory") or {} for r in runs]
    out["memory"] = {
        k: max(m[k] for m in mems if isinstance(m.get(k), int | float))
        for k in mems[0]
        if isinstance(mems[0][k], int | float)
    }
    # what each run itself added: models, optimizer states, activations (not the imported libraries)
    added = [
        (r.get("memory") or {}).get("peak_rss_gib", math.nan) - r["rss_after_imports_gib"]
        for r in runs
        if r.get("rss_after_imports_gib") is not None
    ]
    if added:
        out["peak_rss_above_imports_gib"] = max(added)
    out["process_s"] = [r.get("process_s") for r in runs]
    return out


def summarize(result: dict[str, Any], spec: RunSpec) -> dict[str, Any]:
    """Medians over the measured steps (all but the warm-up first of each run) of a combined result."""
    steps = result["steps"]
    measured = [rec for rec in steps if not rec["warmup"]]
    keys = sorted({k for rec in measured for k, v in rec.items() if isinstance(v, int | float)})
    med = {k: _median([rec.get(k) for rec in measured]) for k in keys}
    wall = med.get("wall_s")
    mem = result.get("memory") or {}
    summary = {
        "measured_steps": len(measured),
        "warmup_steps_excluded": len(steps) - len(measured),
        "median": med,
        "tokens_per_step": spec.tokens_per_step,
        "tokens_per_second": spec.tokens_per_step / wall if wall else None,
        "response_tokens_per_second": spec.rollout_batch_size * spec.response_len / wall if wall else None,
        "peak_memory_gib": mem.get("peak_gpu_allocated_gib", mem.get("peak_rss_gib")),
        "peak_memory_kind": "gpu_max_memory_allocated" if "peak_gpu_allocated_gib" in mem else "peak_rss",
    }
    if result.get("peak_rss_above_imports_gib") is not None:
        summary["peak_rss_above_imports_gib"] = result["peak_rss_above_imports_gib"]
    return summary


def _housekeeping_s(median: dict[str, Any]) -> float | None:
    """Time in TRL's gc.collect() and empty_cache() calls; None for a system that makes none."""
    if "gc_s" not in median and "empty_cache_s" not in median:
        return None
    return (median.get("gc_s") or 0.0) + (median.get("empty_cache_s") or 0.0)


def ratios(fastrlhf: dict[str, Any], trl: dict[str, Any]) -> dict[str, float | None]:
    """TRL over fastrlhf (fastrlhf over TRL for throughput) from the two systems' summaries."""
    fm, tm = fastrlhf["median"], trl["median"]
    out = {
        "step_time_trl_over_fastrlhf": _ratio(tm.get("wall_s"), fm.get("wall_s")),
        "tokens_per_second_fastrlhf_over_trl": _ratio(
            fastrlhf.get("tokens_per_second"), trl.get("tokens_per_second")
        ),
        "peak_memory_trl_over_fastrlhf": _ratio(trl.get("peak_memory_gib"), fastrlhf.get("peak_memory_gib")),
        **{
            f"{p[:-2]}_trl_over_fastrlhf": _ratio(tm.get(p), fm.get(p))
            for p in ("generate_s", "score_s", "update_s")
        },
    }
    if "peak_rss_above_imports_gib" in fastrlhf and "peak_rss_above_imports_gib" in trl:
        out["peak_rss_above_imports_trl_over_fastrlhf"] = _ratio(
            trl["peak_rss_above_imports_gib"], fastrlhf["peak_rss_above_imports_gib"]
        )
    housekeeping = _housekeeping_s(tm)
    if tm.get("wall_s") and housekeeping:
        out["step_time_trl_without_gc_and_empty_cache_over_fastrlhf"] = _ratio(
            tm["wall_s"] - housekeeping, fm.get("wall_s")
        )
    return out


def _system_row(name: str, sysrep: dict[str, Any]) -> str:
    s = sysrep.get("summary") or {}
    med = s.get("median") or {}
    kind = " (RSS)" if s.get("peak_memory_kind") == "peak_rss" else ""
    status = sysrep["status"] if sysrep["status"] != "skipped" else f"skipped: {sysrep.get('reason')}"
    return (
        f"| {name} | {status} | {fmt(med.get('wall_s'), 3)} | "
        + " | ".join(fmt(med.get(p), 3) for p in PHASES)
        + f" | {fmt(_housekeeping_s(med), 3)} | {fmt(s.get('tokens_per_second'), 0)} | "
        f"{fmt(s.get('peak_memory_gib'), 2)}{kind} | {fmt(med.get('optimizer_steps'), 0)} |"
    )


def _ratios_line(r: dict[str, Any]) -> str:
    line = (
        f"TRL / fastrlhf: step time x{fmt(r.get('step_time_trl_over_fastrlhf'), 2)} (generate "
        f"x{fmt(r.get('generate_trl_over_fastrlhf'), 2)}, score x{fmt(r.get('score_trl_over_fastrlhf'), 2)}, "
        f"update x{fmt(r.get('update_trl_over_fastrlhf'), 2)}), peak memory "
        f"x{fmt(r.get('peak_memory_trl_over_fastrlhf'), 2)}"
    )
    if r.get("peak_rss_above_imports_trl_over_fastrlhf") is not None:
        line += f" (RSS added after imports: x{fmt(r['peak_rss_above_imports_trl_over_fastrlhf'], 2)})"
    line += f"; fastrlhf tokens/s = x{fmt(r.get('tokens_per_second_fastrlhf_over_trl'), 2)} TRL's."
    if r.get("step_time_trl_without_gc_and_empty_cache_over_fastrlhf") is not None:
        line += (
            " Without its gc.collect()/empty_cache() time TRL's step would be "
            f"x{fmt(r['step_time_trl_without_gc_and_empty_cache_over_fastrlhf'], 2)} fastrlhf's."
        )
    return line


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"# End-to-end PPO step: fastrlhf vs TRL {report['versions'].get('trl') or '(not installed)'}",
        "",
        f"{report['date']} on {report['device']['name']} ({report['device']['type']}); "
        f"scale `{cfg['scale']}` ({cfg['shape']['name']}), {cfg['dtype']}, "
        f"batch {cfg['rollout_batch_size']} x "
        f"({cfg['prompt_len']} prompt + {cfg['response_len']} response) tokens, micro-batch "
        f"{cfg['micro_batch_size']}, {cfg['ppo_epochs']} PPO epochs x {cfg['num_minibatches']} minibatches, "
        f"LoRA rank {cfg['lora_rank'] or 'none (full fine-tuning)'}, gradient checkpointing "
        f"{'on' if cfg['gradient_checkpointing'] else 'off'}, {cfg['repeats']} run(s) x {cfg['steps']} steps "
        "per system (first step of each run excluded, medians).",
        "",
        "| system | status | step (s) | generate | score | advantages | update | other | of which gc + "
        "empty_cache | tokens/s | peak memory (GiB) | optimizer steps / PPO step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_system_row(name, sysrep) for name, sysrep in report["systems"].items()),
    ]
    if report.get("ratios"):
        lines += ["", _ratios_line(report["ratios"])]
    lines += ["", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], png_path: Any) -> None:
    """Two panels from a report: the median PPO step split into phases, and the peak memory, per system."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [s for s, r in report["systems"].items() if (r.get("summary") or {}).get("median")]
    if not names:
        return
    fig = Figure(figsize=(10, 1.8 + 0.7 * len(names)))
    FigureCanvasAgg(fig)
    time_ax, mem_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    for row, name in enumerate(names):
        median = report["systems"][name]["summary"]["median"]
        left = 0.0
        for phase in PHASES:
            width = median.get(phase) or 0.0
            time_ax.barh(
                row, width, left=left, color=f"C{PHASES.index(phase)}", label=phase[:-2] if row == 0 else None
            )
            left += width
        mem_ax.barh(row, report["systems"][name]["summary"].get("peak_memory_gib") or 0.0, color="C7")
    for ax in (time_ax, mem_ax):
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
    time_ax.set_xlabel("median seconds per PPO step")
    time_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(PHASES), fontsize="small")
    kind = report["systems"][names[0]]["summary"].get("peak_memory_kind", "")
    mem_ax.set_xlabel("peak GiB (" + ("GPU allocated" if kind.startswith("gpu") else "RSS") + ")")
    device = report["device"].get("name") or report["device"].get("type")
    fig.suptitle(f"PPO step, {report['config'].get('scale', '')} scale, on {device} ({report['date'][:10]})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
