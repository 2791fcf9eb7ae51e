#!/usr/bin/env python
"""What fits where: PPO (policy, reference, reward model, critic) under 12 / 16 / 24 GiB memory caps.

    python benchmarks/fit_table.py                                   # GPU: every cell (long)
    python benchmarks/fit_table.py --sizes 0.5b,1.5b --caps 24,16    # a subset; --merge joins runs
    python benchmarks/fit_table.py --merge a.json b.json --out DIR   # one table from several runs
    python benchmarks/fit_table.py --dry-run                         # CPU: one tiny cell, no cap (plumbing)

Rows are model shapes (Qwen2.5-0.5B, -1.5B, -3B and Llama-3-8B, random weights saved from configs, nothing
downloaded) x configurations:

* ``fastrlhf-full``: every weight trained, 8-bit AdamW (bitsandbytes, not paged), bf16, gradient
  checkpointing;
* ``fastrlhf-lora``: LoRA rank 16 on policy and critic (reference = the adapter-disabled policy);
* ``fastrlhf-qlora``: LoRA rank 16 on a 4-bit NF4 base (policy, critic and the frozen reward model in 4 bits);
* ``trl-full``: TRL 1.12's PPOTrainer, full fine-tuning with the same 8-bit AdamW (``optim=adamw_bnb_8bit``)
  and gradient checkpointing (TRL applies to full fine-tuning with a separate value model only).

Columns are memory caps, enforced with ``torch.cuda.set_per_process_memory_fraction`` on a larger card. Each
cell runs ``--steps`` PPO steps in a fresh subprocess (``benchmarks/e2e_ppo.py``'s worker, so OOM and
fragmentation never leak into the next cell) and records whether all steps completed, the peak
``torch.cuda.max_memory_allocated``, and the median step time (first step excluded). With ``--skip-implied``
(default) caps run largest first and a cell that OOMs makes the smaller caps of its row "oom (implied)".

Caveats: the cap binds PyTorch's allocator only; the CUDA context and cuBLAS workspace (~0.5-1 GiB on a real
card of that size) are outside it, which is why the 8-bit optimizer here is the non-paged one (paged
bitsandbytes states live in managed memory, also outside the cap). Writes
``fit-table-<device>-<date>{.json,.md,.png}`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCHEMA = "fastrlhf-fit-table/1"


def _load_e2e() -> types.ModuleType:
    """benchmarks/e2e_ppo.py under a private name (benchmarks/ is not a package)."""
    name = "fastrlhf_bench_e2e_ppo"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "e2e_ppo.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HERE / 'e2e_ppo.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


E = _load_e2e()


@dataclass(frozen=True)
class FitConfig:
    """One row family of the table: which system and how it trains."""

    name: str
    system: str  # "fastrlhf" or "trl"
    lora_rank: int
    load_in_4bit: bool
    optimizer: str  # fastrlhf's name; mapped to TRL's optim for trl
    fastrlhf_driver: str = "ppo_step"
    description: str = ""


CONFIGS: dict[str, FitConfig] = {
    "fastrlhf-full": FitConfig(
        "fastrlhf-full", "fastrlhf", 0, False, "adamw8bit", description="full, 8-bit AdamW"
    ),
    "fastrlhf-lora": FitConfig("fastrlhf-lora", "fastrlhf", 16, False, "adamw8bit", description="LoRA r16"),
    "fastrlhf-qlora": FitConfig(
        "fastrlhf-qlora", "fastrlhf", 16, True, "adamw8bit", description="LoRA r16 on a 4-bit base"
    ),
    "trl-full": FitConfig(
        "trl-full", "trl", 0, False, "adamw8bit", description="TRL 1.12, full, 8-bit AdamW"
    ),
}
SIZES = ("0.5b", "1.5b", "3b", "8b")
CAPS_GIB = (12.0, 16.0, 24.0)


@dataclass
class Workload:
    """The PPO step every cell runs (the same for all rows)."""

    steps: int = 3
    rollout_batch_size: int = 16
    micro_batch_size: int = 8  # = minibatch size, so TRL takes the same optimizer steps (see e2e_ppo.py)
    ppo_epochs: int = 1
    num_minibatches: int = 2
    prompt_len: int = 128
    response_len: int = 128
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = True


QLORA_NOTE = (
    "fastrlhf-qlora cells load models through fastrlhf's own loaders but not ppo_trainer.build_models: "
    "build_models loads the frozen reward model with lora_rank=0 while keeping load_in_4bit=True, which "
    "fastrlhf.models._load_kwargs rejects ('load_in_4bit trains LoRA adapters only'), so any 4-bit run with "
    "a reward-model directory fails before its first step. The cell keeps the config's lora_rank for the "
    "frozen reward model (frozen before adapters are added), i.e. the reward model is loaded in 4 bits."
)


def cell_spec(
    e2e: types.ModuleType,
    cfg: FitConfig,
    work: Workload,
    policy_dir: Path,
    reward_dir: Path,
    work_dir: Path,
    cap: float | None,
    vocab: int,
    *,
    optimizer: str | None = None,
    threads: int = 0,
) -> Any:
    return e2e.RunSpec(
        system=cfg.system,
        policy_dir=str(policy_dir),
        reward_dir=str(reward_dir),
        work_dir=str(work_dir),
        prompts=e2e.make_prompts(work.rollout_batch_size, work.prompt_len, vocab),
        steps=work.steps,
        rollout_batch_size=work.rollout_batch_size,
        micro_batch_size=work.micro_batch_size,
        rollout_forward_batch_size=work.micro_batch_size,
        ppo_epochs=work.ppo_epochs,
        num_minibatches=work.num_minibatches,
        prompt_len=work.prompt_len,
        response_len=work.response_len,
        dtype=work.dtype,
        lora_rank=cfg.lora_rank,
        load_in_4bit=cfg.load_in_4bit,
        optimizer=optimizer or cfg.optimizer,
        gradient_checkpointing=work.gradient_checkpointing,
        threads=threads,
        memory_cap_gib=cap,
        fastrlhf_driver=cfg.fastrlhf_driver,
    )


def cell_record(result: dict[str, Any], steps: int) -> dict[str, Any]:
    """The table's view of one worker result."""
    done = len(result.get("steps") or [])
    status = result.get("status", "error")
    if status == "ok":
        status = "fits" if done >= steps else "incomplete"
    mem = result.get("memory") or {}
    recs = result.get("steps") or []
    measured = recs[1:] if len(recs) > 1 else recs
    walls = [r["wall_s"] for r in measured if r.get("wall_s") is not None]
    med = statistics.median(walls) if walls else None
    return {
        "status": status,
        "steps_completed": done,
        "peak_allocated_gib": mem.get("peak_gpu_allocated_gib"),
        "peak_reserved_gib": mem.get("peak_gpu_reserved_gib"),
        "peak_rss_gib": mem.get("peak_rss_gib"),
        "median_step_s": med,
        "error": (result.get("error") or "")[:500] or None,
        "process_s": result.get("process_s"),
    }


