#!/usr/bin/env python
"""End-to-end PPO step benchmark: fastrlhf against TRL 1.12's ``trl.experimental.ppo.PPOTrainer``.

    python benchmarks/e2e_ppo.py --scale tiny            # CPU: tiny Llama, a few steps, a couple of minutes
    python benchmarks/e2e_ppo.py --scale 0.5b|1.5b|8b    # one GPU; models from configs, no downloads
    python benchmarks/e2e_ppo.py --scale tiny --systems fastrlhf --steps 2 --out /tmp/e2e

Both systems run the same PPO configuration, one after the other, each in its own subprocess (so peak RSS and
peak GPU memory are per system): the same randomly initialized models saved from configs (policy, frozen
reference, reward model, and a separate critic initialized from the reward model: fastrlhf's
``critic="reward_model"``, TRL's ``value_model``), the same prompts (all exactly ``prompt_len`` tokens, so no
padding), the same rollout batch, micro-batch, PPO epochs and minibatches, dtype, attention implementation,
optimizer (torch AdamW, no gradient clipping: TRL's PPO loop does not clip), gradient checkpointing, sampling
temperature, KL coefficient and estimator (k1), GAE and clipping constants.

Generation length is fixed on both sides (every response is exactly ``response_len`` tokens):
fastrlhf: ``min_new_tokens = max_new_tokens``. TRL 1.12 builds its own ``GenerationConfig`` inside ``train()``
from ``max_new_tokens=response_length, temperature, top_k=0, top_p=1, do_sample=True``; with transformers 5
``generate`` fills every field left unset in that config from the policy's ``generation_config``, so the
benchmark sets ``min_new_tokens = response_length`` and ``suppress_tokens = [pad]`` there (exactly the
arguments fastrlhf passes to ``generate``) and uses ``stop_token="eos"``: the EOS logit is masked until the
length limit, so no response stops early and none is truncated. Every rollout is checked (response length,
EOS and pad counts) and the check is recorded.

Per PPO step (the first step is warm-up and excluded; medians over the rest): wall time between step ends,
split into generate / score (old log-probs, reference, values, reward) / advantages / update / other, tokens
per second (B * (prompt_len + response_len) / step wall time), effective optimizer steps, and the peak memory
of the run (``torch.cuda.max_memory_allocated`` on GPU, peak RSS from ``getrusage`` on CPU). TRL's phases are
timed by wrapping the module-level functions its ``train()`` loop calls (``batch_generation``, ``forward``,
``get_reward``) plus trainer callbacks (``on_log``, ``on_step_end``); fastrlhf's come from its own per-phase
metrics. Results: ``benchmarks/results/e2e-ppo-<scale>-<device>-<date>.{json,md}``.

If TRL is not installed (or has no ``trl.experimental.ppo``), only fastrlhf runs and the JSON says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SCHEMA = "fastrlhf-e2e-ppo/1"
SYSTEMS = ("fastrlhf", "trl")
TRL_VERSION = "1.12.0"

# --------------------------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """The architecture of every model of a run (policy, reference, reward, critic share it)."""

    name: str
    arch: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    max_positions: int = 4096


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape("tiny-llama", "llama", 64, 2, 4, 4, 256, 512, False, 128),
    "0.5b": ModelShape("qwen2.5-0.5b", "qwen2", 896, 24, 14, 2, 4864, 151936, True),
    "1.5b": ModelShape("qwen2.5-1.5b", "qwen2", 1536, 28, 12, 2, 8960, 151936, True),
    "3b": ModelShape("qwen2.5-3b", "qwen2", 2048, 36, 16, 2, 11008, 151936, True),
    "8b": ModelShape("llama-3-8b", "llama", 4096, 32, 32, 8, 14336, 128256, False),
}

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer with exactly ``vocab_size`` entries: 4 specials, then "t0", "t1", ...

    Plain encodes get a leading BOS; the pad token differs from EOS (no token is added at load time).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *(f"t{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def model_config(shape: ModelShape, tokenizer: Any) -> Any:
    """A transformers config for ``shape`` with the tokenizer's special ids."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if shape.name == "tiny-llama":
        from fastrlhf.demo_task import tiny_llama_config

        return tiny_llama_config(
            tokenizer,
            hidden_size=shape.hidden,
            layers=shape.layers,
            heads=shape.heads,
            intermediate=shape.intermediate,
            max_positions=shape.max_positions,
        )
    common = {
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": shape.tie_embeddings,
        "attention_dropout": 0.0,
        **ids,
    }
    if shape.arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(rms_norm_eps=1e-6, rope_theta=1e6, **common)
    from transformers import LlamaConfig

    return LlamaConfig(rms_norm_eps=1e-5, rope_theta=5e5, **common)


