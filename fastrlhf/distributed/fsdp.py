"""Sharding the models with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every model is sharded per decoder layer, then at the root (embeddings, final norm, output layer and any
head). Parameters become DTensors in place: the optimizer, ``backward()`` and ``clip_grad_norm_`` stay as in
the one-process code. What the wrapping has to know about fastrlhf:

- fastrlhf calls the model's trunk (``LlamaModel``) directly and multiplies the last hidden states with the
  output layer's weight itself (``models.response_logprobs``), so no FSDP forward hook of the root would run.
  :func:`shard` registers the trunk call as an FSDP forward method of the root (``fastrlhf_trunk_forward``,
  which ``models.hidden_states`` calls when present): the root group is gathered for it and stays gathered
  (``reshard_after_forward=False`` at the root) while the output layer and heads are used after it; its
  gradients are reduce-scattered at the end of backward.
- Gradients are reduced by SUM, not FSDP's default AVG: every loss is a rank's share of the global batch loss
  (a local sum divided by a *global* token or item count), so summing the ranks' gradients gives the gradient
  of the one-process loss on the union batch. (gloo rejects PREMUL_SUM, so a divide factor is not used.)
- Mixed precision: weights keep their dtype (pure bf16 on GPU, no fp32 master copy); gradients are reduced in
  float32 (``MixedPrecisionPolicy(param_dtype=None, reduce_dtype=float32)``).
- LoRA and gradient checkpointing are applied by ``models.load_*`` before :func:`shard`; frozen LoRA base
  weights and trainable adapters share a layer's group. The reference stays the policy with adapters off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import torch
from torch import nn

from fastrlhf.distributed.runtime import active, world

log = logging.getLogger("fastrlhf")

TRUNK_FORWARD = "fastrlhf_trunk_forward"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: classes named in ``_no_split_modules`` (transformers)."""
    from fastrlhf.models import unwrap

    names = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: nn.Module | None, *, trainable: bool = True, offload: bool = False) -> nn.Module | None:
    """Shard ``model`` in place over all ranks (a no-op returning ``model`` when not distributed).

    ``trainable``: gradients are reduced by sum in float32. Frozen models (``trainable=False``) reshard every
    layer after its forward; call :func:`reshard` after using one to free its root group too. ``offload``
    keeps a frozen model's shards in CPU memory (``CPUOffloadPolicy``; CUDA only, unverified without a GPU).
    Build the optimizer after this, before any forward.
    """
    if model is None or not active():
        return model
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if getattr(model, "is_loaded_in_4bit", False) or getattr(
        getattr(model, "get_base_model", lambda: None)(), "is_loaded_in_4bit", False
    ):
        raise ValueError("model_config.load_in_4bit (QLoRA) is not supported with more than one process yet")
    kwargs: dict = {
        "mesh": world().mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32),
    }
    if offload and torch.cuda.is_available():
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    from fastrlhf.models import trunk

    if hasattr(model, "config") or hasattr(model, "get_base_model"):
        body = trunk(model)

        def trunk_forward(**inputs):
            return body(**inputs)

        setattr(model, TRUNK_FORWARD, trunk_forward)
        register_fsdp_forward_method(model, TRUNK_FORWARD)
    for m in model.modules():
        if isinstance(m, FSDPModule) and trainable:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def shard_rows(rows: int, world_size: int) -> list[int]:
    """How many of a parameter's ``rows`` (dim 0) each rank holds: FSDP2 splits as ``torch.chunk`` does,
    ceil(rows / world_size) each, the last ranks fewer or none."""
    size = -(-rows // world_size)
    return [max(0, min(size, rows - r * size)) for r in range(world_size)]


def shard_ppo_models(models, cfg):
    """Shard the PPO models (policy, value head, critic, frozen reference and reward model); returns the
    models and the config to run with (``offload_frozen`` becomes FSDP's CPU offload of the frozen shards).
    A no-op when not distributed."""
    if not active():
        return models, cfg
    shard(models.policy)
    shard(models.value_head)
    shard(models.critic)
    shard(models.reference, trainable=False, offload=cfg.offload_frozen)
    if isinstance(models.reward, nn.Module):
        shard(models.reward, trainable=False, offload=cfg.offload_frozen)
    if cfg.offload_frozen:
        cfg = dataclasses.replace(cfg, offload_frozen=False)
    return models, cfg


def _fsdp_modules(model: nn.Module | None) -> list[nn.Module]:
    if model is None or not isinstance(model, nn.Module) or not active():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(*models: nn.Module | None) -> None:
    """Free the gathered parameters of ``models`` (a frozen model's root after scoring; a no-op alone)."""
    for model in models:
        for m in _fsdp_modules(model):
            m.reshard()


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Keep every layer of a sharded ``model`` gathered from its first forward until the block ends (one
    all-gather per layer for a whole ``generate``, not one per layer per token); then reshard. Generation
    passes ``synced_gpus`` so ranks whose rows all hit EOS keep stepping until every rank is done."""
    modules = _fsdp_modules(model)
    if not modules:
        yield
        return
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


def rollout_config(cfg):
    """The rollout engine config to use: the static and paged engines keep their own caches keyed to
    unsharded weights, so under FSDP2 the policy samples with ``hf`` generate (logged once)."""
    if not active() or cfg.backend in ("auto", "hf"):
        return cfg
    if not getattr(rollout_config, "_logged", False):
        log.warning("rollout.backend=%s is not supported with FSDP2 yet; using hf", cfg.backend)
        rollout_config._logged = True
    return dataclasses.replace(cfg, backend="hf")
