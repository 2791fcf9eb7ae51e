"""transformers' ``StaticCache`` as the static backend uses it: one allocation, batch-bucket views, one call.

Everything that depends on the installed transformers version lives here: the name of the cache argument
(``cache`` in 5.24, ``past_key_values`` before), whether the model takes ``cache_position`` and
``logits_to_keep``, and the static layers' length counters.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import StaticCache

# Per-layer counters of how many positions a static layer holds: a tensor (full layers, 5.2x) or an int
# (sliding-window layers). Batch-bucket views keep their own and take them over from the cache they follow.
_LENGTH_ATTRS = ("cumulative_length", "cumulative_length_int")


def unsupported_reason(model: nn.Module, cache_len: int) -> str | None:
    """Why the static backend cannot serve ``model`` with ``cache_len`` positions, or None if it can."""
    config = model.config
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "bitsandbytes-quantized weights are not captured into CUDA graphs"
    if getattr(config, "quantization_config", None) is not None:
        return "quantized weights are not captured into CUDA graphs"
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not declare static-cache support (_can_compile_fullgraph)"
    try:
        cache = StaticCache(config=config, max_cache_len=cache_len)
    except Exception as e:  # an architecture transformers' StaticCache cannot describe
        return f"StaticCache rejects {type(model).__name__}: {e}"
    for layer in cache.layers:
        if type(layer).__name__ not in ("StaticLayer", "StaticSlidingWindowLayer"):
            return f"cache layer {type(layer).__name__} is not a plain static attention layer"
        if layer.max_cache_len < cache_len:
            # A full sliding window rolls its cache on the host side (Python int state), not capturable.
            return (
                f"sliding window {layer.max_cache_len} is shorter than prompt + max_new_tokens ({cache_len})"
            )
    return None


class ModelCall:
    """The model's forward for one step, with the argument names of the installed transformers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.takes_cache_position = "cache_position" in params
        self.takes_logits_to_keep = "logits_to_keep" in params

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: StaticCache,
        cache_position: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [b, V] of the last position."""
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if self.takes_cache_position:
            kwargs["cache_position"] = cache_position
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        return out.logits[:, -1]


def allocate(model: nn.Module, batch: int, cache_len: int, device: torch.device) -> StaticCache:
    """A StaticCache of ``batch`` rows x ``cache_len`` positions, its tensors allocated now. transformers
    allocates them lazily, at the batch of the first forward: a one-token forward over every row does it
    without the activations of a full prefill (which then overwrites position 0)."""
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    mask = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
    mask[:, 0] = 1
    ModelCall(model)(ids, mask, torch.zeros_like(ids), cache, torch.zeros(1, dtype=torch.long, device=device))
    reset(cache)
    return cache


def batch_view(cache: StaticCache, batch: int, start: int = 0) -> StaticCache:
    """A cache whose layers are rows ``start .. start + batch - 1`` of ``cache``'s tensors (the same memory,
    no new KV allocation), with their own length counters."""
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        part.keys, part.values = layer.keys[start : start + batch], layer.values[start : start + batch]
        part.batch_size = batch
        for attr in _LENGTH_ATTRS:
            value = getattr(layer, attr, None)
            if isinstance(value, torch.Tensor):
                setattr(part, attr, value.clone())
        view.layers.append(part)
    return view


def follow_length(dst: StaticCache, src: StaticCache) -> None:
    """Give ``dst``'s layers the number of held positions of ``src``'s (in place for tensors)."""
    for d, s in zip(dst.layers, src.layers, strict=True):
        for attr in _LENGTH_ATTRS:
            value = getattr(s, attr, None)
            if isinstance(value, torch.Tensor):
                getattr(d, attr).copy_(value)
            elif value is not None:
                setattr(d, attr, value)


def length_state(cache: StaticCache) -> list[dict[str, object]]:
    """A snapshot of the layers' length counters (restored around CUDA-graph warm-up and capture)."""
    return [
        {
            a: (v.clone() if isinstance(v, torch.Tensor) else v)
            for a in _LENGTH_ATTRS
            if (v := getattr(x, a, None)) is not None
        }
        for x in cache.layers
    ]


def restore_length(cache: StaticCache, state: list[dict[str, object]]) -> None:
    for layer, saved in zip(cache.layers, state, strict=True):
        for attr, value in saved.items():
            if isinstance(value, torch.Tensor):
                getattr(layer, attr).copy_(value)
            else:
                setattr(layer, attr, value)


def reset(cache: StaticCache) -> None:
    """Zero the length counters; stale keys/values stay (masked out), so nothing is rewritten."""
    for layer in cache.layers:
        for attr in _LENGTH_ATTRS:
            value = getattr(layer, attr, None)
            if isinstance(value, torch.Tensor):
                value.zero_()
            elif value is not None:
                setattr(layer, attr, 0)


def reorder_rows(cache: StaticCache, rows: torch.Tensor) -> None:
    """Move rows ``rows`` of every layer's keys/values to the front (in place, through a temporary)."""
    n = rows.numel()
    for layer in cache.layers:
        layer.keys[:n] = layer.keys.index_select(0, rows)
        layer.values[:n] = layer.values.index_select(0, rows)


def nbytes(cache: StaticCache) -> int:
    return sum(
        x.keys.numel() * x.keys.element_size() + x.values.numel() * x.values.element_size()
        for x in cache.layers
        if getattr(x, "is_initialized", False)
    )
