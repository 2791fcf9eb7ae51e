"""The report: built from the raw records (so ``--merge`` can rebuild it from several runs), written as
strict JSON and as markdown."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .cases import ALL_OPS, BYTE_MODELS, case_order, label
from .providers import PROVIDER_DOCS, PROVIDERS
from .targets import compute_targets

SCHEMA = "fastrlhf-kernel-bench/1"
MEMORY_MODEL = (
    "extra_mem = torch.cuda.max_memory_allocated() during one call (after reset_peak_memory_stats) minus "
    "torch.cuda.memory_allocated() before it (the inputs); extra_mem_excl_outputs also subtracts the outputs "
    "every method returns (logp, entropy, gradients)"
)
# A restarted worker records a skipped/excluded row for what an earlier attempt measured: keep the best.
STATUS_RANK = {"ok": 0, "oom": 1, "error": 1, "timeout": 1, "unavailable": 2, "excluded": 3, "skipped": 4}


def _peaks_by_run(records: list[dict[str, Any]]) -> dict[Any, dict[str, dict[str, Any]]]:
    """run -> peak name -> peak record (a merged report holds several runs, each with its own peaks)."""
    by_run: dict[Any, dict[str, dict[str, Any]]] = {}
    for r in records:
        if r.get("type") == "peak" and "error" not in r:
            by_run.setdefault(r.get("run"), {})[r["name"]] = r
    return by_run


def _best_per_key(records: list[dict[str, Any]], type_: str, better: Any) -> list[dict[str, Any]]:
    """One record of ``type_`` per (case, provider): the first, replaced by any later one that is better."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r.get("type") == type_:
            k = (r["case"], r["provider"])
            if k not in best or better(r, best[k]):
                best[k] = dict(r)
    return list(best.values())


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (case, provider), with its ratios to its own run's peaks and to the other providers."""
    rank = lambda r: STATUS_RANK.get(r["status"], 5)
    rows = _best_per_key(records, "row", lambda new, old: rank(new) < rank(old))
    fatal = {(r["op"], r["provider"]): r.get("error") for r in records if r.get("type") == "fatal"}
    by_run = _peaks_by_run(records)
    any_run = {name: r for peaks in by_run.values() for name, r in peaks.items()}
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
        if r["status"] == "excluded" and (r["op"], r["provider"]) in fatal:
            r["note"] = (
                f"not run: this provider killed its worker earlier ({fatal[(r['op'], r['provider'])]})"
            )
    for r in rows:
        if r["status"] != "ok":
            continue
        peaks = by_run.get(r.get("run")) or any_run
        copy_gbps, mm_tflops = peaks.get("copy", {}).get("gbps"), peaks.get("matmul_bf16", {}).get("tflops")
        if copy_gbps and "gbps" in r:
            r["pct_copy_peak"] = 100 * r["gbps"] / copy_gbps
        if mm_tflops and "tflops" in r:
            r["pct_matmul_peak"] = 100 * r["tflops"] / mm_tflops
        others = by_case[r["case"]].items()
        r["speedup_vs"] = {
            p: o["ms"] / r["ms"] for p, o in others if p != r["provider"] and o["status"] == "ok"
        }
        if "eager" in r["speedup_vs"]:
            r["speedup_vs_eager"] = r["speedup_vs"]["eager"]
    order = case_order()
    prov_rank = {p: i for ps in PROVIDERS.values() for i, p in enumerate(ps)}
    return sorted(
        rows,
        key=lambda r: (
            ALL_OPS.index(r["op"]),
            order.get(r["case"], 10**6),
            r["case"],
            prov_rank.get(r["provider"], 99),
        ),
    )


