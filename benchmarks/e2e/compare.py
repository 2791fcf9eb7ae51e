"""End-to-end PPO step benchmark: fastrlhf against TRL 1.12's ``trl.experimental.ppo.PPOTrainer``.

Both systems run the same PPO configuration, one after the other, each in its own subprocess (so peak RSS and
peak GPU memory are per system): the same randomly initialized models saved from configs (policy, frozen
reference, reward model, and a separate critic initialized from the reward model: fastrlhf's
``critic="reward_model"``, TRL's ``value_model``), the same prompts (all exactly ``prompt_len`` tokens, so no
padding), the same rollout batch, micro-batch, PPO epochs and minibatches, dtype, attention implementation,
optimizer (torch AdamW, no gradient clipping: TRL's PPO loop does not clip), gradient checkpointing, sampling
temperature, KL coefficient and estimator (k1), GAE and clipping constants. Every response is exactly
``response_len`` tokens on both sides (see ``e2e.run_trl``); every TRL rollout is checked.

Per PPO step (the first step is warm-up and excluded; medians over the rest): wall time between step ends,
split into generate / score (old log-probs, reference, values, reward) / advantages / update / other, tokens
per second (B * (prompt_len + response_len) / step wall time), effective optimizer steps, and the peak memory
of the run (``torch.cuda.max_memory_allocated`` on GPU, peak RSS from ``getrusage`` on CPU). Results:
``benchmarks/results/e2e-ppo-<scale>-<device>-<date>.{json,md}``. Without TRL only fastrlhf runs and the JSON
says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from e2e.compare_report import combine_runs, markdown, plot, ratios, summarize
from e2e.environment import TRL_VERSION, device_info, device_slug, report_header, trl_available
from e2e.models import SHAPES, build_model_dirs, make_prompts
from e2e.presets import PRESETS
from e2e.spec import RunSpec
from e2e.worker import run_worker

RESULTS = Path(__file__).resolve().parent.parent / "results"
SCHEMA = "fastrlhf-e2e-ppo/1"
SYSTEMS = ("fastrlhf", "trl")
# the config keys that are RunSpec fields of the same meaning
SPEC_FIELDS = (
    "steps",
    "rollout_batch_size",
    "micro_batch_size",
    "rollout_forward_batch_size",
    "ppo_epochs",
    "num_minibatches",
    "prompt_len",
    "response_len",
    "dtype",
    "lora_rank",
    "gradient_checkpointing",
    "fastrlhf_driver",
)

METHOD_NOTES = [
    "Each system runs in its own subprocess, one after the other, on the same machine.",
    "Step time: wall time between consecutive step ends; the first step of each run is warm-up and "
    "excluded; medians over the remaining steps of all runs (runs of the two systems interleaved); peak "
    "memory: the largest of the runs.",
    "score = old log-probs + reference + values + reward (fastrlhf: time/score + time/evaluate; TRL: "
    "from the end of generation to the end of its last no-grad forward). advantages: TRL's also includes "
    "its per-step gc.collect(). other = step wall time minus the phases (batching, logging, scheduler, "
    "gc).",
    "TRL generation length fixed via the policy's generation_config (min_new_tokens = response_length, "
    "suppress_tokens = [pad]) with stop_token='eos': EOS is masked until the limit, so all responses "
    "have exactly response_len tokens; checked per rollout (systems.trl.steps: response_len, eos_tokens, "
    "pad_tokens). fastrlhf: min_new_tokens = max_new_tokens.",
    "TRL keeps the generation logits (output_scores) for the old log-probs; fastrlhf recomputes them in "
    "its evaluate pass. Both are part of each system's normal step.",
    "'of which gc + empty_cache': time inside TRL's own gc.collect() and empty_cache() calls (two full "
    "garbage collections per step), already counted in the phase columns; fastrlhf makes no such calls.",
    "micro_batch_size = minibatch size (rollout_batch_size / num_minibatches) and the prompt set is exactly "
    "one rollout batch: TRL 1.12 wraps each micro-batch in accelerator.accumulate with "
    "gradient_accumulation_steps = rollout_batch_size / micro_batch_size, so its optimizer steps once per "
    "PPO epoch on batches that are not the dataloader's last and after every micro-batch on the last one "
    "(accelerate syncs at end_of_dataloader). Only with one micro-batch per minibatch and a one-batch "
    "dataset does it take ppo_epochs x num_minibatches optimizer steps per PPO step like fastrlhf (measured: "
    "systems.*.steps[].optimizer_steps).",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: fastrlhf,trl")
    p.add_argument("--steps", type=int, help="PPO steps per system, the first is warm-up (default: preset)")
    p.add_argument("--batch", type=int, help="rollout batch size")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward")
    p.add_argument(
        "--rollout-forward-batch", type=int, help="TRL local_rollout_forward_batch_size (def.: batch)"
    )
    p.add_argument("--ppo-epochs", type=int)
    p.add_argument("--num-minibatches", type=int)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--response-len", type=int)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument(
        "--fastrlhf-driver",
        choices=("train_ppo", "ppo_step"),
        help="fastrlhf's train_ppo, or a loop over build_models/build_trainables/ppo_step (no final save)",
    )
    p.add_argument("--threads", type=int, help="torch threads per worker (default: 1 on CPU, torch's on GPU)")
    p.add_argument("--repeats", type=int, help="runs per system, interleaved (default: 3 on tiny, else 1)")
    p.add_argument("--timeout-s", type=float, default=1200.0, help="per-system worker timeout")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and markdown results")
    p.add_argument("--tag", default="", help="extra suffix for the result file names")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The preset of ``--scale`` with the command line's overrides, as recorded in the report."""
    preset = PRESETS[args.scale]
    batch = args.batch or preset.rollout_batch_size
    return {
        "scale": args.scale,
        "shape": dataclasses.asdict(SHAPES[preset.shape]),
        "steps": args.steps or preset.steps,
        "repeats": args.repeats or (3 if args.scale == "tiny" else 1),
        "rollout_batch_size": batch,
        "micro_batch_size": args.micro_batch or preset.micro_batch_size,
        "rollout_forward_batch_size": args.rollout_forward_batch or batch,
        "ppo_epochs": args.ppo_epochs or preset.ppo_epochs,
        "num_minibatches": args.num_minibatches or preset.num_minibatches,
        "prompt_len": args.prompt_len or preset.prompt_len,
        "response_len": args.response_len or preset.response_len,
        "dtype": args.dtype or preset.dtype,
        "lora_rank": preset.lora_rank if args.lora_rank is None else args.lora_rank,
        "gradient_checkpointing": preset.gradient_checkpointing,
        "fastrlhf_driver": args.fastrlhf_driver or preset.fastrlhf_driver,
        "optimizer": "torch AdamW (fastrlhf adamw, TRL adamw_torch), lr 3e-6, no gradient clipping",
        "attn_implementation": "sdpa",
        "temperature": 1.0,
        "kl_coef": 0.05,
        "kl_estimator": "k1",
        "critic": "separate critic initialized from the reward model (fastrlhf critic=reward_model)",
    }


