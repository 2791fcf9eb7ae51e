"""Configuration: one small dataclass per concern, each field documented where it is declared.

Every field is read by the code; a field that did nothing would not be here. ``load_config`` builds a stage's
config from a YAML file plus ``--dotted.name value`` overrides (see ``fastrlhf.cli``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import inspect
import itertools
import math
import re
import textwrap
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


@dataclass
class ModelConfig:
    """How models are loaded and what makes them memory-lean."""

    dtype: str = "auto"
    """Weight dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
    Full fine-tuning in bfloat16 keeps no fp32 master copy (to fit one GPU); the 8-bit optimizers round the
    updated weights stochastically, so small updates survive in expectation. LoRA adapters stay float32."""
    attn_implementation: str = "auto"
    """"auto": what the model's class supports, in this order: flash-attn's "flash_attention_2" (CUDA, bf16
    or fp16, flash-attn installed), "sdpa" (PyTorch picks its flash backend where it applies), "eager". The
    choice is logged. Any transformers value is passed through."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass. None: on for CUDA, off on CPU (tiny models)."""
    lora_rank: int = 0
    """0 trains every weight. > 0 trains LoRA adapters of this rank on all linear layers (peft); the PPO
    reference is then the policy with adapters disabled, so no second copy of the model exists."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / rank)."""
    load_in_4bit: bool = False
    """QLoRA-style NF4 base weights (bitsandbytes, CUDA only). Needs lora_rank > 0."""
    optimizer: str = "auto"
    """"auto" (paged 8-bit AdamW from bitsandbytes on CUDA, torch AdamW on CPU), "adamw", "adamw8bit",
    "paged_adamw8bit". The 8-bit ones write bf16 weights with stochastic rounding."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run. Off unless you ask for it."""
    verify_fast_path: bool = True
    """At load, compare fastrlhf's log-probs (fused output layer) and scores with the model's own forward on a
    few tokens, with left and right padding (well under a second). A mismatch in the output layer switches the
    model to its own output layer in token chunks, with a log line; one the trunk, padding or causality would
    make is an error. false skips the check."""

    def validate(
        self, prefix: str = "", *, provided: Collection[str] = (), trainable: bool = True
    ) -> ModelConfig:
        """Raise :class:`ConfigError` for a value that cannot work (see :class:`OptionChecker`)."""
        c = OptionChecker(self, prefix, provided)
        c.choice("dtype", DTYPES)
        c.attention("attn_implementation")
        c.integer("lora_rank", 0)
        c.integer("lora_alpha", 1)
        c.choice("optimizer", OPTIMIZERS)
        if self.lora_rank > 0:
            c.package("lora_rank", "peft")
        if self.optimizer in ("adamw8bit", "paged_adamw8bit"):
            c.package("optimizer", "bitsandbytes")
        if self.load_in_4bit:
            if trainable and self.lora_rank == 0:
                c.fail("lora_rank", f"> 0 with {prefix}load_in_4bit (a 4-bit base trains LoRA adapters only)")
            c.package("load_in_4bit", "bitsandbytes")
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"{prefix}load_in_4bit: true needs a CUDA device, and none is visible")
        return self


