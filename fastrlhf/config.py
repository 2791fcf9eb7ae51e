"""Configuration: one small dataclass per concern, each field documented where it is declared.

Every field is read by the code; a field that did nothing would not be here. ``load_config`` builds a stage's
config from a YAML file plus ``--dotted.name value`` overrides (see ``fastrlhf.cli``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
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
    """"auto": flash-attn's "flash_attention_2" on CUDA when flash-attn is installed, otherwise "sdpa"
    (PyTorch picks its flash backend where it applies). Any transformers value is passed through."""
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
    activations stay small next to the KV cache."""
    compact_every: int = 8
    """static: decode steps between checks for finished rows (each check is one device-to-host sync)."""
    cuda_graphs: bool = True
    """static on CUDA: capture each (batch bucket, cache length) decode step once as a CUDA graph and replay
    it. Off (and always on CPU): the same decode step runs eagerly."""
    keep_cache: bool = True
    """static: keep the KV cache and CUDA graphs allocated between rollouts (no re-allocation or capture;
    their size is logged as rollout/kv_cache_gib and stays resident through the update phase). False frees
    both after every rollout, before the update phase, at the price of re-allocating and re-capturing."""


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
    """Per-token KL estimator put into the reward: "k1" (d), "k2" (d^2/2) or "k3" (exp(-d) - 1 + d)."""
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
    (leave-one-out baseline), "reinforce++" (per-token KL reward, whitened return over the batch). All put the
    per-token KL into the return, so each one's fixed point is pi* ~ pi_ref exp(r / beta)."""
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
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of options at the top level")
        apply_overrides(cfg, data, where=str(path))
    if overrides:
        apply_overrides(cfg, overrides, where="command line")
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for logging next to the metrics)."""
    return dataclasses.asdict(cfg)