def build_model_dirs(shape: ModelShape, root: Path, dtype: str, device: str) -> tuple[Path, Path]:
    """Random-weight policy (CausalLM) and reward model (SequenceClassification, 1 label) saved under root.

    The reference is the policy directory and the critic starts from the reward directory on both sides.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = build_tokenizer(shape.vocab)
    cfg = model_config(shape, tok)
    torch_dtype = getattr(torch, dtype)
    policy_dir, reward_dir = root / "policy", root / "reward"
    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    policy.generation_config.pad_token_id = tok.pad_token_id
    policy.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    del policy
    rm_cfg = model_config(shape, tok)
    rm_cfg.num_labels = 1
    with torch.device(device):
        reward = AutoModelForSequenceClassification.from_config(rm_cfg, dtype=torch_dtype)
    reward.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)
    del reward
    if device == "cuda":
        torch.cuda.empty_cache()
    return policy_dir, reward_dir


def make_prompts(n: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[str]:
    """``n`` prompts of exactly ``prompt_len`` tokens each (BOS + prompt_len - 1 random words)."""
    rng = random.Random(seed)
    top = min(vocab_size - len(SPECIAL_TOKENS), 1000)
    return [" ".join(f"t{rng.randrange(top)}" for _ in range(prompt_len - 1)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- run spec


@dataclass
class RunSpec:
    """Everything one system's worker needs; written as JSON for the subprocess."""

    system: str
    policy_dir: str
    reward_dir: str
    work_dir: str
    prompts: list[str]
    steps: int
    rollout_batch_size: int
    micro_batch_size: int
    rollout_forward_batch_size: int  # TRL's local_rollout_forward_batch_size (generation/scoring chunks)
    ppo_epochs: int
    num_minibatches: int
    prompt_len: int
    response_len: int
    dtype: str  # "float32" or "bfloat16"
    lora_rank: int = 0
    lora_alpha: int = 32
    load_in_4bit: bool = False
    optimizer: str = "adamw"  # fastrlhf name: adamw, adamw8bit, paged_adamw8bit
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    temperature: float = 1.0
    kl_coef: float = 0.05
    lr: float = 3e-6
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    memory_cap_gib: float | None = None
    fastrlhf_driver: str = "train_ppo"  # or "ppo_step" (own loop over fastrlhf's public pieces)


TRL_OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw8bit": "adamw_bnb_8bit",
    "paged_adamw8bit": "paged_adamw_8bit",
}


# ------------------------------------------------------------------------------------- worker utilities


def _rss_gib() -> float:
    """Current resident set size (Linux /proc), GiB; NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan


def _peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cuda_error_out_of_memory" in text


class OptimizerStepCounter:
    """Counts real optimizer steps per optimizer (a global torch hook, so it also sees TRL's optimizer under
    accelerate, whose wrapper skips ``step`` while it accumulates gradients)."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.counts: dict[int, int] = {}
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer: Any, *_: Any) -> None:
        self.counts[id(optimizer)] = self.counts.get(id(optimizer), 0) + 1

    def snapshot(self) -> dict[int, int]:
        return dict(self.counts)

    @staticmethod
    def per_optimizer(now: dict[int, int], before: dict[int, int]) -> int:
        """Steps each optimizer took between two snapshots (the most of any; they are equal in practice)."""
        return max((n - before.get(k, 0) for k, n in now.items()), default=0)