def _fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _cap_label(key: str) -> str:
    return "no cap" if key == "none" else f"{key} GiB"


def _cap_keys(caps: Sequence[float | None]) -> list[str]:
    """Column keys, smallest cap first ("none" for an uncapped run)."""
    return ["none" if c is None else f"{c:g}" for c in sorted(caps, key=lambda c: -1.0 if c is None else c)]


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
        cells = []
        for c in caps:
            cell = row["cells"].get(c)
            if cell is None:
                cells.append("not run")
                continue
            text = cell["status"]
            if cell["status"] == "fits" and cell.get("peak_allocated_gib") is None:  # CPU dry run
                text = (
                    f"fits, {_fmt(cell.get('peak_rss_gib'), 2)} GiB RSS, {_fmt(cell['median_step_s'], 2)} s"
                )
            elif cell["status"] == "fits":
                text = f"fits, {_fmt(cell['peak_allocated_gib'])} GiB, {_fmt(cell['median_step_s'], 2)} s"
            elif cell["status"] == "oom" and cell.get("peak_allocated_gib") is not None:
                text = f"OOM (peak {_fmt(cell['peak_allocated_gib'])} GiB)"
            elif cell["status"] == "oom":
                text = "OOM"
            elif cell["status"] == "error" and cell.get("error"):
                text = f"error: {cell['error'][:80]}"
            cells.append(text)
        lines.append(f"| {row['size']} | {row['config']} | " + " | ".join(cells) + " |")
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
                    f"{_fmt(peak)} GiB"
                    if peak is not None
                    else f"{_fmt(cell.get('peak_rss_gib'), 2)} GiB RSS"
                )
                label = f"{mem}\n{_fmt(cell.get('median_step_s'), 2)} s"
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


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """One report from several runs; later files win for the same (size, configuration, cap)."""
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
    order = {s: i for i, s in enumerate((*SIZES, "tiny"))}
    corder = {c: i for i, c in enumerate(CONFIGS)}
    base["caps"] = _cap_keys(list(caps))
    base["rows"] = sorted(
        rows.values(), key=lambda r: (order.get(r["size"], 99), corder.get(r["config"], 99))
    )
    base["merged_from"] = [str(p) for p in paths]
    return base


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument(
        "--configs", help=f"comma-separated, of {','.join(CONFIGS)} (default: all; dry run: the first)"
    )
    p.add_argument("--caps", default=",".join(f"{c:g}" for c in CAPS_GIB), help="GiB, comma-separated")
    p.add_argument("--steps", type=int, default=Workload.steps)
    p.add_argument("--no-skip-implied", action="store_true", help="run every cap even after an OOM")
    p.add_argument("--cell-timeout-s", type=float, default=900.0)
    p.add_argument(
        "--time-budget-s", type=float, default=0.0, help="stop starting cells after this (0: none)"
    )
    p.add_argument(
        "--out", type=Path, help="output directory (default benchmarks/results; a temp dir on --dry-run)"
    )
    p.add_argument("--tag", default="")
    p.add_argument("--merge", nargs="+", type=Path, help="combine these fit-table JSON files and exit")
    p.add_argument("--dry-run", action="store_true", help="one tiny fastrlhf cell on CPU, no cap")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        report = merge(args.merge)
        out = args.out or RESULTS
        stem = f"fit-table-{E.device_slug(report['device'])}-{report['date'][:10]}-merged{args.tag}"
        write_report(report, out, stem)
        print(markdown(report))
        return report
    import torch

    dev = E.device_info()
    cuda = dev["type"] == "cuda"
    work = Workload(steps=args.steps)
    notes = [
        "Each cell is a fresh subprocess; a cell fits when all its PPO steps complete under the cap.",
        "The cap (torch.cuda.set_per_process_memory_fraction) binds PyTorch's allocator only: the CUDA "
        "context and library workspaces come on top on a real card of that size.",
        "8-bit AdamW is bitsandbytes' non-paged AdamW8bit (fastrlhf optimizer=adamw8bit, TRL "
        "optim=adamw_bnb_8bit) so that optimizer states count against the cap; fastrlhf's CUDA default is "
        "the paged variant, which can only fit more.",
        "TRL cells: separate value model (full), reference = a second policy copy, "
        "local_rollout_forward_batch_size = micro-batch size, gradient checkpointing turned on by the "
        "benchmark on policy and value model (PPOTrainer.train() does not).",
        QLORA_NOTE,
    ]
    if args.dry_run:
        sizes, caps = ["tiny"], [None]
        configs = [c for c in (args.configs or "fastrlhf-full").split(",") if c]
        work = Workload(steps=2, rollout_batch_size=4, micro_batch_size=2, prompt_len=8, response_len=4)
        work.dtype, work.gradient_checkpointing = "float32", False
        notes.append("Dry run on CPU: tiny shape, torch AdamW (8-bit AdamW needs CUDA), no cap.")
    else:
        sizes = [s for s in args.sizes.split(",") if s]
        configs = [c for c in (args.configs or ",".join(CONFIGS)).split(",") if c]
        caps = sorted((float(c) for c in args.caps.split(",") if c), reverse=True)
        for s in sizes:
            if s not in E.SHAPES:
                raise SystemExit(f"unknown size {s!r}; choose from {SIZES}")
        if not cuda:
            raise SystemExit("the fit table needs a CUDA GPU (use --dry-run to test the plumbing on CPU)")
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown configuration {c!r}; choose from {list(CONFIGS)}")
    ok_trl, why = E.trl_available()
    if "trl-full" in configs and not ok_trl:
        notes.append(f"trl-full not run: {why}")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": dev,
        "versions": E.versions(),
        "workload": dataclasses.asdict(work),
        "configs": {c: dataclasses.asdict(CONFIGS[c]) for c in configs},
        "caps": _cap_keys(caps),
        "notes": notes,
        "rows": [],
        "dry_run": args.dry_run,
    }
    out = args.out or (Path(tempfile.mkdtemp(prefix="fit-table-")) if args.dry_run else RESULTS)
    stem = (
        f"fit-table-{E.device_slug(dev)}-{report['date'][:10]}{'-dry-run' if args.dry_run else ''}{args.tag}"
    )
    t_start = time.perf_counter()
    for size in sizes:
        shape = E.SHAPES[size]
        rows = {c: {"size": size, "config": c, "cells": {}} for c in configs}
        report["rows"].extend(rows.values())
        tmp = Path(tempfile.mkdtemp(prefix=f"fit-{size}-"))
        try:
            t0 = time.perf_counter()
            policy_dir, reward_dir = E.build_model_dirs(
                shape, tmp / "models", work.dtype, "cuda" if cuda else "cpu"
            )
            report.setdefault("model_build_s", {})[size] = time.perf_counter() - t0
            for c in configs:
                cfg = CONFIGS[c]
                implied: str | None = None
                for cap in caps:
                    key = "none" if cap is None else f"{cap:g}"
                    if cfg.system == "trl" and not ok_trl:
                        rows[c]["cells"][key] = {"status": "skipped", "error": why}
                        continue
                    if implied is not None:
                        rows[c]["cells"][key] = {"status": implied}
                        continue
                    if args.time_budget_s and time.perf_counter() - t_start > args.time_budget_s:
                        rows[c]["cells"][key] = {"status": "not run (time budget)"}
                        continue
                    spec = cell_spec(
                        E,
                        cfg,
                        work,
                        policy_dir,
                        reward_dir,
                        tmp / f"{c}-{key}",
                        cap,
                        shape.vocab,
                        optimizer="adamw" if not cuda else None,
                        threads=1 if not cuda else 0,
                    )
                    print(f"[fit_table] {size} {c} cap={key} ...", file=sys.stderr, flush=True)
                    cell = cell_record(E.run_worker(spec, args.cell_timeout_s), work.steps)
                    rows[c]["cells"][key] = cell
                    print(f"[fit_table]   -> {cell['status']}", file=sys.stderr, flush=True)
                    if cell["status"] == "oom" and not args.no_skip_implied:
                        implied = "oom (implied)"
                    write_report(report, out, stem)  # partial results survive a killed run
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if cuda:
                torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - t_start
    write_report(report, out, stem)
    print(markdown(report))
    print(f"[fit_table] wrote {out / stem}.{{json,md,png}}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
