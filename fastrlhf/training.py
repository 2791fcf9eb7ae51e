"""What every stage shares: a run directory, seeding, final model saving, and the end-of-run plot."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fastrlhf.metrics import plot_metrics

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


def save_model(model: nn.Module, tokenizer, path: str | Path) -> nn.Module:
    """``save_pretrained`` (safetensors) of a trained model and its tokenizer, written atomically; returns the
    model to keep using.

    A LoRA model is merged into its base in place (no second copy in memory) and the merged model is returned,
    so transformers loads the result without peft. A 4-bit base cannot be merged losslessly: its adapters are
    saved instead, and transformers loads them through peft.
    """
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
    """Write summary.json and the training curves next to metrics.jsonl."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        plot_metrics(metrics, out / "curves.png")