def _setup_worker(spec: RunSpec) -> dict[str, Any]:
    import torch

    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    info: dict[str, Any] = {"device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available() and spec.memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, spec.memory_cap_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        info["memory_fraction"] = fraction
    info["rss_baseline_gib"] = _rss_gib()
    return info


def _memory_report(device: str) -> dict[str, float]:
    import torch

    out = {"peak_rss_gib": _peak_rss_gib()}
    if device == "cuda":
        out["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


# -------------------------------------------------------------------------------------- fastrlhf worker


def fastrlhf_config(spec: RunSpec) -> Any:
    from fastrlhf.config import ModelConfig, OptimConfig, PPOConfig

    optim = OptimConfig(lr=spec.lr, warmup_steps=0, max_grad_norm=0.0)
    return PPOConfig(
        policy=spec.policy_dir,
        reward_model=spec.reward_dir,
        critic="reward_model",
        out=str(Path(spec.work_dir) / "fastrlhf-out"),
        steps=spec.steps,
        rollout_batch_size=spec.rollout_batch_size,
        ppo_epochs=spec.ppo_epochs,
        num_minibatches=spec.num_minibatches,
        micro_batch_size=spec.micro_batch_size,
        max_prompt_len=spec.prompt_len,
        max_new_tokens=spec.response_len,
        min_new_tokens=spec.response_len,
        temperature=spec.temperature,
        top_p=1.0,
        missing_eos_penalty=None,
        kl_coef=spec.kl_coef,
        kl_estimator="k1",
        policy_optim=optim,
        critic_optim=dataclasses.replace(optim),
        model_config=ModelConfig(
            dtype=spec.dtype,
            attn_implementation=spec.attn_implementation,
            gradient_checkpointing=spec.gradient_checkpointing,
            lora_rank=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            load_in_4bit=spec.load_in_4bit,
            optimizer=spec.optimizer,
        ),
        seed=spec.seed,
    )


def _fastrlhf_step_record(stats: dict[str, float], wall: float | None) -> dict[str, Any]:
    keys = ("generate", "score", "evaluate", "advantages", "update", "step")
    rec: dict[str, Any] = {f"{k}_s": stats.get(f"time/{k}") for k in keys}
    rec["score_s"] = (stats.get("time/score") or 0.0) + (stats.get("time/evaluate") or 0.0)
    rec["reward_model_s"] = stats.get("time/score")
    rec["phases_s"] = stats.get("time/step")
    rec["wall_s"] = wall
    rec["response_length"] = stats.get("response_length")
    rec["eos_rate"] = stats.get("eos_rate")
    rec["phase_memory_gib"] = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("memory_gib/")}
    return rec


def run_fastrlhf(spec: RunSpec, info: dict[str, Any]) -> dict[str, Any]:
    from fastrlhf.metrics import MetricsLogger
    from fastrlhf.ppo_trainer import train_ppo

    info["rss_after_imports_gib"] = _rss_gib()

    cfg = fastrlhf_config(spec)
    counter = OptimizerStepCounter()
    records: list[dict[str, Any]] = []
    clock: dict[str, Any] = {"last": time.perf_counter(), "opt": {}}

    def on_step(stats: dict[str, float]) -> None:
        now, counts = time.perf_counter(), counter.snapshot()
        rec = _fastrlhf_step_record(stats, now - clock["last"])
        rec["optimizer_steps"] = counter.per_optimizer(counts, clock["opt"])
        rec["optimizers"] = len(counts)
        clock["last"], clock["opt"] = now, counts
        records.append(rec)

    class ClockedLogger(MetricsLogger):
        def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:  # type: ignore[override]
            super().log(phase, step, metrics)
            if phase == "ppo":
                on_step(dict(metrics))

    t0 = time.perf_counter()
    if spec.fastrlhf_driver == "train_ppo":
        with ClockedLogger(cfg.out, tensorboard=False) as logger:
            clock["last"] = time.perf_counter()  # train_ppo builds its models before the first step
            # the first step's wall time then includes model loading; it is the warm-up step and excluded
            train_ppo(cfg, prompts=list(spec.prompts), logger=logger)
    else:
        _fastrlhf_manual_loop(cfg, spec, on_step, clock)
    info["total_s"] = time.perf_counter() - t0
    info["driver"] = spec.fastrlhf_driver
    return {"steps": records}


def build_fastrlhf_models_4bit(cfg: Any, device: Any) -> Any:
    """fastrlhf's PPO models with a 4-bit base, avoiding ``build_models``'s frozen-model config.

    ``fastrlhf.ppo_trainer.build_models`` loads the frozen reward model with ``lora_rank=0`` but keeps
    ``load_in_4bit=True``, which ``fastrlhf.models._load_kwargs`` rejects ("load_in_4bit trains LoRA adapters
    only"), so a 4-bit run with a reward-model directory cannot start. Here the frozen reward model keeps the
    config's ``lora_rank`` (it is frozen with ``trainable=False`` before any adapter is added), so it loads
    in 4 bits as intended; everything else is fastrlhf's own loaders.
    """
    from fastrlhf.models import load_causal_lm, load_scalar_model, load_tokenizer
    from fastrlhf.ppo import PPOModels

    mc = cfg.model_config
    frozen = dataclasses.replace(mc, gradient_checkpointing=False)
    tok = load_tokenizer(cfg.policy, mc)
    policy = load_causal_lm(cfg.policy, mc, device, tok)
    reward = load_scalar_model(cfg.reward_model, frozen, device, tok, trainable=False)
    critic = load_scalar_model(cfg.reward_model, mc, device, tok)
    return PPOModels(policy, tok, reward, None, critic, None)


def _fastrlhf_manual_loop(
    cfg: Any, spec: RunSpec, on_step: Callable[[dict[str, float]], None], clock: dict[str, Any]
) -> None:
    """The loop of ``train_ppo`` (without checkpoints and saving) over fastrlhf's public pieces."""
    from fastrlhf.data import encode_prompt
    from fastrlhf.models import default_device
    from fastrlhf.ppo import KLController, ppo_step
    from fastrlhf.ppo_trainer import build_models, build_trainables
    from fastrlhf.training import seed_everything, shuffled_batches

    seed_everything(cfg.seed)
    device = default_device()
    if cfg.model_config.load_in_4bit:
        models = build_fastrlhf_models_4bit(cfg, device)
    else:
        models = build_models(cfg, None, device)
    opt = build_trainables(models, cfg, device)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    data = [(p, encode_prompt(models.tokenizer, p)) for p in spec.prompts]
    clock["last"] = time.perf_counter()
    for step in range(cfg.steps):
        batch = shuffled_batches(data, cfg.rollout_batch_size, seed=cfg.seed, epoch=step)[0]
        stats, _ = ppo_step(models, [p for p, _ in batch], [ids for _, ids in batch], opt, kl, cfg, step)
        on_step(stats)


# ------------------------------------------------------------------------------------------- TRL worker


class PhaseClock:
    """Timestamps of TRL's train-loop events; the CUDA stream is synchronized before each one."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.events: list[tuple[str, float]] = []
        self.training = False  # inside the update of the current step (after its first grad-enabled forward)
        self.housekeeping: list[tuple[str, float, float]] = []  # (gc | empty_cache, end time, seconds)

    def mark(self, name: str) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.events.append((name, time.perf_counter()))


def trl_phases(
    events: Sequence[tuple[str, float]], housekeeping: Sequence[tuple[str, float, float]] = ()
) -> list[dict[str, float]]:
    """Per-step phase times from the event list (see ``instrument_trl``).

    ``gc_s`` / ``empty_cache_s``: time in TRL's ``gc.collect()`` / ``empty_cache()`` calls inside the step
    window (already part of the phases).
    """
    steps: list[dict[str, float]] = []
    start: float | None = None
    seg: list[tuple[str, float]] = []
    for name, t in events:
        if name == "train_begin":
            start, seg = t, []
            continue
        seg.append((name, t))
        if name != "step_end" or start is None:
            continue
        gen = 0.0
        gen_start: float | None = None
        gen_end = train_start = log_t = None
        score_end = None
        for n, tt in seg:
            if n == "gen_start":
                gen_start = tt
            elif n == "gen_end" and gen_start is not None:
                gen += tt - gen_start
                gen_end = tt
            elif n == "score_call_end" and train_start is None:
                score_end = tt
            elif n == "train_start" and train_start is None:
                train_start = tt
            elif n == "log":
                log_t = tt
        wall = t - start
        rec = {"wall_s": wall, "generate_s": gen}
        for kind in ("gc", "empty_cache"):
            rec[f"{kind}_s"] = sum(d for k, te, d in housekeeping if k == kind and start < te <= t)
        if gen_end is not None and score_end is not None and train_start is not None and log_t is not None:
            rec["score_s"] = score_end - gen_end
            rec["advantages_s"] = train_start - score_end
            rec["update_s"] = log_t - train_start
            rec["other_s"] = wall - gen - rec["score_s"] - rec["advantages_s"] - rec["update_s"]
        steps.append(rec)
        start, seg = t, []
    return steps


def instrument_trl(
    clock: PhaseClock, response_checks: list[dict[str, int]], pad_id: int, eos_id: int
) -> None:
    """Wrap the module-level functions TRL's ``PPOTrainer.train`` calls by name, to time its phases.

    ``batch_generation`` is the rollout; ``forward`` (reference log-probs without grad, policy + value in the
    update with grad) and ``get_reward`` (values and reward without grad) mark the scoring and the update.
    Nothing TRL computes is changed.
    """
    import torch
    import trl.experimental.ppo.ppo_trainer as M

    batch_generation, forward, get_reward = M.batch_generation, M.forward, M.get_reward

    def timed_batch_generation(model: Any, queries: Any, *args: Any, **kwargs: Any) -> Any:
        clock.training = False
        clock.mark("gen_start")
        query_responses, logits = batch_generation(model, queries, *args, **kwargs)
        clock.mark("gen_end")
        response = query_responses[:, queries.shape[1] :]
        response_checks.append(
            {
                "response_len": int(response.shape[1]),
                "eos_tokens": int((response == eos_id).sum()),
                "pad_tokens": int((response == pad_id).sum()),
            }
        )
        return query_responses, logits

    def timed_forward(model: Any, query_responses: Any, pad_token_id: int) -> Any:
        if torch.is_grad_enabled():
            if not clock.training:
                clock.training = True
                clock.mark("train_start")
            return forward(model, query_responses, pad_token_id)
        out = forward(model, query_responses, pad_token_id)
        clock.mark("score_call_end")
        return out

    def timed_get_reward(*args: Any, **kwargs: Any) -> Any:
        out = get_reward(*args, **kwargs)
        clock.mark("score_call_end")
        return out

    M.batch_generation, M.forward, M.get_reward = timed_batch_generation, timed_forward, timed_get_reward

    # gc.collect() and empty_cache() run several times per step; time them to report TRL's housekeeping.
    collect, empty_cache = M.gc.collect, M.empty_cache

    def timed_collect(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = collect(*args, **kwargs)
        t1 = time.perf_counter()
        clock.housekeeping.append(("gc", t1, t1 - t0))
        return out

    def timed_empty_cache() -> None:
        t0 = time.perf_counter()
        empty_cache()
        t1 = time.perf_counter()
        clock.housekeeping.append(("empty_cache", t1, t1 - t0))

    M.gc = types.SimpleNamespace(collect=timed_collect)
    M.empty_cache = timed_empty_cache


def _trl_lora_value_model(model: Any, spec: RunSpec) -> Any:
    """LoRA adapters injected in place into the value model (it stays a SequenceClassification model, as
    TRL's ``PolicyAndValueWrapper`` and ``get_reward`` expect), plus a trainable score head: fastrlhf's
    LoRA critic."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in model.named_modules()
            if type(mod).__name__ == "Linear" and not name.endswith("score")
        }
    )
    lora = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules=targets)
    model = inject_adapter_in_model(lora, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("score."))
    return model


