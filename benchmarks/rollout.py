#!/usr/bin/env python
"""Rollout benchmark: generated tokens/s and memory of each rollout backend, and the PPO step with each.

python benchmarks/rollout.py --out DIR [--dry-run] [--time-budget-s N] [--backends hf,static,paged]

GPU run: Qwen2.5-0.5B and 1.5B shapes built from configs (random bf16 weights, nothing downloaded), batch 64
and 256, 128-token prompts, 256 new tokens (min_new_tokens = max_new_tokens, so every backend generates the
same number of tokens), then one PPO step per backend on the 0.5B end-to-end preset (benchmarks/e2e). Each
cell: one warm-up call (allocation, CUDA-graph capture), then up to 3 timed calls (device synchronized;
the median is reported). Cells run in priority order until ``--time-budget-s`` is spent; the rest are
recorded as skipped. ``--dry-run``: a tiny Llama on the CPU, every code path, a few seconds.

Writes rollout-<device>-<date>.json and .md into --out. Targets (issue 8): static >= 4x hf tokens/s; the
static backend's extra memory <= KV cache + 10%; PPO step with static >= 2x faster than with hf at 0.5B.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from e2e.environment import device_info, device_slug, report_header
from e2e.models import SHAPES, build_tokenizer, model_config
from e2e.presets import PRESETS

from fastrlhf.config import ModelConfig, OptimConfig, PPOConfig, RolloutConfig
from fastrlhf.rollout import SamplingParams, make_engine

SCHEMA = "fastrlhf.rollout-bench/1"


@dataclasses.dataclass(frozen=True)
class Plan:
    shapes: tuple[str, ...]
    batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    backends: tuple[str, ...]
    ppo_preset: str | None
    ppo_backends: tuple[str, ...]
    timed_calls: int
    dtype: torch.dtype
    device: str


def gpu_plan(backends: tuple[str, ...]) -> Plan:
    ppo_backends = tuple(b for b in backends if b != "paged")  # paged: generation table only
    return Plan(
        ("0.5b", "1.5b"), (64, 256), 128, 256, backends, "0.5b", ppo_backends, 3, torch.bfloat16, "cuda"
    )


def dry_plan(backends: tuple[str, ...]) -> Plan:
    return Plan(("tiny",), (4,), 8, 6, backends, "tiny", tuple(b for b in backends if b != "paged"), 2,
                torch.float32, "cpu")  # fmt: skip


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_since(device: str, base: int) -> float:
    return (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else 0.0


def build_policy(shape_name: str, plan: Plan):
    shape = SHAPES[shape_name]
    tok = build_tokenizer(shape.vocab)
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = _from_config(model_config(shape, tok), plan.dtype)
    return model.eval(), tok


def _from_config(config, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def generation_cell(model, tok, backend: str, batch: int, plan: Plan, deadline: float) -> dict[str, Any]:
    """One (shape, batch, backend) measurement: a warm-up call, one timed call, and more (up to
    ``plan.timed_calls``) while another one fits before ``deadline`` (this cell's share of the budget).

    The warm-up has the timed calls' shapes for static (allocation and CUDA-graph capture happen there)
    and 4 new tokens for hf and paged, whose caches are rebuilt on every call anyway."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(4, min(tok.vocab_size, 1000), (batch, plan.prompt_len), generator=g)
    ids[:, 0] = tok.bos_token_id
    ids, mask = ids.to(plan.device), torch.ones_like(ids, device=plan.device)
    params = SamplingParams(max_new_tokens=plan.new_tokens, min_new_tokens=plan.new_tokens, temperature=1.0,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            suppress_ids=(tok.pad_token_id,))  # fmt: skip
    engine = make_engine(RolloutConfig(backend=backend), torch.device(plan.device))
    base = _peak_reset(plan.device)
    short = dataclasses.replace(params, max_new_tokens=4, min_new_tokens=4)
    warm = engine.generate(model, ids, mask, params if backend == "static" else short)
    record: dict[str, Any] = {"backend": backend, "ran_as": warm.backend, "warmup_s": warm.seconds}
    seconds: list[float] = []
    for _ in range(plan.timed_calls):
        if seconds and time.perf_counter() + max(seconds) > deadline:
            break
        gen = engine.generate(model, ids, mask, params)
        seconds.append(gen.seconds)
    _sync(plan.device)
    tokens = int(gen.tokens.shape[0] * gen.tokens.shape[1])
    median = statistics.median(seconds)
    record |= {
        "timed_calls": len(seconds),
        "seconds_median": median,
        "seconds_all": seconds,
        "generated_tokens": tokens,
        "tokens_per_second": tokens / median,
        "peak_extra_gib": _peak_since(plan.device, base),  # above the weights (and whatever was resident)
        "kv_cache_gib": gen.kv_cache_bytes / 2**30,
        "stats": gen.stats,
    }
    engine.release()
    return record


def ppo_cell(preset_name: str, backend: str, plan: Plan, deadline: float) -> dict[str, Any]:
    """Whole PPO steps (rollout, score, evaluate, advantages, update) with ``backend``; value head on the
    policy's trunk and a rule reward, so that only the policy (and its reference) are in memory."""
    from fastrlhf.models import ValueHead, make_optimizer, trainable_parameters, warmup_schedule
    from fastrlhf.ppo import KLController, PPOModels, Trainables, ppo_step

    preset = PRESETS[preset_name]
    dtype = getattr(torch, preset.dtype)
    policy, tok = build_policy(preset.shape, dataclasses.replace(plan, dtype=dtype))
    reference = _from_config(policy.config, dtype).to(plan.device).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    if preset.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    head = ValueHead(policy.config.hidden_size).to(plan.device)
    cfg = PPOConfig(
        rollout_batch_size=preset.rollout_batch_size, micro_batch_size=preset.micro_batch_size,
        ppo_epochs=preset.ppo_epochs, num_minibatches=preset.num_minibatches,
        max_new_tokens=preset.response_len, min_new_tokens=preset.response_len, critic="policy_head",
        model_config=ModelConfig(dtype=preset.dtype), policy_optim=OptimConfig(lr=1e-6),
        rollout=RolloutConfig(backend=backend),
    )  # fmt: skip
    params = trainable_parameters(policy, head)
    opt = make_optimizer(params, cfg.policy_optim, cfg.model_config, torch.device(plan.device))
    trainables = Trainables(opt, warmup_schedule(opt, 0), params)
    models = PPOModels(policy, tok, lambda p, c: [float(len(x)) / 100 for x in c], reference, None, head)
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, min(tok.vocab_size, 1000), (cfg.rollout_batch_size, preset.prompt_len),
                               generator=g)  # fmt: skip
    prompt_ids[:, 0] = tok.bos_token_id
    texts, ids = [""] * cfg.rollout_batch_size, prompt_ids.tolist()
    kl = KLController(cfg.kl_coef)
    steps: list[dict[str, float]] = []
    step_s: list[float] = []
    for step in range(1 + plan.timed_calls):  # step 0 is the warm-up
        if step >= 2 and time.perf_counter() + max(step_s) > deadline:
            break
        _sync(plan.device)
        t0 = time.perf_counter()
        stats, _ = ppo_step(models, texts, ids, trainables, kl, cfg, step)
        _sync(plan.device)
        if step > 0:
            step_s.append(time.perf_counter() - t0)
            steps.append(stats)
    del models, policy, reference, trainables, opt
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    if not steps:
        return {"backend": backend, "status": "skipped: time budget after the warm-up step"}
    keys = ("time/generate", "time/evaluate", "time/update", "memory_gib/step", "rollout/tokens_per_second",
            "rollout/kv_cache_gib", "ratio_first_minibatch_max_dev")  # fmt: skip
    return {
        "backend": backend,
        "status": "ok",
        "preset": preset_name,
        "steps_timed": len(step_s),
        "step_s_median": statistics.median(step_s),
        **{k: statistics.median(s[k] for s in steps) for k in keys if k in steps[0]},
    }


