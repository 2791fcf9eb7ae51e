"""Rollout engines: sample responses from the policy's own parameters behind one small interface.

    engine = engine_for(policy, cfg.rollout)        # one engine per policy, reused across PPO steps
    gen = engine.generate(policy, input_ids, attention_mask, params)   # gen.tokens: [B, R] response ids

Backends (``RolloutConfig.backend``):

- ``hf``: transformers ``generate`` with its dynamic cache and its own sampling. The reference.
- ``static``: ``fastrlhf.rollout.static``: own decode loop on a preallocated ``StaticCache``, the fused
  ``fastrlhf.kernels.sample_tokens`` kernel, decode steps captured as CUDA graphs on CUDA, finished rows
  compacted away. Runs on the training parameters themselves: no copy, no weight sync.
- ``paged``: transformers continuous batching (``generate_batch``, paged attention), its paged cache sized
  from the batch and freed by transformers after every call.

A backend that cannot serve a model (no static cache or paged attention for the architecture, a 4-bit base
for static, a sliding window shorter than the sequence) falls back to ``hf`` and logs why, once per cause.

Memory (static): the KV cache is batch bucket x (prompt bucket + ``max_new_tokens``) x the model's layers,
KV heads and head size, allocated once and reused by every rollout that fits in it. By default it is kept
through the update phase (``keep_cache=True``: no re-allocation or CUDA-graph capture next step; its size is
logged as ``rollout/kv_cache_gib``); ``keep_cache=False`` frees it before the update phase.

Every backend returns what ``generate`` returns after the prompt: ``[B, R]`` tokens, ``R`` the number of steps
until every row emitted EOS (at most ``max_new_tokens``), ``pad_token_id`` after a row's EOS.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from fastrlhf.config import RolloutConfig

log = logging.getLogger("fastrlhf")

BACKENDS = ("auto", "hf", "static", "paged")


@dataclass(frozen=True)
class SamplingParams:
    """What to sample. ``suppress_ids`` are never sampled; EOS is suppressed until ``min_new_tokens``."""

    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    suppress_ids: tuple[int, ...] = ()
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """One batch of responses and what producing it cost."""

    tokens: torch.Tensor  # [B, R] response ids, pad after EOS
    seconds: float  # wall time of the generation, device synchronized
    backend: str  # the backend that actually ran (after any fallback)
    kv_cache_bytes: int = 0  # the static KV cache held by the engine (0 for a dynamic cache)
    stats: dict[str, float] = field(default_factory=dict)  # backend-specific counters


class RolloutEngine(Protocol):
    """A backend. It holds caches and graphs, never the model: the model is passed to every call."""

    name: str

    def generate(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> Generation: ...

    def release(self) -> None:
        """Free every cache and graph the engine holds (the next call allocates them again)."""
        ...


def resolve_backend(cfg: RolloutConfig, device: torch.device) -> str:
    """The backend ``cfg.backend`` names; "auto" is "hf" everywhere until "static" is measured on a GPU."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"rollout.backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    for name in ("prompt_bucket", "min_batch_bucket", "compact_every", "prefill_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"rollout.{name} must be >= 1, got {getattr(cfg, name)}")
    return "hf" if cfg.backend == "auto" else cfg.backend


def make_engine(cfg: RolloutConfig, device: torch.device) -> RolloutEngine:
    """A new engine of the configured backend."""
    name = resolve_backend(cfg, device)
    if name == "hf":
        from fastrlhf.rollout.hf import HFEngine

        return HFEngine()
    if name == "static":
        from fastrlhf.rollout.static import StaticEngine

        return StaticEngine(cfg)
    from fastrlhf.rollout.paged import PagedEngine

    return PagedEngine(cfg)


_ENGINES: weakref.WeakKeyDictionary[nn.Module, tuple[RolloutConfig, RolloutEngine]] = (
    weakref.WeakKeyDictionary()
)


def engine_for(model: nn.Module, cfg: RolloutConfig) -> RolloutEngine:
    """The engine serving ``model`` under ``cfg``: created on first use, then reused, so its KV cache and
    CUDA graphs survive from one PPO step to the next. It goes away with the model (weak reference)."""
    entry = _ENGINES.get(model)
    if entry is not None and entry[0] == cfg:
        return entry[1]
    if entry is not None:
        entry[1].release()
    device = next(model.parameters()).device
    engine = make_engine(cfg, device)
    log.info("rollout backend: %s (rollout.backend=%s)", engine.name, cfg.backend)
    _ENGINES[model] = (dataclasses.replace(cfg), engine)  # a copy: later edits re-create
    return engine


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "BACKENDS",
    "Generation",
    "RolloutEngine",
    "SamplingParams",
    "engine_for",
    "make_engine",
    "resolve_backend",
]