@dataclass
class OptimConfig:
    """Optimizer settings for one trained model."""

    lr: float = 1e-5
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps (softens Adam's aggressive first steps)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    adam_eps: float = 1e-8
    """Adam epsilon."""

    def validate(self, prefix: str = "", *, provided: Collection[str] = ()) -> OptimConfig:
        """Raise :class:`ConfigError` for a value that cannot work (see :class:`OptionChecker`)."""
        c = OptionChecker(self, prefix, provided)
        c.number("lr", 0)
        c.integer("warmup_steps", 0)
        c.number("weight_decay", 0)
        c.number("max_grad_norm", 0)
        c.number("adam_eps", 0, lo_open=True)
        return self


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning on prompt/completion demonstrations (loss on completion tokens)."""

    model: str = ""
    """Base model: a local directory or a hub id."""
    data: str = ""
    """Demonstrations: JSONL with prompt/completion (or a datasets name)."""
    out: str = "runs/sft"
    """Output directory: the fine-tuned model (save_pretrained), metrics.jsonl, curves.png, checkpoints."""
    epochs: int = 1
    """Passes over the data."""
    batch_size: int = 8
    """Examples per optimizer step (split into micro-batches of micro_batch_size)."""
    micro_batch_size: int = 8
    """Examples per forward/backward; batch_size must be a multiple of it."""
    max_len: int = 1024
    """Longest prompt + completion in tokens; longer examples are reported and skipped."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5))
    model_config: ModelConfig = field(default_factory=ModelConfig)
    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: only at the end)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the `wandb` package and a login). TensorBoard is used whenever
    the `tensorboard` package is installed; metrics.jsonl and curves.png are always written."""
    seed: int = 0
    """Seed of the data order (a resumed run sees the same batches)."""

    def validate(self, prefix: str = "", *, provided: Collection[str] = ()) -> SFTConfig:
        """Raise :class:`ConfigError` for a value that cannot work. ``provided``: inputs given another way
        (in memory, or filled in by the pipeline), so not required here."""
        c = OptionChecker(self, prefix, provided)
        c.integer("epochs", 1)
        c.integer("batch_size", 1)
        c.integer("micro_batch_size", 1)
        c.integer("max_len", 2)
        c.integer("save_every", 0)
        c.seed()
        c.multiple_of("batch_size", "micro_batch_size")
        self.optim.validate(f"{prefix}optim.")
        self.model_config.validate(f"{prefix}model_config.")
        c.package("wandb", "wandb")
        c.model_path("model")
        c.data_path("data", "prompt/completion JSONL or a datasets name")
        c.out_dir("out")
        return self


@dataclass
class RMConfig:
    """Stage 2: reward model from pairwise or K-way rankings (InstructGPT loss)."""

    model: str = ""
    """Initial weights: usually the SFT model, or a previous reward model when iterating."""
    data: str = ""
    """Rankings: JSONL with prompt/chosen/rejected pairs or prompt/responses/ranking (best first)."""
    demonstrations: str = ""
    """Optional prompt/completion JSONL whose completions should score 0 on average after training. Empty:
    the top-ranked response of each training ranking stands in for the demonstration."""
    out: str = "runs/rm"
    """Output directory (save_pretrained of a sequence-classification model with config.reward_bias)."""
    epochs: int = 1
    """InstructGPT trains its RM for one epoch: more overfits."""
    batch_size: int = 8
    """Rankings per optimizer step; each ranking's C(K,2) pairs stay in one batch element."""
    micro_batch_size: int = 8
    """Rankings per forward/backward."""
    eval_fraction: float = 0.1
    """Share of rankings held out to report pairwise accuracy."""
    max_len: int = 1024
    """Longest prompt + response in tokens; longer rankings are reported and skipped."""
    soft_targets: bool = False
    """Train on the judge's soft pairwise probabilities where a record has ``pairwise_probs``:
    -[p log sigmoid(r_i - r_j) + (1 - p) log sigmoid(r_j - r_i)] over all C(K, 2) pairs, tied ones
    included (their p near 0.5 says the two are close). Records without it keep hard targets, ties dropped."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6))
    model_config: ModelConfig = field(default_factory=ModelConfig)
    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0: only at the end)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the `wandb` package and a login). TensorBoard is used whenever
    the `tensorboard` package is installed; metrics.jsonl and curves.png are always written."""
    seed: int = 0
    """Seed of the held-out split, the data order and the new scalar head's initialization."""

    def validate(self, prefix: str = "", *, provided: Collection[str] = ()) -> RMConfig:
        """Raise :class:`ConfigError` for a value that cannot work. ``provided``: inputs given another way
        (in memory, or filled in by the pipeline), so not required here."""
        c = OptionChecker(self, prefix, provided)
        c.integer("epochs", 1)
        c.integer("batch_size", 1)
        c.integer("micro_batch_size", 1)
        c.number("eval_fraction", 0, 1, hi_open=True)
        c.integer("max_len", 2)
        c.integer("save_every", 0)
        c.seed()
        c.multiple_of("batch_size", "micro_batch_size")
        self.optim.validate(f"{prefix}optim.")
        self.model_config.validate(f"{prefix}model_config.")
        c.package("wandb", "wandb")
        c.model_path("model")
        c.data_path("data", "rankings JSONL or a datasets name")
        c.data_path("demonstrations", required=False)
        c.out_dir("out")
        return self


