"""What fits where: PPO (policy, reference, reward model, critic) under 12 / 16 / 24 GiB memory caps.

Rows are model shapes (Qwen2.5-0.5B, -1.5B, -3B and Llama-3-8B, random weights saved from configs, nothing
downloaded) x configurations:

* ``fastrlhf-full``: every weight trained, 8-bit AdamW (bitsandbytes, not paged), bf16, gradient
  checkpointing;
* ``fastrlhf-lora``: LoRA rank 16 on policy and critic (reference = the adapter-disabled policy);
* ``fastrlhf-qlora``: LoRA rank 16 on a 4-bit NF4 base (policy, critic and the frozen reward model in 4 bits);
* ``trl-full``: TRL 1.12's PPOTrainer, full fine-tuning with the same 8-bit AdamW (``optim=adamw_bnb_8bit``)
  and gradient checkpointing (TRL applies to full fine-tuning with a separate value model only).

Columns are memory caps, enforced with ``torch.cuda.set_per_process_memory_fraction`` on a larger card. Each
cell runs ``--steps`` PPO steps in a fresh subprocess (the comparison's worker, so OOM and fragmentation
never leak into the next cell) and records whether all steps completed, the peak
``torch.cuda.max_memory_allocated``, and the median step time (first step excluded). Caps run largest first
and a cell that OOMs makes the smaller caps of its row "oom (implied)" unless ``--no-skip-implied``.

Caveats: the cap binds PyTorch's allocator only; the CUDA context and cuBLAS workspace (~0.5-1 GiB on a real
card of that size) are outside it, which is why the 8-bit optimizer here is the non-paged one (paged
bitsandbytes states live in managed memory, also outside the cap). Writes
``fit-table-<device>-<date>{.json,.md,.png}`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.environment import device_info, device_slug, report_header, trl_available
from e2e.fit_report import cap_key, cap_keys, markdown, merge, write_report
from e2e.models import SHAPES, build_model_dirs, make_prompts
from e2e.spec import RunSpec
from e2e.worker import run_worker

RESULTS = Path(__file__).resolve().parent.parent / "results"
SCHEMA = "fastrlhf-fit-table/1"


@dataclass(frozen=True)
class FitConfig:
    """One row family of the table: which system and how it trains."""

    name: str
    system: str  # "fastrlhf" or "trl"
    lora_rank: int
    load_in_4bit: bool
    optimizer: str  # fastrlhf's name; mapped to TRL's optim for trl
    fastrlhf_driver: str = "ppo_step"  # no final save: a cell measures the steps only
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
    """The PPO step every cell runs (the same for all rows); field names are RunSpec's."""

    steps: int = 3
    rollout_batch_size: int = 16
    micro_batch_size: int = 8  # = minibatch size, so TRL takes the same optimizer steps (see compare.py)
    ppo_epochs: int = 1
    num_minibatches: int = 2
    prompt_len: int = 128
    response_len: int = 128
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = True


DRY_RUN = Workload(
    steps=2,
    rollout_batch_size=4,
    micro_batch_size=2,
    prompt_len=8,
    response_len=4,
    dtype="float32",
    gradient_checkpointing=False,
)

NOTES = [
    "Each cell is a fresh subprocess; a cell fits when all its PPO steps complete under the cap.",
    "The cap (torch.cuda.set_per_process_memory_fraction) binds PyTorch's allocator only: the CUDA "
    "context and library workspaces come on top on a real card of that size.",
    "8-bit AdamW is bitsandbytes' non-paged AdamW8bit (fastrlhf optimizer=adamw8bit, TRL "
    "optim=adamw_bnb_8bit) so that optimizer states count against the cap; fastrlhf's CUDA default is "
    "the paged variant, which can only fit more.",
    "TRL cells: separate value model (full), reference = a second policy copy, "
    "local_rollout_forward_batch_size = micro-batch size, gradient checkpointing turned on by the "
    "benchmark on policy and value model (PPOTrainer.train() does not).",
]


def cell_record(result: dict[str, Any], steps: int) -> dict[str, Any]:
    """The table's view of one worker result."""
    recs = result.get("steps") or []
    status = result.get("status", "error")
    if status == "ok":
        status = "fits" if len(recs) >= steps else "incomplete"
    mem = result.get("memory") or {}
    walls = [r["wall_s"] for r in recs[1:] or recs if r.get("wall_s") is not None]  # first step: warm-up
    return {
        "status": status,
        "steps_completed": len(recs),
        "peak_allocated_gib": mem.get("peak_gpu_allocated_gib"),
        "peak_reserved_gib": mem.get("peak_gpu_reserved_gib"),
        "peak_rss_gib": mem.get("peak_rss_gib"),
        "median_step_s": statistics.median(walls) if walls else None,
        "error": (result.get("error") or "")[:500] or None,
        "process_s": result.get("process_s"),
    }


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


