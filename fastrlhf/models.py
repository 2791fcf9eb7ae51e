"""Loading models memory-lean, and the three forward passes PPO needs: token log-probs, values, scores.

No forward here builds [batch, time, vocab] logits: log-probs come straight from the last hidden states and
the output-layer weight through ``fastrlhf.kernels.linear_token_logprobs``, or, for a model whose own forward
does more between its output layer and its logits (found at load by ``fastrlhf.model_check``), through its
own output layer [chunk, V] at a time (``architectures.model_head_logprobs``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fastrlhf.architectures import (
    LOGITS_PATH,
    attention_implementation,
    model_class,
    model_head_logprobs,
    scalar_model_class,
    trunk_of,
)
from fastrlhf.config import ModelConfig
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


def resolve_attention(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, cls: type[PreTrainedModel] | None = None
) -> str | None:
    """``cfg.attn_implementation``; "auto" picks what ``cls`` supports (flash-attn, then SDPA, then eager:
    ``architectures.attention_implementation``)."""
    return attention_implementation(cfg.attn_implementation, cls, device, dtype)


def load_tokenizer(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token distinct from EOS (detail 1), left-padding for generation."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer


_RANDOM_IN_TRAINING = ("dropout", "pdrop", "drop_prob", "layerdrop", "jitter")


def _disable_dropout(model: nn.Module) -> None:
    """Dropout makes rollout and update log-probs differ, so every model runs without it (detail 2): the
    ``nn.Dropout`` modules, and every float named like a dropout rate, layer drop or router jitter, in the
    configs and on the modules (many layers copy ``config.attention_dropout`` at init and pass it to the
    attention function while training)."""
    configs = [
        model.config,
        *(getattr(model.config, k, None) for k in getattr(model.config, "sub_configs", {})),
    ]
    for holder in [c for c in configs if c is not None] + list(model.modules()):
        if isinstance(holder, nn.Dropout):
            holder.p = 0.0
        for name, value in list(vars(holder).items()):
            if isinstance(value, float) and value > 0 and any(k in name.lower() for k in _RANDOM_IN_TRAINING):
                setattr(holder, name, 0.0)


def _load_kwargs(cfg: ModelConfig, device: torch.device, trainable: bool, cls=None) -> dict:
    dtype = resolve_dtype(cfg, device)
    kwargs: dict = {
        "dtype": dtype,
        "attn_implementation": resolve_attention(cfg, device, dtype, cls),
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
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # where a composite model reads it
    if not cfg.load_in_4bit:
        model.to(device)
    log.info("%s: %s attention", type(model).__name__, model.config._attn_implementation)
    if cfg.verify_fast_path:
        from fastrlhf.model_check import verify

        verify(model, tokenizer)
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
    """A causal LM from a directory or hub id: dropout off, pad token set, its log-prob path verified
    (``fastrlhf.model_check``), optional checkpointing and LoRA."""
    cls = model_class(AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code))
    model = (cls or AutoModelForCausalLM).from_pretrained(path, **_load_kwargs(cfg, device, trainable, cls))
    return _prepare(model, cfg, device, tokenizer, trainable=trainable, task="CAUSAL_LM")


def load_scalar_model(
    path: str, cfg: ModelConfig, device: torch.device, tokenizer, *, trainable: bool = True
) -> nn.Module:
    """A backbone with a scalar ``score`` head read at the last real token: transformers'
    sequence-classification class with one label, or for architectures without a suitable one the causal LM
    with a head added
    (``architectures.scalar_model_class``).

    A fresh head is drawn from N(0, 1/sqrt(H + 1)) (detail 7). ``config.reward_bias`` (set by RM training so
    that demonstrations score 0 on average) is kept in the config and added by :func:`sequence_scores`.
    """
    cls = scalar_model_class(AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code))
    model = cls.from_pretrained(path, num_labels=1, **_load_kwargs(cfg, device, trainable, cls))
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
    return trunk_of(unwrap(model))


def takes_position_ids(model: PreTrainedModel) -> bool:
    """Whether the model's forward takes ``position_ids``: then ``generate`` passes them from the attention
    mask, and so does :func:`hidden_states`; otherwise the model numbers positions itself, as generating."""
    return "position_ids" in inspect.signature(model.forward).parameters


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (detail 3): the first real token of every row is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] of the model's trunk (through the root's FSDP2 hooks when sharded)."""
    forward = getattr(model, "fastrlhf_trunk_forward", None) or trunk(model)
    kwargs = {"position_ids": position_ids(attention_mask)} if takes_position_ids(unwrap(model)) else {}
    out = forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
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
    suppress_ids: tuple[int, ...] = (),
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, R] of the tokens ``input_ids[:, response_start:]`` under the model at ``temperature``.

    The hidden state at position t predicts token t + 1, so positions response_start - 1 .. T - 2 are read.
    ``suppress_ids``: the ids the sampler never draws (PPO's rollout suppresses the pad token). The log-probs
    (and entropy) are then those of the distribution actually sampled, the softmax renormalized without them,
    so the ratio, the KL and the policy gradient all see the sampler's distribution (see ``_renormalized``).
    """
    if hidden is None:
        hidden = hidden_states(model, input_ids, attention_mask)
    hidden, targets = hidden[:, response_start - 1 : -1], input_ids[:, response_start:]
    if getattr(unwrap(model), LOGITS_PATH, "fused") == "model":  # see fastrlhf.model_check
        return model_head_logprobs(
            unwrap(model), hidden, targets, temperature=temperature, return_entropy=return_entropy,
            suppress_ids=suppress_ids,
        )  # fmt: skip
    head = unwrap(model).get_output_embeddings()
    hidden = hidden.to(head.weight.dtype)  # as the model's own forward does (Mamba's trunk returns float32)
    processing = logit_processing(unwrap(model).config)
    out = linear_token_logprobs(
        hidden,
        head.weight,
        targets,
        bias=head.bias,
        temperature=temperature,
        return_entropy=return_entropy,
        **processing,
    )
    if not suppress_ids:
        return out
    return _renormalized(out, hidden, head, targets, suppress_ids, temperature, processing)


def _renormalized(out, hidden, head, targets, suppress_ids, temperature, processing):
    """Log-probs (and entropy) of q = softmax over the vocabulary without the suppressed set S, from those of
    the full softmax p: log q(y) = log p(y) - log(1 - P), P = sum_{s in S} p(s). log p(s) = z_s - lse, where
    lse = z_y - log p(y) comes from the target's own logit z_y, so only |S| + 1 output-layer rows are read
    (never the [B, R, V] logits). Entropy: H(q) = (H(p) + sum_s p(s) log p(s)) / (1 - P) + log(1 - P).

    log(1 - P) takes its value from a float64 computation (its gradient from the float32 one): rounded to
    float32, it is the same whatever the batch shape, so the first minibatch's ratio stays exactly 1.

    Why it matters: a suppressed token is never sampled, so no sample ever pushes its probability down,
    while PPO's reused, clipped updates can move mass onto tokens a batch did not sample. With log-probs of
    p, that mass grows unseen (the pad token held 61-97% of the mass after one answer in closed-form runs),
    lowers log p of every sampled token and so the k1 KL, and the KL-in-the-reward then pays for it.
    """
    logp, entropy = out if isinstance(out, tuple) else (out, None)
    ids = torch.tensor(suppress_ids, device=targets.device)

    def log_p_suppressed(dtype: torch.dtype) -> torch.Tensor:  # [B, R, S]
        h, w = hidden.to(dtype), head.weight.to(dtype)

        def logits(rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            if head.bias is not None:
                z = z + head.bias.to(dtype)[rows]
            if processing["logit_scale"] is not None:
                z = z * processing["logit_scale"]
            if processing["softcap"] is not None:
                z = processing["softcap"] * torch.tanh(z / processing["softcap"])
            return z / temperature

        z_target = logits(targets, torch.einsum("brh,brh->br", h, w[targets]))
        z_suppressed = logits(ids, torch.einsum("brh,sh->brs", h, w[ids]))
        return z_suppressed - (z_target - logp.to(dtype))[..., None]

    def log_kept(log_p: torch.Tensor) -> torch.Tensor:  # log(1 - P), with P <= 1 - 1e-6 so q stays defined
        log_mass = torch.logsumexp(log_p, -1).clamp(max=math.log1p(-1e-6))  # (and finite at padding)
        return torch.log(-torch.expm1(log_mass))

    log_p = log_p_suppressed(torch.float32)
    kept = log_kept(log_p)
    with torch.no_grad():
        exact = log_kept(log_p_suppressed(torch.float64)).float()
    kept = kept + (exact - kept).detach()
    logq = logp - kept
    if entropy is None:
        return logq
    p_log_p = (log_p.exp() * log_p).sum(-1)
    return logq, (entropy + p_log_p) / kept.exp() + kept


def logit_processing(config) -> dict[str, float | None]:
    """What the model does to its output layer's result before the softmax, as ``linear_token_logprobs``
    options: soft-capping (Gemma 2's ``final_logit_softcapping``, RecurrentGemma's ``logits_soft_cap``,
    xLSTM's ``output_logit_soft_cap``), Cohere's ``logit_scale`` (a factor), Granite's ``logits_scaling`` and
    Inkling's ``logits_mup_width_multiplier`` (divisors). A composite model's are in its text config.
    Anything else is caught at load by ``fastrlhf.model_check``."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(config, "logit_scale", None)
    for name in ("logits_scaling", "logits_mup_width_multiplier"):
        divisor = getattr(config, name, None)
        if divisor not in (None, 1, 1.0):
            scale = (scale or 1.0) / divisor
    caps = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
    cap = next((getattr(config, name) for name in caps if getattr(config, name, None)), None)
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
    score = head_scores(model, hidden[rows, last_token_index(attention_mask)])
    return score + float(getattr(unwrap(model).config, "reward_bias", 0.0))


def token_values(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> torch.Tensor:
    """Critic values [B, R]: V_t is read at the hidden state that predicts response token t."""
    return head_scores(model, hidden_states(model, input_ids, attention_mask)[:, response_start - 1 : -1])


def head_scores(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The scalar head on hidden states [..., H] -> float32 [...], in the head's dtype (a trunk may return
    float32 from bf16 weights, as Mamba's does)."""
    head = scalar_head(model)
    return head(hidden.to(next(head.parameters()).dtype)).squeeze(-1).float()


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