def build_report(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything derived (ratios, % of peak, targets) is computed here from the raw records."""
    env = dict(meta.get("env", {}))
    for r in records:
        if r.get("type") == "worker_env":
            for k, v in r["env"].items():
                env.setdefault(k, v)
            env.setdefault("timer", r.get("timer"))
    by_run = _peaks_by_run(records)
    peaks = {name: r for p in by_run.values() for name, r in p.items()}
    checks = _best_per_key(records, "check", lambda new, old: new.get("status") == "ok")
    rows = _rows(records)
    return {
        "schema": SCHEMA,
        "env": env,
        "peaks": {k: {kk: vv for kk, vv in v.items() if kk != "type"} for k, v in peaks.items()},
        "peaks_by_run": {
            str(run): {k: v.get("gbps") or v.get("tflops") for k, v in p.items()} for run, p in by_run.items()
        },
        "byte_models": BYTE_MODELS,
        "memory_model": MEMORY_MODEL,
        "timing": env.get("timer"),
        "providers": PROVIDER_DOCS,
        "peers": {
            r["name"]: {k: v for k, v in r.items() if k not in ("type", "name")}
            for r in records
            if r.get("type") == "peer"
        },
        "ops": {r["op"]: r for r in records if r.get("type") == "op_info"},
        "correctness": sorted(checks, key=lambda r: (ALL_OPS.index(r["op"]), r["case"], r["provider"])),
        "results": rows,
        "targets": compute_targets(rows),
        "groups": meta.get("groups", []),
        "records": records,
    }


# ------------------------------------------------------------------------------------------ markdown


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if fmt == ".0f" and abs(v) < 10:  # small rates (CPU runs, tiny ops) keep 3 significant digits
        return format(v, ".3g")
    return format(v, fmt)


def _times(v: float | None) -> str:
    return _num(v, ".2f") + ("x" if v else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _cell_text(text: str, limit: int) -> str:
    return text.replace("|", "/").replace("\n", " ")[:limit]


def _max_err(errs: dict[str, dict[str, float]], prefix: str, metric: str = "rel_l2_err") -> float | None:
    return max((v[metric] for k, v in errs.items() if k.startswith(prefix)), default=None)


def _correctness(report: dict[str, Any]) -> list[str]:
    rows = []
    for c in report["correctness"]:
        if c.get("status") == "unavailable":  # peers not installed: listed under Peers
            continue
        errs, tol = c.get("errors") or {}, c.get("tolerance") or {}
        case = (
            f"{label(c.get('shape') or {}, c.get('params') or {})} {c.get('dtype', '')} {c.get('mode', '')}"
        )
        note = " ".join(str(x) for x in (c.get("error"), c.get("note_mode"), c.get("note")) if x)
        rows.append(
            [
                c["op"],
                case.strip(),
                c["provider"],
                str(c.get("status")),
                _num(_max_err(errs, "out"), ".2e"),
                _num(_max_err(errs, "grad"), ".2e"),
                _num(_max_err(errs, "", "max_abs_err"), ".2e"),
                f"{tol['out']:.0e} / {tol['grad']:.0e}" if tol else "—",
                _cell_text(note, 120),
            ]
        )
    header = [
        "op",
        "case",
        "provider",
        "status",
        "out rel-L2",
        "grad rel-L2",
        "max abs err",
        "tolerance",
        "note",
    ]
    return _table(header, rows)


def _op_section(report: dict[str, Any], op: str) -> list[str]:
    all_rows = [r for r in report["results"] if r["op"] == op]
    if not all_rows:
        return []
    lines = ["", f"## {op}", ""]
    problem = report["ops"].get(op, {}).get("fastrlhf_problem")
    if problem:
        lines += [f"fastrlhf: {problem}", ""]
    lines += [f"Byte/FLOP model: {BYTE_MODELS[op]}", ""]
    gemm_op = op == "linear_token_logprobs"
    header = [
        "case",
        "dtype",
        "mode",
        "provider",
        "ms",
        "GB/s",
        "% bf16 matmul peak" if gemm_op else "% copy peak",
    ]
    header += ["TFLOP/s", "vs eager"] + (
        ["vs TRL"] if op == "token_logprobs" else ["÷ bare GEMM", "÷ CCE"] if gemm_op else []
    )
    header += ["extra MiB", "extra excl. outputs MiB", "status"]
    cells, not_run = [], {}
    for r in all_rows:
        if r["status"] == "unavailable":
            key = (r["provider"], str(r.get("note") or ""))
            not_run[key] = not_run.get(key, 0) + 1
            continue
        vs = r.get("speedup_vs", {})
        row = [label(r["shape"], r["params"]), r["dtype"], r["mode"], r["provider"], _num(r.get("ms"), ".4f")]
        row += [
            _num(r.get("gbps"), ".0f"),
            _num(r.get("pct_matmul_peak" if gemm_op else "pct_copy_peak"), ".1f"),
        ]
        row += [_num(r.get("tflops"), ".0f"), _times(r.get("speedup_vs_eager"))]
        if op == "token_logprobs":
            row.append(_times(vs.get("trl")))
        elif gemm_op:
            row += [_num(1 / vs[p] if vs.get(p) else None, ".2f") for p in ("bare_gemm", "cce")]
        status = (
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error') or r.get('note') or ''}"
        )
        if r["status"] == "ok" and r.get("note"):
            status += f" ({r['note']})"
        row += [_num(r.get("extra_mem_mb"), ".0f"), _num(r.get("extra_mem_excl_outputs_mb"), ".0f")]
        cells.append([*row, _cell_text(status, 160)])
    lines += _table(header, cells)
    if not_run:
        lines.append("")
        for (provider, why), n in not_run.items():
            lines.append(f"- not run: {provider} ({n} case{'s' if n > 1 else ''}): {why[:300]}")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    env, peaks = report["env"], report["peaks"]
    lines = [f"# fastrlhf.kernels benchmark — {env.get('device_name', '?')}", ""]
    if env.get("run_mode") in ("dry-run", "smoke"):
        note = "on a CPU at tiny sizes: a check of the script; numbers and targets mean nothing."
        lines += [f"**{env['run_mode']} {note}**", ""]
    lines.append(
        f"{env.get('date')} · torch {env.get('torch')} (CUDA {env.get('torch_cuda')}) · "
        f"triton {env.get('triton')} · "
        f"transformers {env.get('transformers')} · python {env.get('python')} · trl {env.get('trl')} · "
        f"liger-kernel {env.get('liger_kernel')} · cut-cross-entropy {env.get('cut_cross_entropy')} · "
        f"git {str(env.get('git_commit'))[:12]}"
        f"{' (dirty)' if env.get('git_dirty') else ''} · kernels sha256 {env.get('kernels_sha256')}"
    )
    copy, mm = peaks.get("copy", {}), peaks.get("matmul_bf16", {})
    lines += [
        "",
        f"Device peaks (same run): copy {_num(copy.get('gbps'), '.0f')} GB/s (read + write), "
        f"bf16 matmul {_num(mm.get('tflops'), '.0f')} TFLOP/s ({mm.get('m', '?')}^3). "
        f"Timing: {report.get('timing')}.",
        "",
        "## Targets",
        "",
    ]
    verdicts = {True: "PASS", False: "FAIL", None: "n/a"}
    targets = report["targets"].values()
    lines += _table(
        ["target", "threshold", "passing", "pass"],
        [
            [t["description"], f"{t['compare']} {t['threshold']}", t["passing"], verdicts[t["pass"]]]
            for t in targets
        ],
    )
    lines += ["", "## Correctness (vs reference, before timing)", ""]
    lines += [
        "rel-L2 = ||out - ref|| / ||ref|| against the reference on float64 copies of the same inputs.",
        "",
    ]
    lines += _correctness(report)
    for op in ALL_OPS:
        lines += _op_section(report, op)
    if report.get("peers"):
        lines += ["", "## Peers", ""]
        for name, p in report["peers"].items():
            state = "available" if p.get("available") else f"unavailable: {p.get('error')}"
            lines.append(f"- {name}: {state}" + (f" — {p['note']}" if p.get("note") else ""))
    if report.get("groups"):
        lines += ["", "## Worker groups", ""]
        for g in report["groups"]:
            excluded = f", excluded {g['excluded']}" if g.get("excluded") else ""
            run = f"rc={g.get('rc')} wall {g.get('wall_s')} s, attempts {g.get('attempts')}"
            lines.append(f"- {g['group']}: {run}{excluded}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- files


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
    """<stem>.json (via a temporary name: a killed run never leaves half a file) and <stem>.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_strict_json(report), indent=1, default=str, allow_nan=False), encoding="utf-8")
    tmp.replace(json_path)
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path
