"""Loading models memory-lean, and the three forward passes PPO needs: token log-probs, values, scores.

No forward here builds [batch, time, vocab] logits: log-probs come straight from the last hidden states and
the output-layer weight through ``fastrlhf.kernels.linear_token_logprobs``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fastrlhf.config import ModelConfig, OptimConfig
from fastrlhf.data import ensure_pad_token
from fastrlhf.kernels import linear_token_logprobs

log = logging.getLogger("fastrlhf")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtypes:
        raise ValueError(f"model_config.dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    return dtypes[cfg.dtype]


def resolve_attention(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    flash_ok = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    if flash_ok and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token distinct from EOS (detail 1), left-padding for generation."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


def _disable_dropout(model: nn.Module) -> None:
    """Dropout makes rollout and update log-probs differ, so every model runs without it (detail 2)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)


def _load_kwargs(cfg: ModelConfig, device: torch.device, trainable: bool) -> dict:
    dtype = resolve_dtype(cfg, device)
    kwargs: dict = {
        "dtype": dtype,
        "attn_implementation": resolve_attention(cfg, device, dtype),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.load_in_4bit:
        if device.type != "cuda":
            raise ValueError("model_config.load_in_4bit needs a CUDA device")
        if trainable and cfg.lora_rank <= 0:
            raise ValueError(
                "model_config.load_in_4bit trains LoRA adapters only: set model_config.lora_rank > 0"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device.index or 0}
    return kwargs


def _prepare(
    model: PreTrainedModel, cfg: ModelConfig, device: torch.device, tokenizer, *, trainable: bool, task: str
) -> nn.Module:
    _disable_dropout(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if not cfg.load_in_4bit:
        model.to(device)
    if not trainable:
        model.requires_grad_(False)
        return model.eval()
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:
        checkpointing = device.type == "cuda"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # generate() turns the cache back on; see generation in ppo.py
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.load_in_4bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(checkpointing))
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type=task,
            modules_to_save=["score"] if task == "SEQ_CLS" else None,
        )
        model = get_peft_model(model, lora)
    return model.train()


def load_causal_lm(
    path: str, cfg: ModelConfig, device: torch.device, tokenizer, *, trainable: bool = True
) -> nn.Module:
    """A causal LM from a directory or hub id: dropout off, pad token set, optional checkpointing and LoRA."""
    model = AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(cfg, device, trainable))
    return _prepare(model, cfg, device, tokenizer, trainable=trainable, task="CAUSAL_LM")


def load_scalar_model(
    path: str, cfg: ModelConfig, device: torch.device, tokenizer, *, trainable: bool = True
) -> nn.Module:
    """A backbone with a scalar head (``AutoModelForSequenceClassification``, one label).

    A fresh head is drawn from N(0, 1/sqrt(H + 1)) (detail 7). ``config.reward_bias`` (set by RM training so
    that demonstrations score 0 on average) is kept in the config and added by :func:`sequence_scores`.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, **_load_kwargs(cfg, device, trainable)
    )
    if not hasattr(model.config, "reward_bias"):
        head = model.score
        nn.init.normal_(head.weight, std=1.0 / (head.in_features + 1) ** 0.5)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        model.config.reward_bias = 0.0
    return _prepare(model, cfg, device, tokenizer, trainable=trainable, task="SEQ_CLS")


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def trunk(model: nn.Module) -> nn.Module:
    """The decoder stack that returns last hidden states (LlamaModel for a LlamaForCausalLM, ...)."""
    base = unwrap(model)
    return getattr(base, base.base_model_prefix)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (detail 3): the first real token of every row is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] of the model's trunk."""
    out = trunk(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, R] of the tokens ``input_ids[:, response_start:]`` under the model at ``temperature``.

    The hidden state at position t predicts token t + 1, so positions response_start - 1 .. T - 2 are read.
    """
    if hidden is None:
        hidden = hidden_states(model, input_ids, attention_mask)
    head = unwrap(model).get_output_embeddings()
    return linear_token_logprobs(
        hidden[:, response_start - 1 : -1],
        head.weight,
        input_ids[:, response_start:],
        bias=head.bias,
        temperature=temperature,
        return_entropy=return_entropy,
        **logit_processing(unwrap(model).config),
    )


def logit_processing(config) -> dict[str, float | None]:
    """What the model does to its output layer's result before the softmax, as ``linear_token_logprobs``
    options: Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale`` (a factor) and Granite's
    ``logits_scaling`` (a divisor)."""
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if divisor not in (None, 1, 1.0):
        scale = (scale or 1.0) / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    return {
        "softcap": float(cap) if cap else None,
        "logit_scale": float(scale) if scale not in (None, 1.0) else None,
    }


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, whatever the padding side (detail 6)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.bool() * positions).argmax(-1)


def scalar_head(model: nn.Module) -> nn.Module:
    return unwrap(model).score


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model scores [B] read at the last real token, plus the normalizing ``config.reward_bias``."""
    hidden = hidden_states(model, input_ids, attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]
    score = scalar_head(model)(last).squeeze(-1).float()
    return score + float(getattr(unwrap(model).config, "reward_bias", 0.0))