@dataclass
class JudgeConfig:
    """`fastrlhf judge`: rank K responses per prompt with a local causal LM, from the log-probabilities of
    its answer tokens for every pair in both orders (no generated text is parsed)."""

    model: str = ""
    """The judge: a local directory or hub id of a causal LM (never the policy being trained)."""
    data: str = ""
    """Input JSONL from `fastrlhf sample`: {"prompt", "responses": [K]} per line (optional "id")."""
    out: str = "rankings.jsonl"
    """Output rankings JSONL (read by `fastrlhf rm`); the bias report goes next to it, as <stem>.bias.json."""
    template: str = ""
    """A judging-prompt file with {prompt}, {response_a}, {response_b} once each, and optionally {answer}:
    text before it is the user's message, text after it starts the judge's reply (with a chat template).
    The label token must be the next token after the template's end. Empty: the built-in rubric."""
    label_a: str = "A"
    """Answer meaning "the first response is better"; it must be one token right after the template."""
    label_b: str = "B"
    """Answer meaning "the second response is better"; one token, different from label_a."""
    use_chat_template: bool | None = None
    """Render the judging prompt with the tokenizer's chat template. None: when the tokenizer has one."""
    share_prefix: bool = True
    """One forward of the token prefix shared by all of a prompt's ordered pairs (use_cache), then the pair
    suffixes batched against copies of that cache. False: whole ordered pairs, left-padded."""
    batch_size: int = 16
    """Ordered pairs per forward pass (a prompt with K responses has K(K-1))."""
    max_response_tokens: int = 0
    """Cut longer responses to their first and last halves (so the judge sees both ends), counted in the
    report. 0: no limit."""
    aggregate: str = "bradley_terry"
    """"bradley_terry": order by a Bradley-Terry fit on the pairwise probabilities; "copeland": by
    pairwise wins (a tie counts one half), Bradley-Terry breaking equal counts."""
    bt_prior: float = 0.1
    """Strength of the Gaussian prior on the Bradley-Terry scores (> 0: without it the fit diverges when one
    response wins every pair)."""
    min_label_mass: float = 0.5
    """Warn when the mean probability the judge puts on the two label tokens is below this: the template or
    the labels are then wrong for this model."""
    model_config: ModelConfig = field(default_factory=ModelConfig)

    def validate(self, prefix: str = "", *, provided: Collection[str] = ()) -> JudgeConfig:
        """Raise :class:`ConfigError` for a value that cannot work. ``provided``: inputs given another way
        (a judge object, or the pipeline's per-round files), so not required here."""
        c = OptionChecker(self, prefix, provided)
        if self.template:
            c.file_path("template")
            from fastrlhf.judge.verdicts import load_template

            try:
                load_template(self.template)
            except ValueError as e:  # "template <path>: needs {prompt} exactly once, ..."
                raise ConfigError(f"{prefix}{e}") from None
        for name in ("label_a", "label_b"):
            if not getattr(self, name).strip():
                c.fail(name, "a non-empty answer label")
        if self.label_b == self.label_a:
            c.fail("label_b", f"a label different from {prefix}label_a ({self.label_a!r})")
        c.integer("batch_size", 1)
        c.integer("max_response_tokens", 0)
        c.choice("aggregate", AGGREGATES)
        c.number("bt_prior", 0, lo_open=True)
        c.number("min_label_mass", 0, 1)
        self.model_config.validate(f"{prefix}model_config.", trainable=False)
        c.model_path("model", "a causal LM directory or hub id")
        c.data_path("data", "`fastrlhf sample` JSONL")
        c.out_file("out")
        return self


