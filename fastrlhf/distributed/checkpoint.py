"""Checkpoints and exported models of a sharded run, in exactly the one-process formats.

A resumable checkpoint (``fastrlhf.checkpoint``'s layout) is gathered to full, unsharded tensors and written
once, by rank 0, with the one-process writer (atomic rename, ``latest`` pointer, safetensors weights,
``weights_only`` state). Because nothing in it depends on the world size, a run saved on 2 processes resumes
on 1 (or 4) and the reverse; every rank reads the files on resume (a filesystem shared by the nodes). The
cost: rank 0 holds the full model and optimizer state in CPU memory while saving, one tensor gathered at a
time (a sharded DCP checkpoint would avoid that; see the README's "More than one GPU" section).

The optimizer state keeps the one-process ``state_dict()`` layout (parameter indices). For torch's AdamW every
state tensor shaped like its parameter is gathered (save) or re-sharded like it (load); bitsandbytes' 8-bit
AdamW on local shards re-quantizes its moments on the one-process blocks (``fastrlhf.distributed.optim``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastrlhf.distributed.optim import LocalShards
from fastrlhf.distributed.runtime import barrier, broadcast_object, is_main


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for DTensors), detached, on the CPU."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


def _aliases(module: nn.Module) -> dict[str, str]:
    """name -> first name holding the same tensor (tied embeddings are one Parameter under two names)."""
    first: dict[int, str] = {}
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        out[name] = first.setdefault(id(t), name)
    return out


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The module's unsharded state dict on rank 0 (None elsewhere), a tied tensor stored under one name."""
    aliases = _aliases(module)
    out = {}
    for name, t in module.state_dict().items():
        if aliases[name] != name:
            continue
        full = _full(t)
        if is_main():
            out[name] = full
    return out if is_main() else None


def load_full_model_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a full state dict (every rank holds it) into a sharded module's local shards; strict."""
    from torch.distributed.tensor import distribute_tensor

    targets = module.state_dict(keep_vars=True)
    groups: dict[str, list[str]] = {}
    for name, first in _aliases(module).items():
        groups.setdefault(first, []).append(name)
    # A tied tensor is stored under one of its names (whichever the writer kept): find it under any.
    source = {n: next((m for m in group if m in state), n) for group in groups.values() for n in group}
    missing = [k for k in targets if source[k] not in state]
    unexpected = [k for k in state if k not in targets]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint does not match {type(module).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    with torch.no_grad():
        for name, t in targets.items():
            src = state[source[name]]
            if _is_dtensor(t):
                local = distribute_tensor(
                    src.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None
                ).to_local()
                t.to_local().copy_(local)
            else:
                t.copy_(src.to(t.device, t.dtype))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with every sharded state tensor gathered, on rank 0 (None elsewhere)."""
    if isinstance(optimizer, LocalShards):  # bitsandbytes on local shards: quantized states, own layout
        return optimizer.full_state_dict()
    sd = optimizer.state_dict()
    state = {}
    for index in sorted(sd["state"]):
        entry = {k: _full(v) if torch.is_tensor(v) else v for k, v in sd["state"][index].items()}
        state[index] = entry
    return {"state": state, "param_groups": sd["param_groups"]} if is_main() else None


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Load a one-process-layout optimizer state into an optimizer over sharded parameters."""
    from torch.distributed.tensor import distribute_tensor

    if isinstance(optimizer, LocalShards):
        optimizer.load_full_state_dict(saved)
        return

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in saved["state"].items():
        p = params[int(index)]
        out = {}
        for k, v in entry.items():
            if torch.is_tensor(v) and _is_dtensor(p) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape):
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            out[k] = v
        state[index] = out
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _raise_everywhere(error: BaseException | None) -> None:
    """Rank 0's error (or None) on every rank: all ranks fail together, none waits for the others."""
    from fastrlhf.checkpoint import NonFiniteLossError

    info = broadcast_object(None if error is None else (type(error).__name__, str(error)))
    if info is None:
        return
    if error is not None:
        raise error
    kind, message = info
    cls = NonFiniteLossError if kind == "NonFiniteLossError" else RuntimeError
    raise cls(f"rank 0 failed to save: {message}" if cls is RuntimeError else message)


