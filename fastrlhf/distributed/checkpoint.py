"""Checkpoints and exported models of a sharded run.

A resumable checkpoint keeps ``fastrlhf.checkpoint``'s directory and its atomicity, with every rank writing
its own shards (``policy.rank-00001-of-00008.safetensors``, ``optimizers.rank-00001-of-00008.pt``): rank 0
makes the temporary directory, every rank writes and fsyncs its files, and once all have, rank 0 adds
``state.pt``, renames the directory and points ``latest`` at it. No rank holds more than its shards while
saving; a rank that fails (or dies) leaves a temporary directory that is never read.

A resume at the same world size loads each rank's files back as they are. At another world size (one
process included), every rank merges the saved shards into one process's state (weights and torch AdamW
moments concatenated along dim 0, FSDP2's split; bitsandbytes' 8-bit states as
``fastrlhf.distributed.optim`` says) and keeps its part: each rank then reads every file, one module at a
time. A one-process checkpoint resumes under torchrun the same way. Exported models (``save_model``) are
gathered to full tensors and written once, by rank 0, as ``save_pretrained`` directories.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastrlhf.distributed.optim import QUANT_STATE_KEY, LocalShards, merge_shard_states
from fastrlhf.distributed.runtime import barrier, broadcast_object, is_main, world


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


def load_full_model_state(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, local: bool = False
) -> None:
    """Copy a full state dict (every rank holds it) into a sharded module's local shards; strict. With
    ``local`` the state holds this rank's shards already (:func:`local_model_state`, same world size)."""
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
                if not local:
                    src = distribute_tensor(
                        src.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None
                    ).to_local()
                t.to_local().copy_(src)
            else:
                t.copy_(src.to(t.device, t.dtype))