def token_values(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> torch.Tensor:
    """Critic values [B, R]: V_t is read at the hidden state that predicts response token t."""
    hidden = hidden_states(model, input_ids, attention_mask)[:, response_start - 1 : -1]
    return scalar_head(model)(hidden).squeeze(-1).float()


class ValueHead(nn.Module):
    """A zero-initialized scalar head on the policy's trunk (detail 7), for critic="policy_head"."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run a LoRA policy as its base model: the reference model without a second copy in memory."""
    with model.disable_adapter():
        yield


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device, enabled: bool) -> Iterator[nn.Module]:
    """Move a frozen model to ``device`` for the duration of a block, then back to the CPU."""
    if not enabled:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def make_optimizer(params: list[nn.Parameter], optim: OptimConfig, cfg: ModelConfig, device: torch.device):
    """AdamW: bitsandbytes' paged 8-bit on CUDA by default, torch's otherwise.

    The 8-bit optimizers write bf16 weights back with stochastic rounding (``fastrlhf.optim``): with no fp32
    master copy, round-to-nearest would drop every update smaller than ~1/256 of a weight.
    """
    kind = cfg.optimizer
    if kind == "auto":
        has_bnb = importlib.util.find_spec("bitsandbytes") is not None
        kind = "paged_adamw8bit" if device.type == "cuda" and has_bnb else "adamw"
    kwargs = {"lr": optim.lr, "weight_decay": optim.weight_decay, "eps": optim.adam_eps}
    if kind == "adamw":
        low_precision = {p.dtype for p in params} & {torch.bfloat16, torch.float16}
        if low_precision:
            log.warning(
                "torch AdamW on %s weights rounds updates smaller than ~1/256 of a weight away; the 8-bit "
                "optimizers (bitsandbytes) round stochastically, or use LoRA or float32 weights",
                ", ".join(sorted(str(d) for d in low_precision)),
            )
        return torch.optim.AdamW(params, **kwargs, foreach=device.type == "cuda")
    if kind in ("adamw8bit", "paged_adamw8bit"):
        from fastrlhf.optim import AdamW8bitSR, PagedAdamW8bitSR

        cls = PagedAdamW8bitSR if kind == "paged_adamw8bit" else AdamW8bitSR
        return cls(params, **kwargs)
    raise ValueError(
        f"model_config.optimizer must be auto, adamw, adamw8bit or paged_adamw8bit, got {kind!r}"
    )


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the configured lr, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


@dataclass
class PhaseMemory:
    """Peak GPU memory of one phase in GiB (zero on CPU). ``start`` resets the device's peak counter, so a
    caller wanting a whole run's peak takes the maximum of the phases (logged as ``memory_gib/step``)."""

    device: torch.device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        return torch.cuda.max_memory_allocated(self.device) / 2**30