@dataclass
class RolloutConfig:
    """How responses are generated (``fastrlhf.rollout``): PPO's rollout and ``fastrlhf sample``."""

    backend: str = "auto"
    """"hf" (transformers ``generate``, dynamic KV cache: the reference), "static" (own decode loop on a
    preallocated static KV cache with the fused sampling kernel, decode steps captured as CUDA graphs on
    CUDA), "paged" (transformers continuous batching, ``generate_batch``) or "auto". "auto" is "hf" on every
    device for now: "static" becomes the CUDA default once it is measured faster on a GPU. A backend that
    cannot serve a model (architecture, 4-bit base, sliding window shorter than the sequence) falls back to
    "hf" and logs why."""
    prompt_bucket: int = 64
    """static: prompts are left-padded to a multiple of this many tokens, so prompt lengths within a bucket
    share one KV cache and one set of CUDA graphs (no new allocation or capture)."""
    min_batch_bucket: int = 8
    """static: the smallest batch bucket. Batch buckets are powers of two from here up to the batch; when
    the unfinished rows fit a smaller bucket, they are compacted into it (finished rows stop costing work)."""
    prefill_tokens: int = 8192
    """static: the prefill runs over chunks of rows holding at most this many (padded) prompt tokens, so its
    activations stay small next to the KV cache. paged: the most tokens in one forward (max_batch_tokens)."""
    compact_every: int = 8
    """static: decode steps between checks for finished rows (each check is one device-to-host sync)."""
    cuda_graphs: bool = True
    """static on CUDA: capture each (batch bucket, cache length) decode step once as a CUDA graph and replay
    it. Off (and always on CPU): the same decode step runs eagerly."""
    keep_cache: bool = True
    """static: keep the KV cache and CUDA graphs allocated between rollouts (no re-allocation or capture;
    their size is logged as rollout/kv_cache_gib and stays resident through the update phase). A later
    rollout that fits in the cache reuses it; a larger one replaces it by one of the larger shape. False
    frees both after every rollout, before the update phase, at the price of re-allocating and re-capturing.
    paged: transformers frees its paged cache after every rollout either way."""

    def validate(self, prefix: str = "", *, provided: Collection[str] = ()) -> RolloutConfig:
        """Raise :class:`ConfigError` for a value that cannot work (see :class:`OptionChecker`)."""
        from fastrlhf.rollout import BACKENDS

        c = OptionChecker(self, prefix, provided)
        c.choice("backend", BACKENDS)
        for name in ("prompt_bucket", "min_batch_bucket", "prefill_tokens", "compact_every"):
            c.integer(name, 1)
        return self