def local_model_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """This rank's part of the module's state dict, on the CPU (a DTensor's local shard, any other tensor
    whole; a tied tensor under one name), and the names of the sharded ones."""
    aliases = _aliases(module)
    out, sharded = {}, []
    for name, t in module.state_dict().items():
        if aliases[name] != name:
            continue
        if _is_dtensor(t):
            t = t.to_local()
            sharded.append(name)
        out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out, sharded


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's ``optimizer.state_dict()``, every state tensor its local shard (no collectives)."""
    sd = optimizer.state_dict()
    if isinstance(optimizer, LocalShards):  # bitsandbytes' own layout, on plain tensors already
        return sd
    state = {}
    for index, entry in sd["state"].items():
        state[index] = {k: v.to_local() if _is_dtensor(v) else v for k, v in entry.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def merge_model_shards(files: list[Path]) -> dict[str, torch.Tensor]:
    """One process's state dict from every rank's safetensors file (rank order): sharded tensors
    concatenated along dim 0 (FSDP2's split), the others taken from rank 0."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    parts = [load_file(str(f)) for f in files]
    with safe_open(str(files[0]), "pt") as f:
        sharded = set(json.loads(f.metadata()["sharded"]))
    return {k: torch.cat([p[k] for p in parts]) if k in sharded else v for k, v in parts[0].items()}


def merge_optimizer_shards(states: list[dict[str, Any]], params: list[torch.Tensor]) -> dict[str, Any]:
    """One process's ``state_dict()`` from every rank's (rank order) of an optimizer over ``params`` (any
    tensors of the full shapes): torch's per-parameter tensors concatenated along dim 0, bitsandbytes'
    through :func:`~fastrlhf.distributed.optim.merge_shard_states`."""
    if any(QUANT_STATE_KEY in entry for s in states for entry in s["state"].values()):
        return merge_shard_states(states, [p.shape for p in params])
    state = {}
    for index in states[0]["state"]:
        entries = [s["state"][index] for s in states]
        state[index] = {
            k: torch.cat([e[k] for e in entries]) if torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in entries[0].items()
        }
    return {"state": state, "param_groups": states[0]["param_groups"]}


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


def _raise_from_any(error: BaseException | None, cleanup: Path | None = None) -> None:
    """Every rank's error (or None): if any rank failed, rank 0 removes ``cleanup`` and all ranks raise (a
    rank its own error, the others one naming the first rank that failed), so none waits for the others."""
    from fastrlhf.checkpoint import NonFiniteLossError

    errors = [None] * world().size
    torch.distributed.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
    failed = [(rank, info) for rank, info in enumerate(errors) if info is not None]
    if not failed:
        return
    if is_main() and cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    if error is not None:
        raise error
    rank, (kind, message) = failed[0]
    if kind == "NonFiniteLossError":
        raise NonFiniteLossError(message)
    raise RuntimeError(f"rank {rank} failed to save: {message}")


def save_checkpoint(
    root,
    step: int,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping,
    state: dict,
    keep: int | None = 2,
) -> Path:
    """``fastrlhf.checkpoint.save_checkpoint`` for sharded modules: every rank writes its shards into the
    directory rank 0 made; once all have, rank 0 completes it (``state.pt``, rename, ``latest``)."""
    from safetensors.torch import save_file

    from fastrlhf import checkpoint

    rank, size = world().rank, world().size
    begun, error = None, None
    if is_main():
        try:
            begun = checkpoint.begin_save(root, step, [*modules, *optimizers], keep)
        except Exception as e:  # reported to every rank below
            error = e
    _raise_from_any(error)
    tmp, previous = broadcast_object(begun and (str(begun[0]), begun[1] and str(begun[1])))
    tmp, suffix, error = Path(tmp), checkpoint.shard_suffix(rank, size), None
    try:
        for name, module in modules.items():
            local, sharded = local_model_state(module)
            checkpoint._check_finite_weights(name, local, step, previous)
            file = tmp / f"{name}.{suffix}.safetensors"
            save_file(local, str(file), metadata={"sharded": json.dumps(sharded)})
            checkpoint._fsync(file)
        file = tmp / f"optimizers.{suffix}.pt"
        torch.save({name: local_optimizer_state(opt) for name, opt in optimizers.items()}, file)
        checkpoint._fsync(file)
    except Exception as e:
        error = e
    _raise_from_any(error, cleanup=tmp)
    path, error = None, None
    if is_main():
        try:
            path = checkpoint.finish_save(root, tmp, step, state, keep)
        except Exception as e:
            error = e
    _raise_from_any(error)
    return Path(broadcast_object(str(path)))


def load_checkpoint(root, *, modules: Mapping[str, nn.Module], optimizers: Mapping) -> dict | None:
    """``fastrlhf.checkpoint.load_checkpoint`` into sharded modules, from a checkpoint of any world size."""
    from safetensors.torch import load_file

    from fastrlhf import checkpoint

    path = checkpoint.latest_checkpoint(root)
    if broadcast_object(str(path) if path else None) != (str(path) if path else None):
        raise RuntimeError(f"ranks see different checkpoints under {root}: is it on a shared filesystem?")
    if path is None:
        return None
    rank, size = world().rank, world().size
    shards = checkpoint.shard_count(path)
    own = shards == size  # this rank's own files, loaded as they are; else all are merged
    opt_states, blob = checkpoint.read_checkpoint(path, modules, optimizers, [rank] if own else None)
    if own:
        suffix = checkpoint.shard_suffix(rank, size)
        for name, module in modules.items():
            load_full_model_state(module, load_file(str(path / f"{name}.{suffix}.safetensors")), local=True)
        for name, opt in optimizers.items():
            load_local_optimizer_state(opt, opt_states[name][rank])
    else:
        if not shards:
            full = {name: load_file(str(path / f"{name}.safetensors")) for name in modules}
        else:
            full = {name: merge_model_shards(_shard_files(path, name, shards)) for name in modules}
        for name, module in modules.items():
            load_full_model_state(module, full[name])
        for name, opt in optimizers.items():
            saved = opt_states[name]
            if shards:
                params = [p for g in opt.param_groups for p in g["params"]]
                saved = merge_optimizer_shards([saved[r] for r in range(shards)], params)
            load_full_optimizer_state(opt, saved)
    checkpoint._set_rng_state(blob["rng"])
    return blob["state"]


def load_merged(path: Path, modules: Mapping[str, nn.Module], optimizers: Mapping, opt_states: dict) -> None:
    """Load sharded checkpoint ``path`` into one process's (unsharded) modules and optimizers;
    ``opt_states`` holds every rank's optimizer states (``fastrlhf.checkpoint.read_checkpoint``)."""
    from fastrlhf import checkpoint

    shards = checkpoint.shard_count(path)
    for name, module in modules.items():
        load_full_model_state(module, merge_model_shards(_shard_files(path, name, shards)))
    for name, opt in optimizers.items():
        params = [p for g in opt.param_groups for p in g["params"]]
        opt.load_state_dict(merge_optimizer_shards([opt_states[name][r] for r in range(shards)], params))


def _shard_files(path: Path, name: str, shards: int) -> list[Path]:
    from fastrlhf import checkpoint

    return [path / f"{name}.{checkpoint.shard_suffix(r, shards)}.safetensors" for r in range(shards)]


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, local: Mapping[str, Any]) -> None:
    """Load this rank's saved ``state_dict()`` (:func:`local_optimizer_state`, same world size) back."""
    from torch.distributed.tensor import DTensor

    if isinstance(optimizer, LocalShards):
        optimizer.load_state_dict(local)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in local["state"].items():
        p = params[int(index)]
        state[index] = {
            k: DTensor.from_local(
                v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
            if torch.is_tensor(v) and _is_dtensor(p) and v.dim() > 0
            else v
            for k, v in entry.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": local["param_groups"]})


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
    _raise_from_any(error)
    barrier()
    return model


__all__ = [
    "full_model_state",
    "load_checkpoint",
    "load_full_model_state",
    "load_full_optimizer_state",
    "load_merged",
    "local_model_state",
    "local_optimizer_state",
    "merge_model_shards",
    "merge_optimizer_shards",
    "save_checkpoint",
    "save_model",
]
