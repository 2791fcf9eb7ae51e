"""Data-parallel training over several processes (``torchrun``) on PyTorch FSDP2.

    torchrun --nproc_per_node 8 -m fastrlhf.cli ppo --config run.yaml

The stages call this package at a few points; without torchrun (or with one process) every call is a no-op
or returns what the one-process code computes, so the single-GPU path is unchanged:

- ``init()`` joins the job (nccl on CUDA, gloo on CPU); ``world()`` says which rank this is;
- ``shard(model)`` / ``shard_ppo_models`` shard the models with FSDP2 (``fastrlhf.distributed.fsdp``);
- ``local_rows(batch)`` is this rank's share of a global batch;
- ``local_shard_optimizer(cls)`` runs a bitsandbytes optimizer on each rank's shards
  (``fastrlhf.distributed.optim``);
- ``sum`` / ``max`` / ``count`` / ``mean`` / ``std`` / ``masked_mean`` / ``masked_var`` / ``masked_whiten`` /
  ``whiten_advantages`` give the global values (token counts, whitening, the KL controller's KL, metrics),
  ``job_costs`` the job's time, memory and throughput;
- checkpoints are written by every rank, its shards, and resume at any world size; exported models are
  gathered and written once by rank 0 (``fastrlhf.distributed.checkpoint``, called by
  ``fastrlhf.checkpoint`` and ``training.save_model``).
"""

from fastrlhf.distributed.fsdp import gathered, reshard, rollout_config, shard, shard_ppo_models
from fastrlhf.distributed.optim import local_shard_optimizer
from fastrlhf.distributed.runtime import (
    World,
    active,
    barrier,
    broadcast_object,
    count,
    init,
    is_main,
    job_costs,
    local_rows,
    masked_mean,
    masked_var,
    masked_whiten,
    max,
    mean,
    metrics_sum,
    seed_step,
    shutdown,
    std,
    sum,
    whiten_advantages,
    world,
)

__all__ = [
    "World",
    "active",
    "barrier",
    "broadcast_object",
    "count",
    "gathered",
    "init",
    "is_main",
    "job_costs",
    "local_rows",
    "local_shard_optimizer",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "max",
    "mean",
    "metrics_sum",
    "reshard",
    "rollout_config",
    "seed_step",
    "shard",
    "shard_ppo_models",
    "shutdown",
    "std",
    "sum",
    "whiten_advantages",
    "world",
]