def save_checkpoint(
    root,
    step: int,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping,
    state: dict,
    keep: int | None = 2,
) -> Path:
    """``fastrlhf.checkpoint.save_checkpoint`` for sharded modules: gathered, written by rank 0 only."""
    from fastrlhf import checkpoint

    full_modules = {name: full_model_state(m) for name, m in modules.items()}
    full_opts = {name: full_optimizer_state(o) for name, o in optimizers.items()}
    path, error = None, None
    if is_main():
        try:
            path = checkpoint.save_checkpoint(
                root, step, modules=full_modules, optimizers=full_opts, state=state, keep=keep
            )
        except Exception as e:  # reported to every rank below
            error = e
    _raise_everywhere(error)
    return Path(broadcast_object(str(path)))


def load_checkpoint(root, *, modules: Mapping[str, nn.Module], optimizers: Mapping) -> dict | None:
    """``fastrlhf.checkpoint.load_checkpoint`` into sharded modules; any world size's checkpoint."""
    from safetensors.torch import load_file

    from fastrlhf import checkpoint

    path = checkpoint.latest_checkpoint(root)
    if broadcast_object(str(path) if path else None) != (str(path) if path else None):
        raise RuntimeError(f"ranks see different checkpoints under {root}: is it on a shared filesystem?")
    if path is None:
        return None
    opt_states, blob = checkpoint.read_checkpoint(path, modules, optimizers)
    for name, module in modules.items():
        load_full_model_state(module, load_file(str(path / f"{name}.safetensors")))
    for name, opt in optimizers.items():
        load_full_optimizer_state(opt, opt_states[name])
    checkpoint._set_rng_state(blob["rng"])
    return blob["state"]


def _merged_lora_state(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft LoRA model's full state dict merged into its base weights, under the base model's names:
    W <- W + (alpha / r) * B @ A, as ``merge_and_unload`` computes it."""
    lora = model.peft_config[model.active_adapter]
    scaling = lora.lora_alpha / lora.r
    adapter = model.active_adapter
    prefix = "base_model.model."
    out = {}
    for key, value in full.items():
        if ".lora_A." in key or ".lora_B." in key or ".original_module." in key:
            continue
        name = key.removeprefix(prefix)
        if ".base_layer." in name:
            stem = key[: key.index(".base_layer.")]
            name = name.replace(".base_layer.", ".")
            if name.endswith(".weight") and f"{stem}.lora_A.{adapter}.weight" in full:
                a, b = full[f"{stem}.lora_A.{adapter}.weight"], full[f"{stem}.lora_B.{adapter}.weight"]
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        name = name.replace(f".modules_to_save.{adapter}.", ".")
        out[name] = value
    return out


def save_model(model: nn.Module, tokenizer, path) -> nn.Module:
    """``training.save_model`` for a sharded model: the full state dict gathered, ``save_pretrained``
    (safetensors) by rank 0 into ``path`` atomically; a LoRA model is saved merged into its base, as in one
    process (the in-memory model keeps its adapters). Returns ``model``."""
    from fastrlhf.models import unwrap

    full = full_model_state(model)
    error = None
    if is_main():
        try:
            if hasattr(model, "peft_config"):
                full = _merged_lora_state(model, full)
            path = Path(path)
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            base = unwrap(model)
            base.save_pretrained(tmp, state_dict=full, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            old = path.with_name(path.name + ".old")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        except Exception as e:
            error = e
    _raise_everywhere(error)
    barrier()
    return model


__all__ = [
    "full_model_state",
    "full_optimizer_state",
    "load_checkpoint",
    "load_full_model_state",
    "load_full_optimizer_state",
    "save_checkpoint",
    "save_model",
]
