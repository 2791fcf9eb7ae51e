"""What differs between architectures, read from the model classes themselves, not from a list of names.

- :func:`trunk_of`: the module whose last hidden states the output layer reads, in plain and composite models.
- :func:`attention_implementation`: what ``attn_implementation="auto"`` means for one model class.
- :func:`scalar_model_class`: the reward-model / critic class; a scalar head on the causal LM where
  transformers has no sequence-classification class that is one.
- :func:`model_head_logprobs`: log-probs through the model's *own* output layer and logit processing,
  [chunk, V] at a time. The correct (slower) path where the fused one (``linear_token_logprobs`` on the
  output-layer weight) does not match the model's own forward; ``fastrlhf.model_check`` picks per model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.auto.auto_factory import _get_model_class
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
)

from fastrlhf.kernels.linear_token_logprobs import default_chunk_size

SCALAR_HEAD_SUFFIX = "WithScalarHead"
LOGITS_PATH = "fastrlhf_logits_path"
"""Attribute set on a verified model: "fused" (the kernel) or "model" (:func:`model_head_logprobs`)."""


def trunk_of(model: PreTrainedModel) -> nn.Module:
    """The module a model's own forward calls for the hidden states its output layer (or head) reads.

    ``base_model_prefix`` names it in most models (``model`` in LlamaForCausalLM). Composite models may keep
    it elsewhere (Llama 4's text model says ``language_model`` but holds ``model``): then the one transformers
    sub-model among the children. A model with no output layer and no such child (a base model) is its own
    trunk. A wrapper that only holds a decoder (BART's, Whisper's ``DecoderWrapper``) gives its decoder, the
    module the forward actually calls.
    """
    found = getattr(model, model.base_model_prefix, None)
    if not isinstance(found, nn.Module) or found is model:
        children = [m for m in model.children() if isinstance(m, PreTrainedModel)]
        if len(children) == 1:
            found = children[0]
        elif model.get_output_embeddings() is None:
            return model
        else:
            found = model.get_decoder()
    while True:
        inner = [m for m in found.children() if isinstance(m, PreTrainedModel)]
        if len(inner) != 1 or _count(found) != _count(inner[0]):
            return found
        found = inner[0]


def _count(module: nn.Module) -> int:
    return sum(1 for _ in module.parameters())


def model_class(
    config: PretrainedConfig, mapping=MODEL_FOR_CAUSAL_LM_MAPPING
) -> type[PreTrainedModel] | None:
    """The transformers class ``mapping`` gives for ``config``, else the one its ``architectures`` names if
    that is one of the mapping's (a saved Emu3 or Mllama text model has a config type the Auto classes do
    not map); None for remote code or an unknown type."""
    if getattr(config, "auto_map", None):
        return None
    try:
        return _get_model_class(config, mapping)
    except (KeyError, ValueError):
        pass
    names = set(mapping._model_mapping.values())  # class names, without importing every model
    for name in getattr(config, "architectures", None) or []:
        name = name.removesuffix(SCALAR_HEAD_SUFFIX)
        if name in names:
            return getattr(transformers, name, None)
    return None


def attention_implementation(
    requested: str, cls: type[PreTrainedModel] | None, device: torch.device, dtype: torch.dtype
) -> str | None:
    """``requested`` unless it is "auto": then flash-attn where the class supports it on a CUDA device in half
    precision (and ``flash_attn`` is installed), else SDPA where the class supports it, else eager. None (an
    unknown class, e.g. remote code) leaves the choice to transformers (SDPA when the class supports it)."""
    if requested != "auto":
        return requested
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        return None
    flash = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    if flash and getattr(cls, "_supports_flash_attn", False) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def scalar_model_class(config: PretrainedConfig) -> type:
    """The class a reward model or critic of ``config``'s architecture loads as.

    transformers' sequence-classification class where it is a linear ``score`` head on the trunk read at the
    last real token (GPT-2, Llama, Qwen, ... and the ``GenericForSequenceClassification`` family). Otherwise
    (no such class, or one that pools differently, like BERT's [CLS] pooler): the causal LM with a ``score``
    head added (:func:`with_scalar_head`); its output layer is loaded but never used.
    """
    if "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {}):
        return AutoModelForSequenceClassification  # the model's own (remote) code
    cls = model_class(config, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)
    if cls is not None and _defines_score(cls):
        return cls
    causal = model_class(config)
    if causal is None:
        raise ValueError(
            f"{type(config).__name__} ({config.model_type}) has neither a sequence-classification nor a "
            "causal-LM class in transformers: it cannot be a reward model or critic"
        )
    return with_scalar_head(causal)


def _defines_score(cls: type) -> bool:
    for klass in cls.__mro__:  # GenericForSequenceClassification is a mixin, not a PreTrainedModel
        if "__init__" in vars(klass) and klass.__module__.startswith("transformers."):
            try:
                if "self.score = " in inspect.getsource(klass.__init__):
                    return True
            except (OSError, TypeError):
                return True  # no source to read (generated code): trust the class
    return False


@functools.cache
def with_scalar_head(causal: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """``causal`` plus ``score = nn.Linear(hidden, 1, bias=False)``: a reward model on any causal LM. It saves
    and loads like ``causal`` (plus ``score.weight``), so an SFT checkpoint initializes it."""

    def __init__(self, config, *args, **kwargs):
        causal.__init__(self, config, *args, **kwargs)
        self.score = nn.Linear(config.get_text_config().hidden_size, 1, bias=False)

    # Named in the causal class's module: transformers treats classes elsewhere as custom code and then skips
    # initializing computed buffers (Falcon-H1's mup_vector) of modules whose weights all loaded.
    attrs = {"__init__": __init__, "__module__": causal.__module__}
    return type(causal.__name__ + SCALAR_HEAD_SUFFIX, (causal,), attrs)


def has_scalar_head_added(model: PreTrainedModel) -> bool:
    """True for a :func:`with_scalar_head` model: its own forward gives logits, not scores."""
    return type(model).__name__.endswith(SCALAR_HEAD_SUFFIX) and model.get_output_embeddings() is not None


@dataclass
class _Hidden(BaseModelOutputWithPast):
    """What a stubbed trunk returns: the given hidden states, None for anything else the model asks for."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


@contextlib.contextmanager
def _trunk_returns(module: nn.Module, hidden: torch.Tensor) -> Iterator[None]:
    saved = module.__dict__.get("forward")
    module.forward = lambda *args, **kwargs: _Hidden(last_hidden_state=hidden)
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def model_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own forward from its trunk's output on: logits [B, T, V] for hidden states [B, T, H]."""
    ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    with _trunk_returns(trunk_of(model), hidden):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def model_head_logprobs(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    suppress_ids: tuple[int, ...] = (),
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(model_logits(hidden) / temperature)`` at ``targets`` [...], and the entropy, without the
    suppressed ids. [chunk, V] logits at a time; with gradients, each chunk is recomputed in the backward pass
    (activation checkpointing), so no [B, T, V] tensor exists in either pass."""
    n_vocab = model.get_output_embeddings().weight.shape[0]
    flat, ids = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    suppress = torch.tensor(suppress_ids, dtype=torch.long, device=hidden.device)

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = model_logits(model, h[None])[0].float() / temperature
        if suppress.numel():
            logits = logits.index_fill(-1, suppress[suppress < logits.shape[-1]], -torch.inf)
        logp = torch.log_softmax(logits, -1)
        picked = logp.gather(-1, t[:, None].clamp(0, logp.shape[-1] - 1)).squeeze(-1)
        picked = picked.masked_fill((t < 0) | (t >= logp.shape[-1]), torch.nan)
        if not return_entropy:
            return picked[:, None]
        entropy = -(logp.exp() * logp.masked_fill(logp.isinf(), 0.0)).sum(-1)  # suppressed: 0, not NaN
        return torch.stack([picked, entropy], -1)

    size = default_chunk_size(n_vocab)
    parts = []
    for h, t in zip(flat.split(size), ids.split(size), strict=True):
        if torch.is_grad_enabled():
            parts.append(checkpoint(chunk, h, t, use_reentrant=False))
        else:
            parts.append(chunk(h, t))
    out = torch.cat(parts).reshape(*targets.shape, -1)
    return (out[..., 0], out[..., 1]) if return_entropy else out[..., 0]