@dataclass
class PPOConfig:
    """Stage 3: PPO against the reward with a critic and a per-token KL penalty to the SFT model."""

    policy: str = ""
    """The SFT model: initializes the policy and is the frozen reference."""
    reference: str = ""
    """Frozen KL reference; empty means the policy's starting weights (the SFT model). Later rounds of the
    iterated pipeline start from the last PPO policy and keep the SFT model here. Ignored with LoRA, where the
    reference is the policy with its adapters disabled."""
    reward_model: str = ""
    """Reward model directory (from `fastrlhf rm`). The Python API also takes a callable instead."""
    prompts: str = ""
    """Prompts: JSONL with a `prompt` field, or a .txt file with one prompt per line."""
    out: str = "runs/ppo"
    """Output directory: policy (and critic) save_pretrained, metrics.jsonl, curves.png, checkpoints."""
    critic: str = "reward_model"
    """"reward_model": a separate critic initialized from the RM (InstructGPT). "policy_head": a zero-init
    value head on the policy's own trunk (one model less in memory)."""
    steps: int = 100
    """PPO iterations (rollout + update)."""
    rollout_batch_size: int = 64
    """Prompts per rollout (one response each)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 4
    """Optimizer steps per epoch; the batch is reshuffled every epoch."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (gradient accumulation inside a minibatch)."""
    max_prompt_len: int = 512
    """Longest prompt in tokens; longer prompts are reported and skipped."""
    max_new_tokens: int = 128
    """Response length limit."""
    min_new_tokens: int = 0
    """Force at least this many new tokens (benchmarks set it to max_new_tokens for fixed lengths)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature everywhere."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of a response that hit max_new_tokens without EOS. None: no penalty."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty (initial value when kl_target is set)."""
    kl_target: float | None = None
    """Set to use the adaptive controller of Ziegler et al. (2019), steering the sequence KL to this value."""
    kl_horizon: int = 10000
    """Adaptive controller horizon, in episodes."""
    kl_estimator: str = "k1"
    """Per-token KL estimator put into the reward: "k1" (d), "k2" (d^2/2) or "k3" (exp(-d) - 1 + d). Only k1
    keeps pi* the fixed point: a reward is only ever differentiated through log pi, and only for k1 does
    that give the gradient of -beta * KL (in the exact expected-gradient flow of the closed-form two-token
    task, k2 collapses onto one response and k3 diverges). k2 and k3 are estimators for measuring the KL."""
    gamma: float = 1.0
    """Discount (RLHF uses none)."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten shaped rewards (without re-centering) before GAE."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    value_clip_range: float = 0.2
    """Value clip epsilon around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss (with critic="policy_head" it shares the policy's gradient)."""
    advantage_estimator: str = "gae"
    """"gae": PPO with a critic (below). Critic-free, no critic or value head loaded: "grpo" (group_size
    samples per prompt, return normalized by its group's mean and std), "dr_grpo" (group mean only), "rloo"
    (leave-one-out baseline), "reinforce++" (per-token KL reward, return-to-go whitened over the batch). Run
    them on-policy, ppo_epochs=1 and num_minibatches=1, as their papers do (reused clipped updates drift off
    the optimum, REINFORCE++ most: see ``fastrlhf.ppo.critic_free_advantages``). All put the per-token KL
    (kl_estimator "k1") into the reward, so each one's fixed point is pi* ~ pi_ref exp(r / beta):
    tests/test_closed_form.py measures them within 0.5% of the optimum. fastrlhf has no KL-as-loss option
    (GRPO's original k3 term in the loss): its fixed point is not pi* (on one token pi ~ beta pi_ref /
    (lambda - r), a polynomial tilt; on the closed-form two-token task at beta 0.2 it is 11% below the
    optimum, and k2 as a loss is too, as it ignores the KL of later tokens)."""
    group_size: int = 4
    """Samples per prompt for grpo, dr_grpo and rloo; rollout_batch_size counts sequences and must divide."""
    value_trunk_grad_scale: float = 1.0
    """With critic="policy_head": the factor on the value loss's gradient into the shared trunk (the value
    head itself always gets the full gradient). 0 stops it, so the value loss cannot drag the policy."""
    target_kl: float | None = 0.1
    """Early stop: when a minibatch's approx_kl (measured before its optimizer step) exceeds this, that
    minibatch and the rest of the PPO step's updates are skipped (logged as `early_stopped`). None: off."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight gamma of the log-likelihood of ptx_data added to the objective. 0 disables."""
    ptx_data: str = ""
    """Pretraining or demonstration data for PPO-ptx (prompt/completion JSONL; the completion is scored)."""
    offload_frozen: bool = False
    """Keep the reference and reward models on the CPU and move them to the GPU only while they score."""
    policy_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=10))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, warmup_steps=10))
    model_config: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    save_every: int = 0
    """Write a resumable checkpoint every N PPO steps (0: only at the end)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the `wandb` package and a login). TensorBoard is used whenever
    the `tensorboard` package is installed; metrics.jsonl and curves.png are always written."""
    seed: int = 0
    """Seed of the prompt order and of sampling."""

    def validate(self, prefix: str = "", *, provided: Collection[str] = ()) -> PPOConfig:
        """Raise :class:`ConfigError` for a value that cannot work. ``provided``: inputs given another way
        (a reward function or in-memory prompts, or paths the pipeline fills in), so not required here."""
        from fastrlhf.kernels.kl_penalty import ESTIMATORS

        c = OptionChecker(self, prefix, provided)
        c.choice("advantage_estimator", ("gae", *CRITIC_FREE))
        c.choice("critic", CRITICS)
        for name in ("steps", "rollout_batch_size", "ppo_epochs", "num_minibatches", "micro_batch_size"):
            c.integer(name, 1)
        c.integer("max_prompt_len", 1)
        c.integer("max_new_tokens", 1)
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            c.fail("min_new_tokens", f"an integer in [0, {prefix}max_new_tokens={self.max_new_tokens}]")
        c.integer("kl_horizon", 1)
        c.integer("group_size", 2)
        c.integer("save_every", 0)
        c.multiple_of("rollout_batch_size", "num_minibatches")
        if self.advantage_estimator in GROUPED:
            c.multiple_of("rollout_batch_size", "group_size")
        c.number("temperature", 0, lo_open=True)
        c.number("top_p", 0, 1, lo_open=True)
        c.number("missing_eos_penalty", 0)
        c.number("kl_coef", 0)
        c.number("kl_target", 0, lo_open=True)
        c.choice("kl_estimator", ESTIMATORS)
        c.number("gamma", 0, 1)
        c.number("lam", 0, 1)
        for name in ("clip_range", "value_clip_range", "vf_coef", "ptx_coef"):
            c.number(name, 0)
        c.number("value_trunk_grad_scale", 0, 1)
        c.number("target_kl", 0, lo_open=True)
        if self.ptx_coef > 0 and not self.ptx_data:
            c.fail("ptx_data", f"prompt/completion JSONL (required when {prefix}ptx_coef > 0)")
        c.data_path("ptx_data", required=False)
        if self.offload_frozen and self.model_config.load_in_4bit:
            c.fail("offload_frozen", f"false with {prefix}model_config.load_in_4bit (4-bit models cannot "
                   "move between devices)")  # fmt: skip
        self.policy_optim.validate(f"{prefix}policy_optim.")
        self.critic_optim.validate(f"{prefix}critic_optim.")
        self.model_config.validate(f"{prefix}model_config.")
        self.rollout.validate(f"{prefix}rollout.")
        c.package("wandb", "wandb")
        c.seed()
        c.model_path("policy", "the SFT model directory or hub id")
        c.model_path("reference", required=False)
        critic_from_rm = self.advantage_estimator == "gae" and self.critic == "reward_model"
        if critic_from_rm and not self.reward_model and "reward_model" not in c.provided:
            why = f'{prefix}critic "reward_model" starts the critic from it; with a reward function, set it'
            c.fail("reward_model", f'a reward model directory ({why} to "policy_head")')
        c.model_path("reward_model", "a reward model directory (from `fastrlhf rm`)")
        c.data_path("prompts", "prompt JSONL, a .txt file or a datasets name")
        c.out_dir("out")
        return self