def run_trl(spec: RunSpec, info: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    info["rss_after_imports_gib"] = _rss_gib()

    cuda = info["device"] == "cuda"
    dtype = getattr(torch, spec.dtype)
    tok = AutoTokenizer.from_pretrained(spec.policy_dir)
    tok.padding_side = "left"
    load: dict[str, Any] = {"dtype": dtype, "attn_implementation": spec.attn_implementation}
    if cuda:
        load["device_map"] = {"": 0}  # straight to the GPU; PPOTrainer's .to(device) is then a no-op
    policy = AutoModelForCausalLM.from_pretrained(spec.policy_dir, **load)
    ref = None if spec.lora_rank else AutoModelForCausalLM.from_pretrained(spec.policy_dir, **load)
    value = AutoModelForSequenceClassification.from_pretrained(spec.reward_dir, num_labels=1, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(spec.reward_dir, num_labels=1, **load)
    reward.requires_grad_(False)
    if ref is not None:
        ref.requires_grad_(False)
    if spec.gradient_checkpointing:  # PPOTrainer.train() never turns it on itself
        for m in (policy, value):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.config.use_cache = False
    peft_config = None
    if spec.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        value = _trl_lora_value_model(value, spec)
    # Fixed response length: TRL's GenerationConfig leaves these unset, so generate() takes them from here.
    policy.generation_config.min_new_tokens = spec.response_len
    policy.generation_config.suppress_tokens = [tok.pad_token_id]
    policy.generation_config.pad_token_id = tok.pad_token_id
    ids = [tok(p)["input_ids"] for p in spec.prompts]
    if {len(x) for x in ids} != {spec.prompt_len}:
        raise ValueError(f"prompts must all be {spec.prompt_len} tokens, got {sorted({len(x) for x in ids})}")
    dataset = Dataset.from_dict({"input_ids": ids})
    bf16 = spec.dtype == "bfloat16"
    args = PPOConfig(
        output_dir=str(Path(spec.work_dir) / "trl-out"),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=spec.seed,
        bf16=bf16,
        fp16=False,
        use_cpu=not cuda,
        optim=TRL_OPTIMIZERS[spec.optimizer],
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        gradient_checkpointing=spec.gradient_checkpointing,
        per_device_train_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.rollout_batch_size // spec.micro_batch_size,
        num_mini_batches=spec.num_minibatches,
        num_ppo_epochs=spec.ppo_epochs,
        total_episodes=spec.steps * spec.rollout_batch_size,
        local_rollout_forward_batch_size=spec.rollout_forward_batch_size,
        response_length=spec.response_len,
        stop_token="eos",
        temperature=spec.temperature,
        missing_eos_penalty=None,
        kl_coef=spec.kl_coef,
        kl_estimator="k1",
        num_sample_generations=0,
        dataloader_num_workers=0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        peft_config=peft_config,
    )
    clock = PhaseClock(cuda)
    checks: list[dict[str, int]] = []
    instrument_trl(clock, checks, tok.pad_token_id, tok.eos_token_id)
    counter = OptimizerStepCounter()
    opt_marks: list[dict[int, int]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            clock.mark("train_begin")

        def on_log(self, *a: Any, **k: Any) -> None:
            clock.mark("log")

        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.mark("step_end")
            opt_marks.append(counter.snapshot())

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    trainer.train()
    info["total_s"] = time.perf_counter() - t0
    info["gradient_checkpointing_active"] = bool(
        getattr(trainer.model.policy, "is_gradient_checkpointing", False)
    )
    info["trl_batch_sizes"] = {
        k: getattr(args, k)
        for k in ("batch_size", "mini_batch_size", "local_mini_batch_size", "per_device_train_batch_size")
    }
    steps = trl_phases(clock.events, clock.housekeeping)
    prev: dict[int, int] = {}
    for rec, mark, check in zip(steps, opt_marks, checks, strict=False):
        rec["optimizer_steps"] = counter.per_optimizer(mark, prev)
        rec["optimizers"] = len(mark)
        rec.update(check)
        prev = mark
    return {"steps": steps}


# ------------------------------------------------------------------------------------------------ worker


def worker_main(spec_path: str, out_path: str) -> int:
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    result: dict[str, Any] = {"system": spec.system, "status": "ok"}
    info: dict[str, Any] = {}
    try:
        info = _setup_worker(spec)
        run = run_fastrlhf if spec.system == "fastrlhf" else run_trl
        result.update(run(spec, info))
    except BaseException as e:  # OOM and any failure become a record; the parent decides what it means
        result["status"] = "oom" if _is_oom(e) else "error"
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
    result.update(info)
    try:
        result["memory"] = _memory_report(info.get("device", "cpu"))
    except Exception as e:
        result["memory"] = {"error": str(e)}
    # fastrlhf's PhaseMemory calls torch.cuda.reset_peak_memory_stats() at every phase, so the process-wide
    # peak read at the end covers only its last phase: take the max with the per-phase peaks it logged.
    phase_peaks = [
        v for rec in result.get("steps") or [] for v in (rec.get("phase_memory_gib") or {}).values()
    ]
    mem = result["memory"]
    if phase_peaks and "peak_gpu_allocated_gib" in mem:
        mem["peak_gpu_allocated_end_of_run_gib"] = mem["peak_gpu_allocated_gib"]
        mem["peak_gpu_allocated_gib"] = max(mem["peak_gpu_allocated_gib"], *phase_peaks)
        mem["peak_gpu_reserved_note"] = "reset by fastrlhf at each phase: last phase only"
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))
    return 0


def run_worker(spec: RunSpec, timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one system in a fresh Python process; returns its result record (status ok / oom / error)."""
    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / f"spec-{spec.system}.json", work / f"result-{spec.system}.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(out_path)]
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    full_env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if spec.threads > 0:
        full_env["OMP_NUM_THREADS"] = str(spec.threads)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout_s, cwd=HERE)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:] if isinstance(e.stderr, bytes) else (e.stderr or "")[-2000:]
        return {
            "system": spec.system,
            "status": "timeout",
            "error": f"over {timeout_s:.0f} s",
            "stderr": str(tail),
        }
    wall = time.perf_counter() - t0
    if not out_path.exists():
        return {
            "system": spec.system,
            "status": "crashed",
            "error": f"worker exited {proc.returncode} without a result",
            "stderr": proc.stderr[-4000:],
            "process_s": wall,
        }
    result = json.loads(out_path.read_text())
    result["process_s"] = wall
    if result.get("status") != "ok":
        result["stderr"] = proc.stderr[-4000:]
    return result


# ------------------------------------------------------------------------------------------ aggregation

PHASES = ("generate_s", "score_s", "advantages_s", "update_s", "other_s")


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


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
    """Medians over the measured steps (all but the first of each run) of one system's result."""
    steps = result.get("steps") or []
    if any("warmup" in rec for rec in steps):
        measured = [rec for rec in steps if not rec.get("warmup")]
    else:
        measured = steps[1:] if len(steps) > 1 else steps
    for rec in steps:
        if "other_s" not in rec and rec.get("wall_s") is not None and rec.get("phases_s") is not None:
            rec["other_s"] = rec["wall_s"] - rec["phases_s"]
    keys = sorted({k for rec in measured for k, v in rec.items() if isinstance(v, int | float)})
    med = {k: _median([rec.get(k) for rec in measured]) for k in keys}
    tokens = spec.rollout_batch_size * (spec.prompt_len + spec.response_len)
    wall = med.get("wall_s")
    summary = {
        "measured_steps": len(measured),
        "warmup_steps_excluded": len(steps) - len(measured),
        "median": med,
        "tokens_per_step": tokens,
        "tokens_per_second": tokens / wall if wall else None,
        "response_tokens_per_second": spec.rollout_batch_size * spec.response_len / wall if wall else None,
    }
    mem = result.get("memory") or {}
    summary["peak_memory_gib"] = mem.get("peak_gpu_allocated_gib", mem.get("peak_rss_gib"))
    summary["peak_memory_kind"] = (
        "gpu_max_memory_allocated" if "peak_gpu_allocated_gib" in mem else "peak_rss"
    )
    if result.get("peak_rss_above_imports_gib") is not None:
        # what the run itself added: models, optimizer states, activations (not the imported libraries)
        summary["peak_rss_above_imports_gib"] = result["peak_rss_above_imports_gib"]
    elif "peak_rss_gib" in mem and result.get("rss_after_imports_gib") is not None:
        summary["peak_rss_above_imports_gib"] = mem["peak_rss_gib"] - result["rss_after_imports_gib"]
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in (
        "torch",
        "transformers",
        "trl",
        "fastrlhf",
        "peft",
        "accelerate",
        "datasets",
        "bitsandbytes",
    ):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def trl_available() -> tuple[bool, str]:
    """Whether TRL's experimental PPOTrainer can be imported, without importing TRL here."""
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        return False, "trl is not installed (pip install trl==1.12.0)"
    if not (Path(spec.origin).parent / "experimental" / "ppo" / "ppo_trainer.py").exists():
        version = importlib.metadata.version("trl")
        return False, f"trl {version} has no trl.experimental.ppo (PPOTrainer); use trl=={TRL_VERSION}"
    return True, ""


def device_info() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": props.name,
            "total_memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda,
        }
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "type": "cpu",
        "name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads_per_worker": None,
    }


