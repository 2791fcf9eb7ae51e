"""The suite's summary: one JSON and one markdown page with every stage's outcome and every target's
pass/fail (the stages' own reports are in the archive beside them)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA = "fastrlhf-gpu-suite/1"
VERDICT = {True: "PASS", False: "FAIL", None: "n/a"}


def all_targets(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every stage's targets, each tagged with its stage; a stage that did not run reports none."""
    return [
        {"stage": s["name"], **t}
        for s in stages
        for t in (s.get("summary") or {}).get("targets", [])
        if isinstance(t, dict)
    ]


def build_summary(env: dict[str, Any], stages: list[dict[str, Any]], dry_run: bool) -> dict[str, Any]:
    targets = all_targets(stages)
    return {
        "schema": SCHEMA,
        "run_mode": "dry-run" if dry_run else "gpu",
        "env": env,
        "stages": stages,
        "targets": targets,
        "targets_passing": f"{sum(t['pass'] is True for t in targets)}/"
        f"{sum(t['pass'] is not None for t in targets)} measured",
    }


def _num(v: Any, fmt: str) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, fmt)


def _cell(v: Any) -> str:
    return str(v).replace("|", "/").replace("\n", " ")[:160]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _stage_detail(stage: dict[str, Any]) -> list[str]:
    s = stage.get("summary") or {}
    name = stage["name"]
    if s.get("error"):
        return [f"- {name}: {s['error']}"]
    if name == "tests":
        failed = ", ".join(s.get("failed_tests", [])[:20])
        return [
            f"- tests: {s.get('pytest_summary') or s.get('counts')}"
            + (f"; failed: {failed}" if failed else "")
        ]
    if name == "kernels":
        peaks = s.get("peaks", {})
        peers = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in s.get("peers", {}).items())
        fc = s.get("fastrlhf_correctness", {})
        lines = [
            f"- kernels: `{s.get('report')}`; peaks: copy {_num(peaks.get('copy'), '.0f')} GB/s, bf16 matmul "
            f"{_num(peaks.get('matmul_bf16'), '.0f')} TFLOP/s; fastrlhf correctness {fc.get('ok')}/"
            f"{fc.get('checked')} ok; peers available: {peers or 'none'}; rows {s.get('statuses')}",
        ]
        rows = s.get("linear_fwd_bwd") or []
        if rows:
            lines += [
                "",
                "linear_token_logprobs fwd+bwd (the peers' errors are their worst in the check):",
                "",
            ]
            lines += _table(
                [
                    "case",
                    "provider",
                    "ms",
                    "TFLOP/s",
                    "% matmul peak",
                    "extra MiB",
                    "excl. outputs MiB",
                    "rel-L2 out / grad",
                    "status",
                ],
                [
                    [
                        r["case"],
                        r["provider"],
                        _num(r.get("ms"), ".3f"),
                        _num(r.get("tflops"), ".0f"),
                        _num(r.get("pct_matmul_peak"), ".1f"),
                        _num(r.get("extra_mem_mb"), ".0f"),
                        _num(r.get("extra_mem_excl_outputs_mb"), ".0f"),
                        f"{_num(r.get('out_rel_l2'), '.1e')} / {_num(r.get('grad_rel_l2'), '.1e')}",
                        r["status"],
                    ]
                    for r in rows
                ],
            )
            lines.append("")
        return lines
    if name == "e2e":
        parts = [
            f"{sys_name} {v.get('status')}: step {_num(v.get('median_step_s'), '.2f')} s, "
            f"{_num(v.get('tokens_per_second'), '.0f')} tok/s, "
            f"peak {_num(v.get('peak_memory_gib'), '.1f')} GiB"
            + (f" ({v['error']})" if v.get("error") and v.get("status") != "ok" else "")
            for sys_name, v in s.get("systems", {}).items()
        ]
        ratio = s.get("ratios") or {}
        return [
            f"- e2e: `{s.get('report')}`; "
            + "; ".join(parts)
            + (f"; ratios {json.dumps(ratio)}" if ratio else "")
        ]
    return [f"- {name}: `{s.get('report')}`" + (f"; rows {s['statuses']}" if s.get("statuses") else "")]


def render_markdown(summary: dict[str, Any]) -> str:
    env = summary["env"]
    lines = [f"# fastrlhf GPU suite — {env.get('device_name')}", ""]
    if summary["run_mode"] == "dry-run":
        lines += [
            "**Dry run on a CPU at tiny sizes: a check of the script; numbers and targets mean nothing.**",
            "",
        ]
    lines += [
        f"{env.get('date')} · git {str(env.get('git_commit'))[:12]} · torch {env.get('torch')} (CUDA "
        f"{env.get('torch_cuda')}) · triton {env.get('triton')} · transformers {env.get('transformers')} · "
        f"python {env.get('python')} · budget {env.get('time_budget_s')} s, wall {env.get('wall_s')} s",
        "",
        f"## Targets ({summary['targets_passing']})",
        "",
    ]
    lines += _table(
        ["stage", "target", "threshold", "value", "pass"],
        [
            [
                t["stage"],
                t["target"],
                t.get("threshold", ""),
                t.get("value", ""),
                VERDICT.get(t["pass"], str(t["pass"])),
            ]
            for t in summary["targets"]
        ],
    )
    lines += ["", "## Stages", ""]
    lines += _table(
        ["stage", "status", "exit", "wall s", "budget s", "peers"],
        [
            [
                s["name"],
                s["status"] + (f" ({s['reason']})" if s.get("reason") else ""),
                str(s.get("rc", "")),
                _num(s.get("wall_s"), ".0f"),
                _num(s.get("budget_s"), ".0f"),
                ", ".join(f"{k} {v}" for k, v in (s.get("peers") or {}).items()),
            ]
            for s in summary["stages"]
        ],
    )
    lines.append("")
    for s in summary["stages"]:
        if s["status"] not in ("absent", "skipped"):
            lines += _stage_detail(s)
    files = env.get("archive")
    if files:
        lines += [
            "",
            f"Every stage's own JSON, markdown and log: `{files}` (`tar xzf` it into benchmarks/results).",
        ]
    return "\n".join(lines) + "\n"


def _strict(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_summary(summary: dict[str, Any], out: Path, stem: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_strict(summary), indent=1, default=str, allow_nan=False), encoding="utf-8")
    tmp.replace(json_path)
    md_path.write_text(render_markdown(summary), encoding="utf-8")
    return json_path, md_path