T = TypeVar("T")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise naming the field."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"ModelConfig": ModelConfig, "OptimConfig": OptimConfig})
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, arg, value)
            except ValueError:
                continue
        raise ValueError(f"{name}: cannot read {value!r} as {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if tp is str:
        if value is None:  # `reference:` or `reference: null` in YAML: not set
            return ""
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name}: expected a string, got {value!r}")
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        if tp is not str and isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: expected {tp.__name__}, got {value!r}") from e
    raise ValueError(f"{name}: unsupported field type {tp}")


def apply_overrides(cfg: T, overrides: dict[str, Any], *, where: str = "config") -> T:
    """Set ``dotted.name -> value`` pairs on a (nested) config dataclass, with type checks."""
    for dotted, value in overrides.items():
        target: Any = cfg
        parts = dotted.replace("-", "_").split(".")
        for i, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(target)}
            if part not in fields:
                path = ".".join(parts[: i + 1])
                raise ValueError(f"{where}: unknown option {path!r} (known: {', '.join(sorted(fields))})")
            f = fields[part]
            if i < len(parts) - 1:
                target = getattr(target, part)
                if not dataclasses.is_dataclass(target):
                    raise ValueError(f"{where}: {'.'.join(parts[: i + 1])} has no sub-options")
            elif dataclasses.is_dataclass(getattr(target, part)):
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: {dotted} expects a mapping of sub-options")
                apply_overrides(getattr(target, part), {k: v for k, v in value.items()}, where=where)
            else:
                setattr(target, part, _coerce(f"{where}: {dotted}", f.type, value))
    return cfg


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, then a YAML file (top-level mapping of its fields), then overrides."""
    cfg = cls()
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"config: no such file {str(path)!r}")
        text = Path(path).read_text(encoding="utf-8-sig")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: {_yaml_error(e)}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of options at the top level")
        apply_overrides(cfg, data, where=str(path))
    if overrides:
        apply_overrides(cfg, overrides, where="command line")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for logging next to the metrics)."""
    return dataclasses.asdict(cfg)