def device_slug(dev: dict[str, Any]) -> str:
    if dev["type"] == "cpu":
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in dev["name"].lower()).strip("-").replace("--", "-")


# ------------------------------------------------------------------------------------------------ presets


@dataclass
class Preset:
    shape: str
    steps: int
    rollout_batch_size: int
    micro_batch_size: int
    ppo_epochs: int
    num_minibatches: int
    prompt_len: int
    response_len: int
    dtype: str
    gradient_checkpointing: bool
    lora_rank: int = 0
    fastrlhf_driver: str = "train_ppo"
    notes: list[str] = field(default_factory=list)


_TRL_MICRO_NOTE = (
    "micro_batch_size = minibatch size (rollout_batch_size / num_minibatches) and the prompt set is exactly "
    "one rollout batch: TRL 1.12 wraps each micro-batch in accelerator.accumulate with "
    "gradient_accumulation_steps = rollout_batch_size / micro_batch_size, so its optimizer steps once per "
    "PPO epoch on batches that are not the dataloader's last and after every micro-batch on the last one "
    "(accelerate syncs at end_of_dataloader). Only with one micro-batch per minibatch and a one-batch "
    "dataset does it take ppo_epochs x num_minibatches optimizer steps per PPO step like fastrlhf (measured: "
    "systems.*.steps[].optimizer_steps)."
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 8, 8, 4, 2, 2, 16, 12, "float32", False),
    "0.5b": Preset("0.5b", 5, 64, 16, 2, 4, 128, 128, "bfloat16", True),
    "1.5b": Preset("1.5b", 5, 64, 16, 2, 4, 128, 128, "bfloat16", True),
    "8b": Preset(
        "8b",
        4,
        16,
        8,
        1,
        2,
        128,
        128,
        "bfloat16",
        True,
        lora_rank=16,
        fastrlhf_driver="ppo_step",
        notes=[
            "8b: fastrlhf runs its ppo_step loop (build_models, build_trainables, ppo_step) instead of "
            "train_ppo, whose final save of the merged policy and critic (~31 GB) would not fit the disk.",
            "8b: full fine-tuning of policy and critic with AdamW does not fit one 80 GB GPU for either "
            "system, so both train LoRA adapters (rank 16, alpha 32, all linear layers) on policy and "
            "critic; the reference is the adapter-disabled policy on both sides (TRL: peft_config and "
            "ref_model=None; its value model gets LoRA injected in place plus a trainable score head).",
        ],
    ),
}


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
    ]

    def f(v: Any, nd: int = 3) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    for name, sysrep in report["systems"].items():
        s = sysrep.get("summary") or {}
        med = s.get("median") or {}
        mem = s.get("peak_memory_gib")
        kind = " (RSS)" if s.get("peak_memory_kind") == "peak_rss" else ""
        hk = None
        if "gc_s" in med or "empty_cache_s" in med:
            hk = (med.get("gc_s") or 0.0) + (med.get("empty_cache_s") or 0.0)
        status = sysrep["status"] if sysrep["status"] != "skipped" else f"skipped: {sysrep.get('reason')}"
        lines.append(
            f"| {name} | {status} | {f(med.get('wall_s'))} | "
            + " | ".join(f(med.get(p)) for p in PHASES)
            + f" | {f(hk)} | {f(s.get('tokens_per_second'), 0)} | {f(mem, 2)}{kind} | "
            f"{f(med.get('optimizer_steps'), 0)} |"
        )
    r = report.get("ratios") or {}
    if r:
        lines += [
            "",
            f"TRL / fastrlhf: step time x{f(r.get('step_time_trl_over_fastrlhf'), 2)} (generate "
            f"x{f(r.get('generate_trl_over_fastrlhf'), 2)}, score x{f(r.get('score_trl_over_fastrlhf'), 2)}, "
            f"update x{f(r.get('update_trl_over_fastrlhf'), 2)}), peak memory "
            f"x{f(r.get('peak_memory_trl_over_fastrlhf'), 2)}"
            + (
                f" (RSS added after imports: x{f(r['peak_rss_above_imports_trl_over_fastrlhf'], 2)})"
                if r.get("peak_rss_above_imports_trl_over_fastrlhf") is not None
                else ""
            )
            + f"; fastrlhf tokens/s = x{f(r.get('tokens_per_second_fastrlhf_over_trl'), 2)} TRL's."
            + (
                " Without its gc.collect()/empty_cache() time TRL's step would be "
                f"x{f(r['step_time_trl_without_gc_and_empty_cache_over_fastrlhf'], 2)} fastrlhf's."
                if r.get("step_time_trl_without_gc_and_empty_cache_over_fastrlhf") is not None
                else ""
            ),
        ]
    lines += ["", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    preset = PRESETS[args.scale]
    shape = SHAPES[preset.shape]
    dev = device_info()
    if dev["type"] == "cpu" and args.scale != "tiny":
        print(f"warning: --scale {args.scale} on a CPU will be very slow", file=sys.stderr)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise SystemExit(f"unknown systems {bad}; choose from {SYSTEMS}")
    batch = args.batch or preset.rollout_batch_size
    repeats = args.repeats or (3 if args.scale == "tiny" else 1)
    threads = args.threads if args.threads is not None else (1 if dev["type"] == "cpu" else 0)
    dev["torch_threads_per_worker"] = threads or torch.get_num_threads()
    cfg: dict[str, Any] = {
        "scale": args.scale,
        "shape": dataclasses.asdict(shape),
        "steps": args.steps or preset.steps,
        "repeats": repeats,
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
    notes = [
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
        _TRL_MICRO_NOTE,
        *preset.notes,
    ]
    if dev["type"] == "cpu":
        notes.append(
            f"CPU timings from a shared {os.cpu_count()}-core machine "
            f"({dev['torch_threads_per_worker']} torch thread(s) per worker) are noisy; peak memory is the "
            "worker's peak RSS (getrusage), which includes the Python libraries each system imports (TRL "
            "also imports datasets, pandas, pyarrow); 'RSS added after imports' subtracts the RSS measured "
            "right after those imports, leaving models, optimizer states and activations."
        )
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": dev,
        "versions": versions(),
        "config": cfg,
        "notes": notes,
        "systems": {},
    }
    ok_trl, why = trl_available()
    if "trl" in systems and ok_trl and report["versions"].get("trl") != TRL_VERSION:
        notes.append(f"TRL version is {report['versions'].get('trl')}, not {TRL_VERSION}.")
    with tempfile.TemporaryDirectory(prefix="e2e-ppo-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_device = "cuda" if dev["type"] == "cuda" else "cpu"
        policy_dir, reward_dir = build_model_dirs(shape, root / "models", cfg["dtype"], build_device)
        report["model_build_s"] = time.perf_counter() - t0
        prompts = make_prompts(batch, cfg["prompt_len"], shape.vocab, seed=0)
        runs: dict[str, list[dict[str, Any]]] = {}
        specs: dict[str, RunSpec] = {}
        for rep, system in ((r, s) for r in range(repeats) for s in systems):  # interleaved: A B A B ...
            if system == "trl" and not ok_trl:
                continue
            if runs.get(system) and runs[system][-1].get("status") != "ok":
                continue  # a failed system is not repeated
            spec = RunSpec(
                system=system,
                policy_dir=str(policy_dir),
                reward_dir=str(reward_dir),
                work_dir=str(root / f"{system}-{rep}"),
                prompts=prompts,
                steps=cfg["steps"],
                rollout_batch_size=batch,
                micro_batch_size=cfg["micro_batch_size"],
                rollout_forward_batch_size=cfg["rollout_forward_batch_size"],
                ppo_epochs=cfg["ppo_epochs"],
                num_minibatches=cfg["num_minibatches"],
                prompt_len=cfg["prompt_len"],
                response_len=cfg["response_len"],
                dtype=cfg["dtype"],
                lora_rank=cfg["lora_rank"],
                gradient_checkpointing=cfg["gradient_checkpointing"],
                threads=threads,
                fastrlhf_driver=cfg["fastrlhf_driver"],
            )
            print(f"[e2e_ppo] running {system} (run {rep + 1} of {repeats}) ...", file=sys.stderr, flush=True)
            runs.setdefault(system, []).append(run_worker(spec, args.timeout_s))
            specs[system] = spec
        for system in systems:
            if system not in runs:
                report["systems"][system] = {"status": "skipped", "reason": why}
                continue
            result = combine_runs(runs[system])
            if result.get("status") == "ok":
                result["summary"] = summarize(result, specs[system])
            report["systems"][system] = result
    fa, tr = report["systems"].get("fastrlhf", {}), report["systems"].get("trl", {})
    fs, ts = fa.get("summary") or {}, tr.get("summary") or {}
    if fs and ts:
        report["ratios"] = {
            "step_time_trl_over_fastrlhf": _ratio(ts["median"].get("wall_s"), fs["median"].get("wall_s")),
            "tokens_per_second_fastrlhf_over_trl": _ratio(
                fs.get("tokens_per_second"), ts.get("tokens_per_second")
            ),
            "peak_memory_trl_over_fastrlhf": _ratio(ts.get("peak_memory_gib"), fs.get("peak_memory_gib")),
            **{
                f"{p[:-2]}_trl_over_fastrlhf": _ratio(ts["median"].get(p), fs["median"].get(p))
                for p in ("generate_s", "score_s", "update_s")
            },
        }
        if "peak_rss_above_imports_gib" in fs and "peak_rss_above_imports_gib" in ts:
            report["ratios"]["peak_rss_above_imports_trl_over_fastrlhf"] = _ratio(
                ts["peak_rss_above_imports_gib"], fs["peak_rss_above_imports_gib"]
            )
        hk = (ts["median"].get("gc_s") or 0.0) + (ts["median"].get("empty_cache_s") or 0.0)
        if ts["median"].get("wall_s") and hk:
            report["ratios"]["step_time_trl_without_gc_and_empty_cache_over_fastrlhf"] = _ratio(
                ts["median"]["wall_s"] - hk, fs["median"].get("wall_s")
            )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-ppo-{args.scale}-{device_slug(dev)}-{report['date'][:10]}{args.tag}"
    report["files"] = {"json": f"{stem}.json", "markdown": f"{stem}.md"}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    main()
