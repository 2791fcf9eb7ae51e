"""The fit table's outputs: markdown, a coloured grid (PNG), and merging the JSON of several partial runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from e2e.compare_report import fmt


def cap_key(cap: float | None) -> str:
    """The column key of a cap: "12", "16.5", or "none" for an uncapped run."""
    return "none" if cap is None else f"{cap:g}"


def cap_keys(caps: Sequence[float | None]) -> list[str]:
    """Column keys, smallest cap first."""
    return [cap_key(c) for c in sorted(caps, key=lambda c: -1.0 if c is None else c)]


def _cap_label(key: str) -> str:
    return "no cap" if key == "none" else f"{key} GiB"


def _cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "not run"
    status = cell["status"]
    if status == "fits" and cell.get("peak_allocated_gib") is None:  # CPU dry run
        return f"fits, {fmt(cell.get('peak_rss_gib'), 2)} GiB RSS, {fmt(cell['median_step_s'], 2)} s"
    if status == "fits":
        return f"fits, {fmt(cell['peak_allocated_gib'], 1)} GiB, {fmt(cell['median_step_s'], 2)} s"
    if status == "oom" and cell.get("peak_allocated_gib") is not None:
        return f"OOM (peak {fmt(cell['peak_allocated_gib'], 1)} GiB)"
    if status == "oom":
        return "OOM"
    if status == "error" and cell.get("error"):
        return f"error: {cell['error'][:80]}"
    return status


def markdown(report: dict[str, Any]) -> str:
    caps = report["caps"]
    w = report["workload"]
    lines = [
        "# PPO fit table: what completes under a memory cap",
        "",
        f"{report['date']} on {report['device']['name']}; {w['steps']} PPO steps per cell, batch "
        f"{w['rollout_batch_size']} x ({w['prompt_len']} + {w['response_len']}) tokens, micro-batch "
        f"{w['micro_batch_size']}, {w['ppo_epochs']} epoch x {w['num_minibatches']} minibatches, "
        f"{w['dtype']}, "
        f"gradient checkpointing {'on' if w['gradient_checkpointing'] else 'off'}. Cell: status, peak "
        "allocated GiB, median step seconds.",
        "",
        "| size | configuration | " + " | ".join(_cap_label(c) for c in caps) + " |",
        "|---|---|" + "---|" * len(caps),
    ]
    for row in report["rows"]:
        cells = " | ".join(_cell_text(row["cells"].get(c)) for c in caps)
        lines.append(f"| {row['size']} | {row['config']} | {cells} |")
    lines += ["", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    """A grid: one row per (size, configuration), one column per cap, coloured by status."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    caps = report["caps"]
    rows = report["rows"]
    colors = {"fits": "#7fc97f", "oom": "#f0027f", "oom (implied)": "#f7a1c4", "fits (implied)": "#c7e9c0"}
    fig = Figure(figsize=(2.2 * len(caps) + 3.2, 0.45 * len(rows) + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        y = len(rows) - 1 - i
        for j, c in enumerate(caps):
            cell = row["cells"].get(c) or {"status": "not run"}
            ax.add_patch(
                Rectangle((j, y), 1, 1, facecolor=colors.get(cell["status"], "#cccccc"), edgecolor="w")
            )
            label = cell["status"]
            if cell["status"] == "fits":
                peak = cell.get("peak_allocated_gib")
                mem = (
                    f"{fmt(peak, 1)} GiB"
                    if peak is not None
                    else f"{fmt(cell.get('peak_rss_gib'), 2)} GiB RSS"
                )
                label = f"{mem}\n{fmt(cell.get('median_step_s'), 2)} s"
            elif cell["status"] == "error" and cell.get("error"):
                label = "error: " + cell["error"].split(":")[0]
            ax.text(j + 0.5, y + 0.5, label, ha="center", va="center", fontsize=7)
    ax.set_xlim(0, len(caps))
    ax.set_ylim(0, len(rows))
    ax.set_xticks([j + 0.5 for j in range(len(caps))], [_cap_label(c) for c in caps])
    ax.set_yticks(
        [len(rows) - 1 - i + 0.5 for i in range(len(rows))], [f"{r['size']} {r['config']}" for r in rows]
    )
    ax.set_title(f"PPO fit table ({report['device']['name']})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_report(report: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"json": f"{stem}.json", "markdown": f"{stem}.md", "png": f"{stem}.png"}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    chart(report, out / f"{stem}.png")


def merge(paths: Sequence[Path], size_order: Sequence[str], config_order: Sequence[str]) -> dict[str, Any]:
    """One report from several runs; later files win for the same (size, configuration, cap). Rows are
    sorted by size, then configuration, in the given orders."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    base = dict(reports[0])
    caps: set[float | None] = set()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in reports:
        caps.update(None if k == "none" else float(k) for k in r["caps"])
        for row in r["rows"]:
            key = (row["size"], row["config"])
            rows.setdefault(key, {"size": row["size"], "config": row["config"], "cells": {}})
            rows[key]["cells"].update(row["cells"])
    sizes = {s: i for i, s in enumerate(size_order)}
    configs = {c: i for i, c in enumerate(config_order)}
    base["caps"] = cap_keys(list(caps))
    base["rows"] = sorted(
        rows.values(), key=lambda r: (sizes.get(r["size"], 99), configs.get(r["config"], 99))
    )
    base["merged_from"] = [str(p) for p in paths]
    return base