def _yaml_error(e: yaml.YAMLError) -> str:
    """``line L, column C: <problem>`` (1-based) of a YAML syntax error, on one line."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None and mark is not None and start.line != mark.line:
        problem += f" ({context} that starts on line {start.line + 1})"
    return f"{where}invalid YAML: {problem}"


# ------------------------------------------------------------------------------------------- validation

DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("auto", "adamw", "adamw8bit", "paged_adamw8bit")
CRITICS = ("reward_model", "policy_head")
CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce++")
"""The advantage estimators that need no critic (``fastrlhf.ppo.critic_free_advantages``)."""
GROUPED = ("grpo", "dr_grpo", "rloo")
"""Those whose baseline is the other samples of the same prompt (``group_size`` per prompt)."""
AGGREGATES = ("bradley_terry", "copeland")
DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet", ".arrow")
"""A data option ending in one of these names a local file (never a datasets name)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
_HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$")
_MISSING = object()


class ConfigError(ValueError):
    """A bad option, before anything is loaded: one line naming the option as the command line spells it
    (``ppo.policy_optim.lr``), its value and what is allowed."""


def show_value(value: Any) -> str:
    """A value as the command line spells it: true/false/none, numbers and strings as Python writes them."""
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else repr(value)


def _looks_local(value: str) -> bool:
    """True for a string that can only be a local path: a hub id is ``name`` or ``owner/name``. An
    ``owner/name`` whose owner is a local directory (``runs/sft``) counts as local too."""
    if not _HUB_ID.match(value) or "--" in value or ".." in value or value.endswith("."):
        return True
    owner, slash, _ = value.partition("/")
    return bool(slash) and Path(owner).is_dir()


def _missing_local(name: str, value: str, what: str) -> ConfigError:
    owner, slash, _ = value.partition("/")
    local_owner = slash and _HUB_ID.match(value) and Path(owner).is_dir()
    why = f" ({owner}/ is a local directory, so this is a local path, not a hub id)" if local_owner else ""
    return ConfigError(f"{name}: no such {what} {value!r}{why}")


def check_model_path(name: str, value: str) -> None:
    """A model option: an existing directory saved by ``save_pretrained``, or a string that can be a hub id
    (not checked here: no network access before the run starts)."""
    path = Path(value)
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ConfigError(
                f"{name}: {value!r} has no config.json; expected a model saved by save_pretrained"
            )
    elif path.exists():
        raise ConfigError(f"{name}: {value!r} is a file; expected a model directory or a hub id")
    elif _looks_local(value):
        raise _missing_local(name, value, "model directory")


def check_data_path(name: str, value: str) -> None:
    """A data option: an existing file or directory, or a string that can be a datasets name."""
    if not Path(value).exists() and (Path(value).suffix.lower() in DATA_SUFFIXES or _looks_local(value)):
        raise _missing_local(name, value, "file")


