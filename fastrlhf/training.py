"""What every stage shares: a run directory, seeding, final model saving, and the end-of-run plot."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from fastrlhf import distributed
from fastrlhf.checkpoint import (
    NonFiniteLossError,
    check_finite,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fastrlhf.config import ModelConfig, OptimConfig
from fastrlhf.metrics import MetricsLogger, plot_metrics
from fastrlhf.optim import make_optimizer, trainable_parameters, warmup_schedule

log = logging.getLogger("fastrlhf")
T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def shuffled_batches(items: Sequence[T], batch_size: int, *, seed: int, epoch: int) -> list[list[T]]:
    """The epoch's batches in a deterministic order (seed, epoch), so a resumed run sees the same data.

    The last incomplete batch is dropped, so every optimizer step averages over the same number of items.
    """
    order = list(range(len(items)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    n = len(order) // batch_size
    return [[items[i] for i in order[b * batch_size : (b + 1) * batch_size]] for b in range(n)]


class StepBatches:
    """The batch of any optimizer step: ``shuffled_batches`` of the step's epoch, reshuffled only when the
    epoch changes, so a resumed run at step k sees the batch an uninterrupted run saw."""

    def __init__(self, items: Sequence[T], batch_size: int, *, seed: int) -> None:
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.per_epoch = len(items) // batch_size
        self._epoch, self._batches = -1, []

    def __getitem__(self, step: int) -> list[T]:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = shuffled_batches(self.items, self.batch_size, seed=self.seed, epoch=epoch)
        return self._batches[index]


def micro_batches(batch: Sequence[T], micro_batch_size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(batch), micro_batch_size):
        yield batch[i : i + micro_batch_size]


def check_batch_sizes(batch_size: int, micro_batch_size: int, n_items: int, what: str) -> None:
    if batch_size <= 0 or micro_batch_size <= 0:
        raise ValueError("batch_size and micro_batch_size must be positive")
    if batch_size % micro_batch_size:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of micro_batch_size ({micro_batch_size})"
        )
    if n_items < batch_size:
        raise ValueError(f"{n_items} {what} are fewer than one batch of batch_size={batch_size}")


def optimizer_step(optimizer, scheduler, params: list[nn.Parameter], max_grad_norm: float, step: int) -> None:
    """Clip the global gradient norm (when max_grad_norm > 0), step, advance the schedule, clear gradients.

    A NaN or inf gradient raises :class:`NonFiniteLossError` before the step, so the weights stay finite.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    check_finite("gradient norm", norm, step)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def naming_last_checkpoint(ckpt_dir: Path) -> Iterator[None]:
    """Add the last good checkpoint to a NaN/inf error, so the message says where to resume from."""
    try:
        yield
    except NonFiniteLossError as e:
        raise NonFiniteLossError(
            f"{e}; last good checkpoint: {latest_checkpoint(ckpt_dir) or 'none yet'}"
        ) from e


MicroLoss = Callable[[Sequence[T], Sequence[T]], tuple[torch.Tensor, dict[str, float]]]
"""(micro-batch, the whole batch) -> (the micro-batch's share of the batch loss, metrics summed over the
micro-batches of the batch)."""


def supervised_loop(
    phase: str,
    model: nn.Module,
    data: Sequence[T],
    micro_loss: MicroLoss,
    *,
    batch_size: int,
    micro_batch_size: int,
    epochs: int,
    optim: OptimConfig,
    model_config: ModelConfig,
    out: Path,
    logger: MetricsLogger,
    save_every: int = 0,
    seed: int = 0,
) -> int:
    """The SFT and reward-model training loop: deterministic shuffled batches, gradient accumulation over
    micro-batches, warmup, clipping, a NaN check before every backward, and resumable checkpoints in
    ``out/checkpoints`` (a run started again resumes where it stopped). Returns the number of steps.

    Under torchrun the model is sharded (FSDP2) and each rank runs the micro-batches of its share of every
    batch; ``micro_loss`` gets the whole batch, so its normalization stays global, and the ranks' gradients
    and metrics are summed."""
    check_batch_sizes(batch_size, micro_batch_size, len(data), f"{phase} examples")
    if batch_size % distributed.world().size:
        raise ValueError(
            f"batch_size ({batch_size}) must divide evenly over {distributed.world().size} processes"
        )
    distributed.shard(model)
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, optim, model_config, device)
    scheduler = warmup_schedule(optimizer, optim.warmup_steps)
    ckpt_dir = out / "checkpoints"
    parts = {"modules": {"model": model}, "optimizers": {"optimizer": optimizer}}
    state = load_checkpoint(ckpt_dir, **parts)
    step = 0
    if state is not None:
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        log.info("resumed %s from step %d", phase, step)
    batches = StepBatches(data, batch_size, seed=seed)
    total = batches.per_epoch * epochs
    model.train()
    bar = tqdm(total=total, initial=step, desc=phase, disable=None)
    while step < total:
        batch = batches[step]
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        for micro in micro_batches(distributed.local_rows(batch), micro_batch_size):
            loss, micro_metrics = micro_loss(micro, batch)
            with naming_last_checkpoint(ckpt_dir):  # micro_loss has synchronized already
                check_finite(f"{phase} loss", distributed.sum(loss.detach()), step)  # every rank stops
            loss.backward()
            for key, value in micro_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value
        if distributed.active():
            metrics = {k: float(v) for k, v in distributed.metrics_sum(metrics).items()}
        with naming_last_checkpoint(ckpt_dir):
            optimizer_step(optimizer, scheduler, params, optim.max_grad_norm, step)
        step += 1
        logger.log(
            phase, step, metrics | {"lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        )
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
        if save_every and step % save_every == 0 and step < total:
            save_checkpoint(
                ckpt_dir, step, **parts, state={"step": step, "scheduler": scheduler.state_dict()}
            )
    bar.close()
    return step


def save_model(model: nn.Module, tokenizer, path: str | Path) -> nn.Module:
    """``save_pretrained`` (safetensors) of a trained model and its tokenizer, written atomically; returns the
    model to keep using.

    A LoRA model is merged into its base in place (no second copy in memory) and the merged model is returned,
    so transformers loads the result without peft. A 4-bit base cannot be merged losslessly: its adapters are
    saved instead, and transformers loads them through peft.
    """
    if distributed.active():  # gathered, written once by rank 0
        from fastrlhf.distributed.checkpoint import save_model as save_sharded

        return save_sharded(model, tokenizer, path)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "merge_and_unload") and not getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return model


def finish_run(out: Path, summary: dict) -> None:
    """Write summary.json and the training curves next to metrics.jsonl (rank 0 only under torchrun)."""
    if not distributed.is_main():
        return
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        plot_metrics(metrics, out / "curves.png")
