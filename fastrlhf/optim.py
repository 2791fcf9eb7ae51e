"""Optimizers: the AdamW a run uses (:func:`make_optimizer`), its warmup, and stochastic rounding (SR) for
pure-bf16 training with bitsandbytes' 8-bit optimizers.

fastrlhf keeps full-model weights in bf16 with no fp32 master copy. bitsandbytes computes the optimizer
update in fp32 but stores the new weight with round-to-nearest, so an update smaller than half a bf16
ulp (2^-9 to 2^-8 of the weight, bf16 keeps 8 significant bits) is discarded every step: with PPO
learning rates around 1e-6 the policy barely moves. Stochastic rounding (Revisiting BFloat16 Training,
arXiv 2010.06192) rounds x, lying between bf16 neighbours lo < x < hi in magnitude, up with probability
(|x| - lo) / (hi - lo), so E[round(x)] = x and small updates accumulate in expectation.

bf16 is the upper half of fp32, so SR is: add a uniform integer in [0, 2^16) to the int32 bit pattern and
keep the upper 16 bits. The bit pattern is sign-magnitude, so the carry always rounds the magnitude up;
by symmetry the probabilities are equally right for negatives.

Memory: `stochastic_round_` works in chunks (default 2^24 elements, 5 bytes of temporaries each, so
80 MiB at most) over a flat view. The optimizer mixin handles one parameter at a time and holds an
fp32 copy of that parameter and of its gradient while bnb updates it: transient memory is 8 bytes x the
largest single bf16 parameter (e.g. 2 GiB for a 128k x 2048 embedding), on top of bnb's own.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor, nn

from fastrlhf.config import ModelConfig, OptimConfig

try:  # bitsandbytes is a Linux-only dependency; stochastic_round_ works without it.
    import bitsandbytes as bnb
except ImportError:  # pragma: no cover
    bnb = None

__all__ = [
    "AdamW8bitSR",
    "PagedAdamW8bitSR",
    "StochasticRounding",
    "make_optimizer",
    "stochastic_round_",
    "trainable_parameters",
    "warmup_schedule",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 24


@torch.no_grad()
def stochastic_round_(
    target: Tensor,
    source: Tensor,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Write float32 `source` into bfloat16 `target` (same shape) with stochastic rounding, in place.

    Values exactly representable in bf16 (including ±0 and ±inf) are copied exactly, NaN stays NaN.
    Finite values above the largest bf16 (~3.39e38) round to inf with the SR probability.
    `generator` must live on the tensors' device; None uses the global RNG. On CPU the random stream
    does not depend on `chunk_size`. Returns `target`.
    """
    if source.dtype != torch.float32 or target.dtype != torch.bfloat16:
        raise TypeError(f"expected float32 source and bfloat16 target, got {source.dtype} -> {target.dtype}")
    if source.shape != target.shape:
        raise ValueError(f"shape mismatch: source {tuple(source.shape)} vs target {tuple(target.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # A non-contiguous target has no flat view to write through: round into a buffer, then copy.
    out = (
        target if target.is_contiguous() else torch.empty_like(target, memory_format=torch.contiguous_format)
    )
    src_bits = source.reshape(-1).view(torch.int32)
    out_bits = out.view(-1).view(torch.int16)
    src_flat = src_bits.view(torch.float32)
    for start in range(0, src_bits.numel(), chunk_size):
        end = min(start + chunk_size, src_bits.numel())
        noise = torch.randint(
            0, 1 << 16, (end - start,), dtype=torch.int32, device=source.device, generator=generator
        )
        # In place on `noise` so one chunk needs a single int32 temporary. Exact bf16 values have zero low
        # bits, so the carry never reaches the upper half and they stay exact; finite magnitudes stay
        # below 0x7F80FFFF, so the int32 add cannot overflow.
        noise.add_(src_bits[start:end])
        noise.bitwise_right_shift_(16)  # arithmetic shift: the int16 cast below keeps the exact bits
        out_bits[start:end].copy_(noise)
        # NaNs whose payload sits in the low bits would carry into inf (or wrap, for negative NaNs).
        out.view(-1)[start:end].masked_fill_(src_flat[start:end].isnan(), float("nan"))
    if out is not target:
        target.copy_(out)
    return target


class StochasticRounding:
    """Mixin giving a bitsandbytes `Optimizer8bit` subclass stochastic rounding for bf16 parameters.

    Use as the first base: `class X(StochasticRounding, bnb.optim.AdamW8bit)`. For each bf16 param, bnb's
    `update_step` runs on an fp32 copy of the weight and gradient (so its kernel computes exactly what it
    would for an fp32 param, with the same 8-bit states), and the result is stochastically rounded back
    into the original bf16 storage. Other dtypes go straight to bnb. Why this swap is safe in bnb 0.45+:
    - state is keyed by the Parameter object, which is unchanged; only `.data`/`.grad` are swapped;
    - `init_state` (run on the bf16 param before `update_step`) sizes states by shape/numel with explicit
      dtypes (uint8 / fp32, absmax fp32), so they fit the fp32 copy; paged buffers are prefetched by key;
    - bnb's CUDA kernels pick the parameter's dtype from the *gradient's* dtype, so the gradient must be
      fp32 too: an fp32 weight with a bf16 gradient would be read as the wrong type;
    - bnb's `p.data = p.data.contiguous()` is a no-op on our contiguous copy; we read the result back
      from `p.data` after the call in case a bnb version replaces it.
    `generator` (on the params' device) makes the rounding reproducible; None uses the global RNG.
    """

    def __init__(self, *args, generator: torch.Generator | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sr_generator = generator

    @torch.no_grad()
    def update_step(self, group: dict, p: Tensor, gindex: int, pindex: int) -> None:
        if p.dtype != torch.bfloat16:
            super().update_step(group, p, gindex, pindex)
            return
        if not p.data.is_contiguous():  # bnb makes it contiguous too; keep one bf16 storage to write into
            p.data = p.data.contiguous()
        weight, grad = p.data, p.grad
        grad32 = grad.to(torch.float32, memory_format=torch.contiguous_format)
        # Drop the bf16 grad before changing p's dtype, then attach the matching fp32 one.
        p.grad = None
        p.data = weight.to(torch.float32, memory_format=torch.contiguous_format)
        p.grad = grad32
        try:
            super().update_step(group, p, gindex, pindex)
            stochastic_round_(weight, p.data, self.sr_generator)
        finally:
            # Restore even on error so the model never keeps an fp32 tensor in a bf16 slot.
            p.grad = None
            p.data = weight
            p.grad = grad


if bnb is not None:

    class AdamW8bitSR(StochasticRounding, bnb.optim.AdamW8bit):
        """`bnb.optim.AdamW8bit` with stochastic rounding of bf16 weights (extra kwarg: `generator`)."""

    class PagedAdamW8bitSR(StochasticRounding, bnb.optim.PagedAdamW8bit):
        """`bnb.optim.PagedAdamW8bit` with stochastic rounding of bf16 weights (extra kwarg: `generator`)."""


def make_optimizer(params: list[nn.Parameter], optim: OptimConfig, cfg: ModelConfig, device: torch.device):
    """AdamW: bitsandbytes' paged 8-bit on CUDA by default, torch's otherwise.

    The 8-bit optimizers write bf16 weights back with stochastic rounding (above): with no fp32 master
    copy, round-to-nearest would drop every update smaller than ~1/256 of a weight. Under torchrun they run
    on each process's FSDP2 shard (``fastrlhf.distributed.optim``).
    """
    kind = cfg.optimizer
    if kind == "auto":
        eight_bit = device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
        kind = "paged_adamw8bit" if eight_bit else "adamw"
    kwargs = {"lr": optim.lr, "weight_decay": optim.weight_decay, "eps": optim.adam_eps}
    if kind == "adamw":
        low_precision = {p.dtype for p in params} & {torch.bfloat16, torch.float16}
        if low_precision:
            log.warning(
                "torch AdamW on %s weights rounds updates smaller than ~1/256 of a weight away; the 8-bit "
                "optimizers (bitsandbytes) round stochastically, or use LoRA or float32 weights",
                ", ".join(sorted(str(d) for d in low_precision)),
            )
        return torch.optim.AdamW(params, **kwargs, foreach=device.type == "cuda")
    if kind in ("adamw8bit", "paged_adamw8bit"):
        from fastrlhf import distributed

        cls = PagedAdamW8bitSR if kind == "paged_adamw8bit" else AdamW8bitSR
        if distributed.active():  # bitsandbytes takes plain tensors: run it on each rank's local shards
            cls = distributed.local_shard_optimizer(cls)
        return cls(params, **kwargs)
    raise ValueError(
        f"model_config.optimizer must be auto, adamw, adamw8bit or paged_adamw8bit, got {kind!r}"
    )


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the configured lr, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
