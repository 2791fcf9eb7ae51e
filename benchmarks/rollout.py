#!/usr/bin/env python
"""Rollout benchmark: generated tokens/s and memory of each rollout backend, and the PPO step with each.

python benchmarks/rollout.py --out DIR [--dry-run] [--time-budget-s N] [--backends hf,static,paged]

GPU run: Qwen2.5-0.5B and 1.5B shapes built from configs (random bf16 weights, nothing downloaded), batch 64
and 256, 128-token prompts, 256 new tokens (EOS suppressed, so every backend generates the same number of
tokens), then PPO steps per backend on the 0.5B end-to-end preset (benchmarks/e2e). Each cell: one warm-up
call (allocation, CUDA-graph capture), then up to 3 timed calls (device synchronized; the median is
reported). Priority: hf and static at 0.5B, their PPO steps, hf and static at 1.5B, then paged. A cell
whose next call would end past ``--time-budget-s`` (estimated from its warm-up) stops there and says so;
the rest are recorded as skipped. ``--dry-run``: a tiny Llama on the CPU, every code path, a few seconds.

Writes rollout-<device>-<date>.json and .md into --out, rewritten after every cell (a run stopped from
outside keeps what it measured). Targets (issue 8): static >= 4x hf tokens/s; the static backend's extra
memory <= KV cache + 10%; PPO step with static >= 2x faster than with hf at 0.5B. vLLM is listed as not
measured: it cannot be installed next to this torch on the GPU machine available here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from e2e.environment import device_info, device_slug, report_header
from e2e.models import SHAPES, build_tokenizer, model_config
from e2e.presets import PRESETS
from rollout_report import markdown, summarize, targets

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
    return Plan(("0.5b", "1.5b"), (64, 256), 128, 256, backends, "0.5b", backends, 3, torch.bfloat16, "cuda")


def dry_plan(backends: tuple[str, ...]) -> Plan:
    return Plan(("tiny",), (4,), 8, 6, backends, "tiny", backends, 1, torch.float32, "cpu")


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


def generation_cell(
    model, tok, backend: str, batch: int, plan: Plan, share: float, deadline: float
) -> dict[str, Any]:
    """One (shape, batch, backend) measurement: a warm-up call, one timed call, and more (up to
    ``plan.timed_calls``) while another one fits before ``share`` (this cell's share of the budget).

    The warm-up has the timed calls' shapes for static (allocation and CUDA-graph capture happen there)
    and 4 new tokens for hf and paged, whose caches are rebuilt on every call anyway; from it, a timed
    call that would end past ``deadline`` (the whole budget) is not started."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(4, min(tok.vocab_size, 1000), (batch, plan.prompt_len), generator=g)
    ids[:, 0] = tok.bos_token_id
    ids, mask = ids.to(plan.device), torch.ones_like(ids, device=plan.device)
    # EOS suppressed: every row runs to max_new_tokens with every backend (paged would need two calls
    # for min_new_tokens), as PPO's rollouts run with min_new_tokens = 0.
    no_eos = (tok.pad_token_id, tok.eos_token_id)
    params = SamplingParams(max_new_tokens=plan.new_tokens, temperature=1.0, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, suppress_ids=no_eos)  # fmt: skip
    engine = make_engine(RolloutConfig(backend=backend), torch.device(plan.device))
    base = _peak_reset(plan.device)
    short = dataclasses.replace(params, max_new_tokens=4)
    warm = engine.generate(model, ids, mask, params if backend == "static" else short)
    record: dict[str, Any] = {"backend": backend, "ran_as": warm.backend, "warmup_s": warm.seconds}
    estimate = warm.seconds * (1 if backend == "static" else plan.new_tokens / short.max_new_tokens)
    if time.perf_counter() + estimate > deadline:
        engine.release()
        return record | {"status": f"skipped after the warm-up: a call would take ~{estimate:.0f} s, "
                                   f"{max(0.0, deadline - time.perf_counter()):.0f} s left"}  # fmt: skip
    seconds: list[float] = []
    for _ in range(plan.timed_calls):
        if seconds and time.perf_counter() + max(seconds) > min(share, deadline):
            break
        gen = engine.generate(model, ids, mask, params)
        seconds.append(gen.seconds)
    _sync(plan.device)
    tokens = int(gen.tokens.shape[0] * gen.tokens.shape[1])
    median = statistics.median(seconds)
    record |= {
        "status": "ok",
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


def ppo_cell(preset_name: str, backend: str, plan: Plan, share: float, deadline: float) -> dict[str, Any]:
    """Whole PPO steps (rollout, score, evaluate, advantages, update) with ``backend``; value head on the
    policy's trunk and a rule reward, so that only the policy (and its reference) are in memory. Step 0
    is the warm-up; a timed step that would end past ``deadline`` is not started, more than one only
    while it fits in ``share``."""
    from fastrlhf.models import ValueHead
    from fastrlhf.optim import make_optimizer, trainable_parameters, warmup_schedule
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
    warm_s = 0.0
    for step in range(1 + plan.timed_calls):  # step 0 is the warm-up
        last = max(step_s) if step_s else warm_s
        if step >= 1 and time.perf_counter() + last > (deadline if step == 1 else min(share, deadline)):
            break
        _sync(plan.device)
        t0 = time.perf_counter()
        stats, _ = ppo_step(models, texts, ids, trainables, kl, cfg, step)
        _sync(plan.device)
        if step > 0:
            step_s.append(time.perf_counter() - t0)
            steps.append(stats)
        else:
            warm_s = time.perf_counter() - t0
    del models, policy, reference, trainables, opt
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    if not steps:
        return {"backend": backend, "status": "skipped: no time for a timed step", "warmup_s": warm_s}
    keys = ("time/generate", "time/evaluate", "time/update", "memory_gib/step", "rollout/tokens_per_second",
            "rollout/kv_cache_gib", "ratio_first_minibatch_max_dev")  # fmt: skip
    return {
        "backend": backend,
        "status": "ok",
        "preset": preset_name,
        "warmup_s": warm_s,
        "steps_timed": len(step_s),
        "step_s_median": statistics.median(step_s),
        **{k: statistics.median(s[k] for s in steps) for k in keys if k in steps[0]},
    }


def jobs_in_priority_order(plan: Plan) -> list[tuple]:
    """(kind, shape or preset, batch, backend): hf and static (the targets) at the first shape, their PPO
    steps, at the other shapes; then the other backends (paged) in the same order."""
    main = tuple(k for k in plan.backends if k in ("hf", "static"))
    jobs: list[tuple] = []
    for tier in (main, tuple(k for k in plan.backends if k not in main)):
        jobs += [("gen", plan.shapes[0], b, k) for b in plan.batches for k in tier]
        if plan.ppo_preset is not None:
            jobs += [("ppo", plan.ppo_preset, None, k) for k in tier if k in plan.ppo_backends]
        jobs += [("gen", sh, b, k) for sh in plan.shapes[1:] for b in plan.batches for k in tier]
    return jobs


def run(plan: Plan, budget_s: float, on_cell=None) -> dict[str, Any]:
    """Cells in priority order. Each cell gets an equal share of what is left of the budget for its extra
    timed calls; a cell that would start late is skipped. ``on_cell(result)`` after every cell."""
    start = time.perf_counter()
    deadline = start + budget_s
    jobs = jobs_in_priority_order(plan)
    result: dict[str, Any] = {"generation": [], "ppo_step": [], "wall_s": 0.0}
    model = tok = loaded = None
    for index, (kind, shape_name, batch, backend) in enumerate(jobs):
        now = time.perf_counter()
        share = now + (deadline - now) / (len(jobs) - index)
        where = {"shape": shape_name, "batch": batch} if kind == "gen" else {}
        sink = result["generation" if kind == "gen" else "ppo_step"]
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
        if plan.device == "cpu":  # paged: transformers' two gc.collect() a call dominate a tiny dry run
            gc.freeze()
        try:
            if kind == "gen":
                sink.append(where | generation_cell(model, tok, backend, batch, plan, share, deadline))
            else:
                sink.append(ppo_cell(shape_name, backend, plan, share, deadline))
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            sink.append(where | {"backend": backend, "status": f"out of memory: {e}"[:300]})
        result["wall_s"] = time.perf_counter() - start
        if on_cell is not None:
            on_cell(result)
    result["wall_s"] = time.perf_counter() - start
    return result


def vllm_note() -> dict[str, Any]:
    installed = importlib.util.find_spec("vllm") is not None
    why = "installed, not wired into this benchmark" if installed else "not installed"
    return {"installed": installed, "measured": False, "note": f"vLLM: {why} (its wheels pin another torch)"}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", required=True, help="directory for rollout-<device>-<date>.json/.md")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks every code path")
    p.add_argument("--time-budget-s", type=float, default=150.0, help="stop starting new cells after this")
    p.add_argument("--backends", default="hf,static,paged", help="comma-separated rollout backends")
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"rollout-{device_slug(dev)}-{dt.date.today().isoformat()}"
    header = report_header(SCHEMA, dev) | {
        "dry_run": args.dry_run,
        "time_budget_s": args.time_budget_s,
        "plan": {k: str(v) for k, v in dataclasses.asdict(plan).items()},
        "vllm": vllm_note(),
    }

    def write(result: dict[str, Any], final: bool) -> dict[str, Any]:
        report = header | {"complete": final, "result": result, "summary": summarize(result)}
        report["targets"] = targets(report["summary"], args.dry_run)
        for suffix, text in ((".json", json.dumps(report, indent=2, default=str) + "\n"),
                             (".md", markdown(report))):  # fmt: skip
            tmp = stem.with_name(stem.name + suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(stem.with_name(stem.name + suffix))  # a reader never sees half a file
        return report

    report = write(run(plan, args.time_budget_s, on_cell=lambda r: write(r, final=False)), final=True)
    print(markdown(report))
    return stem.with_name(stem.name + ".json")


if __name__ == "__main__":
    main()