class OptionChecker:
    """The checks of one config object's ``validate``. Each failure is a :class:`ConfigError` reading
    ``<prefix><name>: expected <what is allowed>, got <value>``; the constructor checks every field's type
    (the command line converts values already; this catches Python callers)."""

    def __init__(self, cfg: Any, prefix: str = "", provided: Collection[str] = ()) -> None:
        self.cfg, self.prefix = cfg, prefix
        self.provided = {p for p in provided if "." not in p}
        self._nested = [p for p in provided if "." in p]
        hints = _type_hints(type(cfg))
        for f in dataclasses.fields(cfg):
            tp, value = hints[f.name], getattr(cfg, f.name)
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    self.fail(f.name, f"a {tp.__name__}")
            elif not _is_instance(value, tp):
                self.fail(f.name, _type_text(tp))

    def sub(self, name: str) -> set[str]:
        """The ``provided`` names under the nested config ``name``."""
        return {p[len(name) + 1 :] for p in self._nested if p.startswith(name + ".")}

    def fail(self, name: str, allowed: str, value: Any = _MISSING) -> typing.NoReturn:
        value = getattr(self.cfg, name) if value is _MISSING else value
        raise ConfigError(f"{self.prefix}{name}: expected {allowed}, got {show_value(value)}")

    def integer(self, name: str, lo: int, hi: int | None = None) -> None:
        value = getattr(self.cfg, name)
        if value < lo or (hi is not None and value > hi):
            self.fail(name, f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]")

    def seed(self, name: str = "seed") -> None:
        if not 0 <= getattr(self.cfg, name) < 2**63:
            self.fail(name, "an integer in [0, 2**63)")

    def number(
        self, name: str, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False
    ) -> None:
        """A finite number in the interval (None passes where the field allows it: the type check did)."""
        value = getattr(self.cfg, name)
        if value is None:
            return
        ok = math.isfinite(value)
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            if hi is None:
                interval = f" {'>' if lo_open else '>='} {lo:g}" if lo is not None else ""
            else:
                interval = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            self.fail(name, f"a finite number{interval}")

    def choice(self, name: str, choices: Collection[str]) -> None:
        if getattr(self.cfg, name) not in choices:
            self.fail(name, "one of " + ", ".join(choices))

    def multiple_of(self, name: str, divisor: str) -> None:
        by = getattr(self.cfg, divisor)
        if getattr(self.cfg, name) % by:
            self.fail(name, f"a multiple of {self.prefix}{divisor} ({by})")

    def _required(self, name: str, what: str, required: bool) -> bool:
        """False when there is no value to check; an error when one is required but missing."""
        if getattr(self.cfg, name):
            return True
        if required and name not in self.provided:
            self.fail(name, f"{what} (required)")
        return False

    def model_path(self, name: str, what: str = "a model directory or hub id", *, required=True) -> None:
        if self._required(name, what, required):
            check_model_path(self.prefix + name, getattr(self.cfg, name))

    def data_path(self, name: str, what: str = "a data file or datasets name", *, required=True) -> None:
        if self._required(name, what, required):
            check_data_path(self.prefix + name, getattr(self.cfg, name))

    def file_path(self, name: str) -> None:
        value = getattr(self.cfg, name)
        if not Path(value).is_file():
            raise _missing_local(self.prefix + name, value, "file")

    def out_dir(self, name: str) -> None:
        value = getattr(self.cfg, name)
        if self._required(name, "an output directory", True) and Path(value).is_file():
            self.fail(name, "a directory, not an existing file")

    def out_file(self, name: str) -> None:
        value = getattr(self.cfg, name)
        if self._required(name, "an output file", True) and Path(value).is_dir():
            self.fail(name, "a file, not an existing directory")

    def package(self, name: str, package: str) -> None:
        """An option that needs an optional package: checked when the option is set (true, > 0, ...)."""
        if getattr(self.cfg, name) and importlib.util.find_spec(package) is None:
            value = show_value(getattr(self.cfg, name))
            raise ConfigError(
                f"{self.prefix}{name}: {value} needs the `{package}` package (pip install {package})"
            )

    def attention(self, name: str) -> None:
        """``auto``, or an attention implementation transformers knows (or a hub kernel, ``org/repo``)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        known = ("auto", "eager", *ALL_ATTENTION_FUNCTIONS.valid_keys())
        value = getattr(self.cfg, name)
        if value not in known and not _HUB_KERNEL.match(value.removeprefix("paged|")):
            self.fail(name, "one of " + ", ".join(known) + " or a hub kernel (org/repo)")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_instance(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_instance(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_text(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_text(arg) for arg in typing.get_args(tp))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    return names.get(tp, str(tp))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (for ``fastrlhf <stage> --help``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs
