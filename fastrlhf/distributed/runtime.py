"""The process group and the few collectives the stages need.

``init()`` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``) and
starts the default process group: nccl on CUDA, gloo on CPU. Without ``WORLD_SIZE`` (or with
``WORLD_SIZE=1``) it does nothing, and every helper below returns exactly what the one-process code computed
before: the single-GPU path is unchanged.

The statistics helpers (``sum``, ``mean``, ``masked_mean``, ``masked_var``, ``masked_whiten`` ...) return the
value the one process would compute on the concatenation of all ranks' tensors. Every rank must call them in
the same order (they are collectives).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fastrlhf.kernels import masked_mean as _masked_mean
from fastrlhf.kernels import masked_var as _masked_var
from fastrlhf.kernels import masked_whiten as _masked_whiten

log = logging.getLogger("fastrlhf")
T = TypeVar("T")

_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``size == 1``: not distributed (nothing was initialized)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mesh: Any = None  # the 1-D DeviceMesh FSDP2 shards over (None when not distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_WORLD = World()


def init(timeout_s: float | None = None) -> World:
    """Join the torchrun job (idempotent); a no-op returning ``World()`` outside torchrun or at one process.

    The collective timeout is ``timeout_s``, or ``FASTRLHF_DIST_TIMEOUT`` seconds (default 1800): a rank that
    dies makes the others fail after it instead of hanging forever (torchrun also stops the whole job when
    one worker exits with an error).
    """
    global _WORLD
    if _WORLD.size > 1:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _WORLD
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)  # so that "cuda" (models.default_device) means this rank's GPU
    device_type = "cuda" if cuda else "cpu"
    if not dist.is_initialized():
        timeout = timeout_s if timeout_s is not None else float(os.environ.get("FASTRLHF_DIST_TIMEOUT", 1800))
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout)
        )  # fmt: skip
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (size,))
    _WORLD = World(rank=rank, size=size, local_rank=local_rank, mesh=mesh)
    if rank == 0:
        log.info("distributed: %d processes, backend %s", size, dist.get_backend())
    else:  # one log, from rank 0: the other ranks report warnings and errors only
        logging.getLogger("fastrlhf").setLevel(logging.WARNING)
    return _WORLD


def shutdown() -> None:
    """Leave the job (tests and callers that run several jobs in one process)."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def world() -> World:
    return _WORLD


def active() -> bool:
    """True when this process is one of several (``init`` ran under torchrun with WORLD_SIZE > 1)."""
    return _WORLD.size > 1


def is_main() -> bool:
    return _WORLD.rank == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; small control data only)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def local_rows(items: Sequence[T]) -> list[T]:
    """This rank's contiguous block of a global batch (rank r of W gets rows r*n/W .. (r+1)*n/W - 1).

    Contiguous so that the samples of a GRPO group stay on one rank; ``len(items)`` must divide evenly."""
    if not active():
        return list(items)
    n, w = len(items), _WORLD.size
    if n % w:
        raise ValueError(f"a batch of {n} cannot be split evenly over {w} processes")
    k = n // w
    return list(items[_WORLD.rank * k : (_WORLD.rank + 1) * k])


def seed_step(seed: int, step: int) -> None:
    """Reseed torch's RNG from (seed, step, rank) at the start of a step when distributed, so every rank
    samples differently and a resumed run repeats the interrupted one whatever RNG state it restored."""
    if active():
        torch.manual_seed((seed * 1_000_003 + step) * 4099 + _WORLD.rank)


# ------------------------------------------------------------------------------------------- collectives


def _reduce(x: torch.Tensor | float, op) -> torch.Tensor:
    t = torch.as_tensor(x).detach().clone()
    if not t.is_floating_point():
        t = t.double()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = t.to(device)
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def sum(x: torch.Tensor | float) -> torch.Tensor:
    """The sum of ``x`` (a scalar or any tensor, elementwise) over the ranks; ``x`` itself when alone."""
    if not active():
        return torch.as_tensor(x)
    return _reduce(x, dist.ReduceOp.SUM)


def max(x: torch.Tensor | float) -> torch.Tensor:
    """The elementwise maximum of ``x`` over the ranks."""
    if not active():
        return torch.as_tensor(x)
    return _reduce(x, dist.ReduceOp.MAX)


def count(n: int) -> int:
    """A per-rank count summed over the ranks (e.g. episodes or tokens)."""
    return int(sum(float(n))) if active() else n


def mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of every element of ``x`` over all ranks."""
    if not active():
        return x.mean()
    total = sum(torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)]))
    return total[0] / total[1]


def std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation of every element of ``x`` over all ranks (two passes)."""
    if not active():
        return x.std()
    ones = torch.ones_like(x, dtype=torch.bool)
    return masked_var(x, ones).sqrt()


def _global_moments(x: torch.Tensor, mask: torch.Tensor, correction: int):
    """(n, mean, var) over the counted elements of every rank: two all-reduces, the second of squared
    deviations from the global mean (no sum-of-squares cancellation), as ``masked_var`` computes them."""
    counted = mask != 0
    xs = torch.where(counted, x.float(), 0.0)
    first = sum(torch.stack([xs.sum(), counted.sum(dtype=torch.float32)]))
    n = first[1]
    m = first[0] / n.clamp(min=1)
    centered = torch.where(counted, xs - m, 0.0)
    second = sum(torch.stack([centered.sum(), centered.square().sum()]))
    m = m + second[0] / n.clamp(min=1)  # refine the mean by its deviations' sum, as the one-process path
    m2 = second[1] - second[0] ** 2 / n.clamp(min=1)
    var = m2.clamp(min=0) / (n - correction).clamp(min=1)
    return n, m, var


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``fastrlhf.kernels.masked_mean`` over the counted elements of all ranks."""
    if not active():
        return _masked_mean(x, mask)
    counted = mask != 0
    total = sum(torch.stack([torch.where(counted, x.float(), 0.0).sum(), counted.sum(dtype=torch.float32)]))
    return total[0] / total[1].clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """``fastrlhf.kernels.masked_var`` over the counted elements of all ranks."""
    if not active():
        return _masked_var(x, mask, unbiased=unbiased)
    return _global_moments(x, mask, int(bool(unbiased)))[2]


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``fastrlhf.kernels.masked_whiten`` with the mean and variance of all ranks' counted elements, so
    advantages are normalized as if the whole rollout batch were in one process."""
    if not active():
        return _masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    _, m, var = _global_moments(x, mask, 1)
    denom = var + eps
    y = (x.float() - m) * torch.where(denom > 0, torch.rsqrt(denom.clamp(min=_TINY)), 0.0)
    if not shift_mean:
        y = y + m
    return torch.where(mask != 0, y, 0.0)


def whiten_advantages(out, mask: torch.Tensor):
    """``fastrlhf.kernels.ppo_advantages(..., whiten=not active())``'s result with its advantages whitened
    over every rank's counted tokens when distributed (the fused kernel whitens one batch only)."""
    if not active():
        return out
    return out._replace(advantages=masked_whiten(out.advantages, mask))


def metrics_sum(values: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    """Sum every entry of a dict of scalars over the ranks in one all-reduce."""
    if not active() or not values:
        return {k: torch.as_tensor(v) for k, v in values.items()}
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().cpu() for k in keys])
    total = sum(stacked)
    return {k: total[i] for i, k in enumerate(keys)}


def job_costs(values: dict[str, float]) -> dict[str, float]:
    """Time, memory and throughput of the whole job from every rank's own: a ``*tokens_per_second`` is
    summed (the ranks' rates: they work at once), anything else (``time/*``, ``memory_gib/*``) is the
    maximum (the slowest rank sets the step's time, the fullest device its memory)."""
    if not active() or not values:
        return dict(values)
    summed = sorted(k for k in values if k.endswith("tokens_per_second"))
    maxed = sorted(k for k in values if k not in summed)
    out = {k: float(v) for k, v in metrics_sum({k: values[k] for k in summed}).items()}
    if maxed:
        top = max(torch.tensor([float(values[k]) for k in maxed], dtype=torch.float64))  # over ranks
        out |= {k: float(top[i]) for i, k in enumerate(maxed)}
    return out


__all__ = [
    "World",
    "active",
    "barrier",
    "broadcast_object",
    "count",
    "init",
    "is_main",
    "job_costs",
    "local_rows",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "max",
    "mean",
    "metrics_sum",
    "seed_step",
    "shutdown",
    "std",
    "sum",
    "whiten_advantages",
    "world",
]