def _selection(args: argparse.Namespace, cuda: bool) -> tuple[list[str], list[str], list[float | None]]:
    """Sizes, configurations and caps (largest first) to run."""
    if args.dry_run:
        return ["tiny"], [c for c in (args.configs or "fastrlhf-full").split(",") if c], [None]
    sizes = [s for s in args.sizes.split(",") if s]
    configs = [c for c in (args.configs or ",".join(CONFIGS)).split(",") if c]
    for s in sizes:
        if s not in SHAPES:
            raise SystemExit(f"unknown size {s!r}; choose from {SIZES}")
    if not cuda:
        raise SystemExit("the fit table needs a CUDA GPU (use --dry-run to test the plumbing on CPU)")
    return sizes, configs, sorted((float(c) for c in args.caps.split(",") if c), reverse=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        report = merge(args.merge, (*SIZES, "tiny"), list(CONFIGS))
        stem = f"fit-table-{device_slug(report['device'])}-{report['date'][:10]}-merged{args.tag}"
        write_report(report, args.out or RESULTS, stem)
        print(markdown(report))
        return report
    import torch

    dev = device_info()
    cuda = dev["type"] == "cuda"
    sizes, configs, caps = _selection(args, cuda)
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown configuration {c!r}; choose from {list(CONFIGS)}")
    work = DRY_RUN if args.dry_run else Workload(steps=args.steps)
    notes = list(NOTES)
    if args.dry_run:
        notes.append("Dry run on CPU: tiny shape, torch AdamW (8-bit AdamW needs CUDA), no cap.")
    trl_ok, trl_missing = trl_available()
    if "trl-full" in configs and not trl_ok:
        notes.append(f"trl-full not run: {trl_missing}")
    report: dict[str, Any] = {
        **report_header(SCHEMA, dev),
        "workload": dataclasses.asdict(work),
        "configs": {c: dataclasses.asdict(CONFIGS[c]) for c in configs},
        "caps": cap_keys(caps),
        "notes": notes,
        "rows": [],
        "dry_run": args.dry_run,
    }
    out = args.out or (Path(tempfile.mkdtemp(prefix="fit-table-")) if args.dry_run else RESULTS)
    stem = f"fit-table-{device_slug(dev)}-{report['date'][:10]}{'-dry-run' if args.dry_run else ''}{args.tag}"
    t_start = time.perf_counter()
    for size in sizes:
        shape = SHAPES[size]
        rows = {c: {"size": size, "config": c, "cells": {}} for c in configs}
        report["rows"].extend(rows.values())
        tmp = Path(tempfile.mkdtemp(prefix=f"fit-{size}-"))
        try:
            t0 = time.perf_counter()
            policy_dir, reward_dir = build_model_dirs(
                shape, tmp / "models", work.dtype, "cuda" if cuda else "cpu"
            )
            report.setdefault("model_build_s", {})[size] = time.perf_counter() - t0
            for c in configs:
                cfg, cells = CONFIGS[c], rows[c]["cells"]
                implied: str | None = None
                for cap in caps:
                    key = cap_key(cap)
                    if cfg.system == "trl" and not trl_ok:
                        cells[key] = {"status": "skipped", "error": trl_missing}
                        continue
                    if implied is not None:
                        cells[key] = {"status": implied}
                        continue
                    if args.time_budget_s and time.perf_counter() - t_start > args.time_budget_s:
                        cells[key] = {"status": "not run (time budget)"}
                        continue
                    spec = RunSpec(
                        system=cfg.system,
                        policy_dir=str(policy_dir),
                        reward_dir=str(reward_dir),
                        work_dir=str(tmp / f"{c}-{key}"),
                        prompts=make_prompts(work.rollout_batch_size, work.prompt_len, shape.vocab),
                        rollout_forward_batch_size=work.micro_batch_size,
                        lora_rank=cfg.lora_rank,
                        load_in_4bit=cfg.load_in_4bit,
                        optimizer=cfg.optimizer if cuda else "adamw",  # bitsandbytes' 8-bit AdamW needs CUDA
                        threads=0 if cuda else 1,
                        memory_cap_gib=cap,
                        fastrlhf_driver=cfg.fastrlhf_driver,
                        **dataclasses.asdict(work),
                    )
                    print(f"[fit_table] {size} {c} cap={key} ...", file=sys.stderr, flush=True)
                    cells[key] = cell_record(run_worker(spec, args.cell_timeout_s), work.steps)
                    print(f"[fit_table]   -> {cells[key]['status']}", file=sys.stderr, flush=True)
                    if cells[key]["status"] == "oom" and not args.no_skip_implied:
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