def run(plan: Plan, budget_s: float) -> dict[str, Any]:
    """Cells in priority order: the first shape's generation, the PPO steps, then the other shapes. Each
    cell gets an equal share of what is left of the budget; a cell that would start late is skipped."""
    start = time.perf_counter()
    deadline = start + budget_s
    jobs: list[tuple] = [("gen", plan.shapes[0], b, k) for b in plan.batches for k in plan.backends]
    jobs += [("ppo", plan.ppo_preset, None, k) for k in plan.ppo_backends if plan.ppo_preset is not None]
    jobs += [("gen", sh, b, k) for sh in plan.shapes[1:] for b in plan.batches for k in plan.backends]
    cells: list[dict[str, Any]] = []
    ppo: list[dict[str, Any]] = []
    model = tok = loaded = None
    for index, (kind, shape_name, batch, backend) in enumerate(jobs):
        now = time.perf_counter()
        share = now + (deadline - now) / (len(jobs) - index)
        where = {"shape": shape_name, "batch": batch} if kind == "gen" else {}
        sink = cells if kind == "gen" else ppo
        if now > deadline:
            sink.append(where | {"backend": backend, "status": "skipped: time budget"})
            continue
        if loaded != (shape_name if kind == "gen" else None):
            model = tok = None  # one model in memory at a time
            if plan.device == "cuda":
                torch.cuda.empty_cache()
            loaded = shape_name if kind == "gen" else None
            if kind == "gen":
                model, tok = build_policy(shape_name, plan)
        try:
            if kind == "gen":
                cells.append(
                    where | {"status": "ok"} | generation_cell(model, tok, backend, batch, plan, share)
                )
            else:
                ppo.append(ppo_cell(shape_name, backend, plan, share))
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            sink.append(where | {"backend": backend, "status": f"out of memory: {e}"[:300]})
    return {"generation": cells, "ppo_step": ppo, "wall_s": time.perf_counter() - start}


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
    lines += ["", f"PPO step speed-up vs hf: {report['summary']['ppo_step_speedup_vs_hf']}", ""]
    lines += ["| target | value | pass |", "|---|---|---|"]
    for t in report["targets"].values():
        lines.append(f"| {t['description']} | {f(t['value'])} | {t['pass']} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", required=True, help="directory for rollout-<device>-<date>.json/.md")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks every code path")
    p.add_argument("--time-budget-s", type=float, default=150.0, help="stop starting new cells after this")
    p.add_argument("--backends", default="hf,static", help="comma-separated rollout backends (hf first)")
    args = p.parse_args(argv)
    backends = tuple(b for b in args.backends.split(",") if b)
    if args.dry_run:
        torch.set_num_threads(1)
        plan = dry_plan(backends)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    else:
        plan = gpu_plan(backends)
    dev = device_info()
    result = run(plan, args.time_budget_s)
    report = report_header(SCHEMA, dev) | {
        "dry_run": args.dry_run,
        "time_budget_s": args.time_budget_s,
        "plan": {k: str(v) for k, v in dataclasses.asdict(plan).items()},
        "result": result,
    }
    report["summary"] = summarize(result)
    report["targets"] = targets(report["summary"], args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"rollout-{device_slug(dev)}-{dt.date.today().isoformat()}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return out / f"{stem}.json"


if __name__ == "__main__":
    main()
