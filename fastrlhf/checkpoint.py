"""Atomic training-state checkpoints: an interrupted run resumes where it stopped, a bad step never
overwrites the last good state.

Layout under ``root``::

    step-000120/          a complete checkpoint (directories with this name are only ever made by rename)
        policy.safetensors    one file per module (safetensors, shared/tied weights stored once)
        optimizers.pt         {name: optimizer.state_dict()}
        state.pt              {"step", "state": <caller's state>, "rng": <RNG states>}
    step-000140/          written by 2 processes under torchrun: each its own shards
        policy.rank-00000-of-00002.safetensors, policy.rank-00001-of-00002.safetensors
        optimizers.rank-00000-of-00002.pt, optimizers.rank-00001-of-00002.pt
        state.pt
    latest                the name of the newest checkpoint, replaced atomically

Either layout resumes at any number of processes (``fastrlhf.distributed.checkpoint``).

A save writes into ``step-000140.tmp-XXXX/``, fsyncs every file, renames the directory to its final name
and only then points ``latest`` at it, so a crash or an exception at any moment leaves ``latest`` naming a
complete checkpoint. Leftover ``*.tmp-*`` directories are never read and are removed by the next save
(re-saving an existing step moves the old copy to ``*.old-*`` until the new one is in place).
One process writes a given ``root`` at a time.

Everything that is not a weight is loaded with ``torch.load(weights_only=True)``: no pickled code runs on
resume. The caller's ``state`` must therefore hold only tensors, numbers, strings, None, and lists / tuples /
dicts of them (``scheduler.state_dict()`` of torch's schedulers qualifies); :func:`save_checkpoint` checks
this when saving, not when a resume would discover it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model

LATEST = "latest"
_COMPLETE = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^step-\d+\.(tmp|old)-")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class NonFiniteLossError(RuntimeError):
    """A loss (or weight) became NaN/inf; the message names the last good checkpoint to resume from."""


def check_finite(
    name: str, value: torch.Tensor | float, step: int, checkpoint: str | Path | None = None
) -> None:
    """Raise :class:`NonFiniteLossError` if ``value`` has a NaN or inf.

    The message reads ``"loss is nan at step 12; last good checkpoint: runs/x/step-000010"``, or stops after
    the step when ``checkpoint`` is None (so a caller may append its own). On CUDA this synchronizes; call it
    on values that are being logged (and so synchronized) anyway.
    """
    t = torch.as_tensor(value).detach()
    if bool(torch.isfinite(t).all()):
        return
    sign = "-" if t.numel() == 1 and float(t) < 0 else ""
    kind = "nan" if bool(torch.isnan(t).any()) else f"{sign}inf"
    verb = "is" if t.numel() == 1 else "contains"
    where = f"; last good checkpoint: {checkpoint}" if checkpoint else ""
    raise NonFiniteLossError(f"{name} {verb} {kind} at step {step}{where}")


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (``root/step-000123``)."""
    return Path(root) / f"step-{step:06d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when nothing was saved."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    path = root / name
    if path.is_dir():
        return path
    # Re-saving an existing step moves the old copy aside for a moment; a crash then leaves it there.
    aside = next(iter(sorted(root.glob(f"{name}.old-*"))), None)
    if aside is not None:
        os.rename(aside, path)
        return path
    raise FileNotFoundError(f"{root / LATEST} names {name}, which does not exist")


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    modules: Mapping[str, torch.nn.Module | Mapping[str, torch.Tensor]],
    optimizers: Mapping[str, torch.optim.Optimizer | Mapping[str, Any]],
    state: dict[str, Any],
    keep: int | None = 2,
) -> Path:
    """Save modules, optimizers, ``state`` and the RNG states as ``root/step-<step>``; return its path.

    Refuses (:class:`NonFiniteLossError`) to save weights that hold NaN/inf, so a diverged model never
    becomes the checkpoint to resume from. Afterwards only the ``keep`` newest checkpoints up to ``step``
    remain (None keeps all); checkpoints of later steps, from a run resumed at an earlier one, are left alone.
    A module or optimizer may also be given as its state dict. Under torchrun every rank writes its shards
    (``fastrlhf.distributed.checkpoint``).
    """
    if _sharded(modules.values()):  # under torchrun: every rank writes its shards
        from fastrlhf.distributed import checkpoint as distributed

        return distributed.save_checkpoint(
            root, step, modules=modules, optimizers=optimizers, state=state, keep=keep
        )
    tmp, previous = begin_save(root, step, [*modules, *optimizers], keep)
    try:
        for name, module in modules.items():
            _check_finite_weights(name, module, step, previous)
            if isinstance(module, Mapping):  # a state dict
                save_file(dict(module), str(tmp / f"{name}.safetensors"))
            else:  # save_model stores a tensor shared by several names once; save_file rejects it.
                save_model(module, str(tmp / f"{name}.safetensors"))
        torch.save(
            {name: opt if isinstance(opt, Mapping) else opt.state_dict() for name, opt in optimizers.items()},
            tmp / "optimizers.pt",
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_save(root, tmp, step, state, keep)


def begin_save(root: str | Path, step: int, names: list[str], keep: int | None) -> tuple[Path, Path | None]:
    """Check the entry names, clear leftovers of interrupted saves and make the temporary directory that
    the checkpoint of ``step`` is written into; returns it and the last complete checkpoint (or None)."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 (or None to keep all), got {keep}")
    for name in names:
        if not _NAME.match(name):
            raise ValueError(f"checkpoint entry name {name!r} must be a plain file name ([A-Za-z0-9_.-])")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        previous = latest_checkpoint(root)  # also recovers a copy an interrupted re-save moved aside
    except FileNotFoundError:
        previous = None  # `latest` names a deleted directory; this save repairs it
    for leftover in root.iterdir():
        if _LEFTOVER.match(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide checkpoints from other users.
    tmp = root / f"{checkpoint_dir(root, step).name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp, previous


def finish_save(root: str | Path, tmp: Path, step: int, state: dict[str, Any], keep: int | None) -> Path:
    """Add ``state.pt`` to the files written into ``tmp``, fsync them, rename ``tmp`` to the checkpoint of
    ``step``, point ``latest`` at it and prune; on any error ``tmp`` is removed and ``latest`` unchanged."""
    root, final, aside = Path(root), checkpoint_dir(root, step), None
    try:
        torch.save({"step": step, "state": state, "rng": _rng_state()}, tmp / "state.pt")
        try:
            torch.load(tmp / "state.pt", weights_only=True)
        except Exception as e:
            raise TypeError(
                f"checkpoint state must be loadable with torch.load(weights_only=True): {e}"
            ) from e
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if final.exists():
            aside = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, final.name)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if keep is not None:
        _prune(root, step, keep)
    return final


def load_checkpoint(
    root: str | Path,
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
) -> dict[str, Any] | None:
    """Restore the latest checkpoint into ``modules`` and ``optimizers`` and the RNGs; return the saved state.

    Returns None when ``root`` holds no checkpoint. The names given must be exactly those saved, and every
    module weight must match (strict), so a resume with a changed model fails instead of half-loading.
    """
    if _sharded(modules.values()):
        from fastrlhf.distributed import checkpoint as distributed

        return distributed.load_checkpoint(root, modules=modules, optimizers=optimizers)
    path = latest_checkpoint(root)
    if path is None:
        return None
    opt_states, blob = read_checkpoint(path, modules, optimizers)
    if shard_count(path):  # written by a run under torchrun: merged to one process's state
        from fastrlhf.distributed import checkpoint as distributed

        distributed.load_merged(path, modules, optimizers, opt_states)
    else:
        for name, module in modules.items():
            load_model(module, str(path / f"{name}.safetensors"), strict=True)
        for name, opt in optimizers.items():
            opt.load_state_dict(opt_states[name])  # moves each state tensor to its parameter's device
    _set_rng_state(blob["rng"])
    return blob["state"]


def read_checkpoint(
    path: Path, modules: Mapping[str, Any], optimizers: Mapping[str, Any], ranks: list[int] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The optimizer states and ``state.pt`` of checkpoint ``path``, once its module and optimizer names
    are checked against those given (weights are read by the caller). A sharded checkpoint's optimizer
    states are ``{rank: state}`` for the ``ranks`` asked for (all by default)."""
    saved = {p.name.split(".")[0] for p in path.glob("*.safetensors")}
    if saved != set(modules):
        raise RuntimeError(f"{path} holds modules {sorted(saved)}, but {sorted(modules)} were given")
    shards = shard_count(path)
    if shards:
        per_rank = {
            r: torch.load(
                path / f"optimizers.{shard_suffix(r, shards)}.pt", weights_only=True, map_location="cpu"
            )
            for r in (range(shards) if ranks is None else ranks)
        }
        names = next(iter(per_rank.values()))
        opt_states = {name: {r: states[name] for r, states in per_rank.items()} for name in names}
    else:
        opt_states = torch.load(path / "optimizers.pt", weights_only=True, map_location="cpu")
    if set(opt_states) != set(optimizers):
        raise RuntimeError(
            f"{path} holds optimizers {sorted(opt_states)}, but {sorted(optimizers)} were given"
        )
    return opt_states, torch.load(path / "state.pt", weights_only=True, map_location="cpu")


def shard_suffix(rank: int, world_size: int) -> str:
    """The part of a sharded checkpoint's file names that says whose shard it is."""
    return f"rank-{rank:05d}-of-{world_size:05d}"


def shard_count(path: Path) -> int:
    """How many processes wrote checkpoint ``path`` (0: one process, in full files)."""
    names = [p.name for p in path.glob("optimizers.rank-*-of-*.pt")]
    return int(names[0].split("-of-")[1].split(".")[0]) if names else 0


def _sharded(modules) -> bool:
    """Whether these are modules of a run under torchrun (FSDP2-sharded; see ``fastrlhf.distributed``)."""
    from fastrlhf.distributed import active

    return active() and any(isinstance(m, torch.nn.Module) for m in modules)


def _check_finite_weights(
    name: str, module: torch.nn.Module | Mapping[str, torch.Tensor], step: int, previous: Path | None
) -> None:
    # A float32 sum is non-finite iff some element is (sane weights cannot overflow it), and unlike
    # isfinite(t).all() it allocates nothing the size of the tensor.
    sums = [
        (k, t.detach().sum(dtype=torch.float32))
        for k, t in (module if isinstance(module, Mapping) else module.state_dict()).items()
        if t.is_floating_point()
    ]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for k, s in sums:
        by_device.setdefault(s.device, []).append((k, s))
    for group in by_device.values():
        finite = torch.isfinite(torch.stack([s for _, s in group])).cpu()  # one sync per device
        if not bool(finite.all()):
            bad = group[int((~finite).nonzero()[0])][0]
            where = f"last good checkpoint: {previous}" if previous else "no checkpoint was saved yet"
            raise NonFiniteLossError(f"{name}.{bad} holds nan/inf at step {step}; not saving it. {where}")


def _rng_state() -> dict[str, Any]:
    rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # numpy arrays are not weights_only-loadable; a tensor of the same words is.
        rng["numpy"] = (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        )
    return rng


def _set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        if len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(rng['cuda'])} devices, this machine has "
                f"{torch.cuda.device_count()}; CUDA sampling will not repeat the interrupted run",
                stacklevel=3,
            )
    if "numpy" in rng:
        import numpy as np

        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk, so a rename never exposes unwritten data."""
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync(root)


def _prune(root: Path, step: int, keep: int) -> None:
    done = []
    for p in root.iterdir():
        m = _COMPLETE.match(p.name)
        if m and p.is_dir() and int(m.group(1)) <= step:
            done.append((int(m.group(1)), p))
    done.sort(reverse=True)  # the checkpoint just written (largest step <= step) is always kept
    for _, p in done[keep:]:
        shutil.rmtree(p)