def cpu_note(dev: dict[str, Any]) -> str:
    return (
        f"CPU timings from a shared {os.cpu_count()}-core machine "
        f"({dev['torch_threads_per_worker']} torch thread(s) per worker) are noisy; peak memory is the "
        "worker's peak RSS (getrusage), which includes the Python libraries each system imports (TRL "
        "also imports datasets, pandas, pyarrow); 'RSS added after imports' subtracts the RSS measured "
        "right after those imports, leaving models, optimizer states and activations."
    )


def run_systems(
    cfg: dict[str, Any], systems: Sequence[str], threads: int, timeout_s: float, root: Path, device: str
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, RunSpec], float]:
    """Every run of every system, interleaved (A B A B ...); a failed system is not repeated. Returns the
    runs and the spec of each system, and the seconds spent building the models."""
    shape = SHAPES[PRESETS[cfg["scale"]].shape]
    t0 = time.perf_counter()
    policy_dir, reward_dir = build_model_dirs(shape, root / "models", cfg["dtype"], device)
    build_s = time.perf_counter() - t0
    prompts = make_prompts(cfg["rollout_batch_size"], cfg["prompt_len"], shape.vocab, seed=0)
    runs: dict[str, list[dict[str, Any]]] = {}
    specs: dict[str, RunSpec] = {}
    for rep in range(cfg["repeats"]):
        for system in systems:
            if runs.get(system) and runs[system][-1].get("status") != "ok":
                continue
            specs[system] = RunSpec(
                system=system,
                policy_dir=str(policy_dir),
                reward_dir=str(reward_dir),
                work_dir=str(root / f"{system}-{rep}"),
                prompts=prompts,
                threads=threads,
                **{k: cfg[k] for k in SPEC_FIELDS},
            )
            print(
                f"[e2e_ppo] running {system} (run {rep + 1} of {cfg['repeats']}) ...",
                file=sys.stderr,
                flush=True,
            )
            runs.setdefault(system, []).append(run_worker(specs[system], timeout_s))
    return runs, specs, build_s


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    dev = device_info()
    if dev["type"] == "cpu" and args.scale != "tiny":
        print(f"warning: --scale {args.scale} on a CPU will be very slow", file=sys.stderr)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise SystemExit(f"unknown systems {bad}; choose from {SYSTEMS}")
    threads = args.threads if args.threads is not None else (1 if dev["type"] == "cpu" else 0)
    dev["torch_threads_per_worker"] = threads or torch.get_num_threads()
    cfg = run_config(args)
    notes = [*METHOD_NOTES, *PRESETS[args.scale].notes]
    if dev["type"] == "cpu":
        notes.append(cpu_note(dev))
    report: dict[str, Any] = {**report_header(SCHEMA, dev), "config": cfg, "notes": notes, "systems": {}}
    trl_ok, trl_missing = trl_available()
    if "trl" in systems and trl_ok and report["versions"].get("trl") != TRL_VERSION:
        notes.append(f"TRL version is {report['versions'].get('trl')}, not {TRL_VERSION}.")
    runnable = [s for s in systems if s != "trl" or trl_ok]
    with tempfile.TemporaryDirectory(prefix="e2e-ppo-") as tmp:
        runs, specs, report["model_build_s"] = run_systems(
            cfg, runnable, threads, args.timeout_s, Path(tmp), "cuda" if dev["type"] == "cuda" else "cpu"
        )
    for system in systems:
        if system not in runs:
            report["systems"][system] = {"status": "skipped", "reason": trl_missing}
            continue
        result = combine_runs(runs[system])
        if result.get("status") == "ok":
            result["summary"] = summarize(result, specs[system])
        report["systems"][system] = result
    summaries = {s: report["systems"].get(s, {}).get("summary") for s in SYSTEMS}
    if summaries["fastrlhf"] and summaries["trl"]:
        report["ratios"] = ratios(summaries["fastrlhf"], summaries["trl"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-ppo-{args.scale}-{device_slug(dev)}-{report['date'][:10]}{args.tag}"
    report["files"] = {"json": f"{stem}.json", "markdown": f"{stem}.md", "chart": f"{stem}.png"}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    (args.out / f"{stem}.md").write_text(md)
    plot(report, args.out / f"{stem}.png")
    print(md)
    return report
