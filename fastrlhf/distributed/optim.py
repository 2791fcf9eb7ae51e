"""bitsandbytes' 8-bit AdamW (with stochastic rounding) on each rank's FSDP2 shard.

bitsandbytes optimizers take plain tensors; FSDP2 makes every parameter a DTensor. :class:`LocalShards` hands
the bnb optimizer one plain Parameter per sharded parameter, aliasing this rank's local shard (the storage
FSDP2 all-gathers from), and before each step the local shard of the reduced gradient. AdamW is elementwise
except for bnb's blockwise quantization of the two moments (blocks of 256 consecutive elements of the
flattened tensor, one absmax each), so:

- where every rank's shard starts on a 256-element boundary of the flattened parameter (rows per rank x row
  length a multiple of 256: most LLM matrices at 2 to 8 ranks), each rank quantizes exactly the blocks one
  process would, and the update is the one-process update;
- elsewhere a rank's last block ends with its shard: still 8-bit AdamW, on slightly different blocks;
- the 8-bit-or-32-bit choice (``min_8bit_size``, 4096 elements) is made on the full parameter, as one process
  makes it, not on the shard. Stochastic rounding draws from each rank's own generator.

Checkpoints do not depend on the world size: :meth:`LocalShards.full_state_dict` returns a one-process
``state_dict()`` (bnb's layout), which ``fastrlhf.checkpoint`` writes as usual, and
:meth:`LocalShards.load_full_state_dict` loads one saved at any world size, one process included. Where the
shards are aligned, the 8-bit codes and the per-block absmax move as they are (gathered, or sliced on
load), so a resume continues bit for bit. Elsewhere the moments are dequantized, gathered (or sliced) and
quantized again on the other blocks: one more rounding of the moments to 8 bits, of the size every step
makes. (Re-quantizing is not exact even on the same blocks: the signed map has +1 but not -1, so a block
whose largest first moment is negative comes back with a 0.7% smaller absmax.) Memory: one full moment at
a time on each rank while saving or loading, as the weights' gather already needs.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

from fastrlhf.distributed.runtime import is_main

BLOCK = 256  # bitsandbytes' block size for the 8-bit optimizer states
_STATE_KEYS = {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}


class LocalShards:
    """Mixin (first base) running a bitsandbytes ``Optimizer2State`` (Adam family) on FSDP2 local shards.

    ``params`` are the model's (DTensor) parameters, one flat list; ``zero_grad`` clears their gradients.
    """

    def __init__(self, params, *args, **kwargs) -> None:
        self.sharded = list(params)
        with torch.no_grad():
            self.proxies = [nn.Parameter(_local(p), requires_grad=p.requires_grad) for p in self.sharded]
        self._full_numel = {id(q): p.numel() for q, p in zip(self.proxies, self.sharded, strict=True)}
        super().__init__(self.proxies, *args, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        for proxy, p in zip(self.proxies, self.sharded, strict=True):
            proxy.data = _local(p)  # FSDP2 may hold a new tensor over the same shard (after a state load)
            has_grad = p.grad is not None and proxy.numel() > 0  # a rank may hold no rows of a tiny tensor
            proxy.grad = _local(p.grad) if has_grad else None
        try:
            return super().step(closure)
        finally:
            for proxy in self.proxies:
                proxy.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.sharded:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def get_config(self, gindex: int, pindex: int, group: dict) -> dict:
        config = super().get_config(gindex, pindex, group)
        full = self._full_numel[id(self.param_groups[gindex]["params"][pindex])]
        # bnb compares the tensor it holds (the shard) with min_8bit_size; decide on the full parameter.
        config["min_8bit_size"] = 0 if full >= config["min_8bit_size"] else math.inf
        return config

    def _eight_bit(self, index: int) -> bool:
        return self.args.optim_bits == 8 and self.sharded[index].numel() >= self.args.min_8bit_size

    # ---------------------------------------------------------------------------------------- checkpoints

    def full_state_dict(self) -> dict[str, Any] | None:
        """A one-process ``state_dict()`` of this optimizer, on rank 0 (None elsewhere); a collective."""
        key = self._FSDP_WRAPPED_QUANT_STATE_KEY
        device = self.proxies[0].device
        steps = torch.tensor(
            [self.state[q]["step"] if self.state.get(q) else 0 for q in self.proxies],
            dtype=torch.int64,
            device=device,
        )
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)  # empty shards have none
        state = {}
        for index, proxy in enumerate(self.proxies):
            step = int(steps[index])
            if step == 0:
                continue
            local = self.state.get(proxy) or {}
            if set(local) - _STATE_KEYS - {"step"}:
                raise NotImplementedError(f"sharded checkpoints of bnb state {sorted(local)}")
            quant = self._gather_moments(index, local)
            if is_main():
                state[index] = {"step": step, key: {k: v.cpu() for k, v in quant.items()}}
        groups = self.state_dict()["param_groups"]
        return {"state": state, "param_groups": groups} if is_main() else None

    def _gather_moments(self, index: int, local: dict) -> dict[str, Tensor]:
        """Parameter ``index``'s moments in one process's layout (meaningful on rank 0); a collective."""
        proxy, p = self.proxies[index], self.sharded[index]
        if not self._eight_bit(index):
            return {f"state{i}": _gather(self._moment(local, i, proxy, False), p) for i in (1, 2)}
        quant = {}
        offsets = _shard_offsets(proxy)
        for i, name in ((1, "dynamic"), (2, "udynamic")):
            qmap = self.name2qmap[name].to(proxy.device)
            if _aligned(offsets):  # the one-process codes and absmax, moved as they are
                codes = local.get(
                    f"state{i}", torch.zeros(proxy.shape, dtype=torch.uint8, device=proxy.device)
                )
                absmax = local.get(f"absmax{i}", proxy.new_zeros(_blocks(proxy.numel()), dtype=torch.float32))
                codes, absmax = _gather(codes, p), _gather_blocks(absmax)
            else:  # other blocks than one process's: quantize the dequantized moment on those
                codes, absmax = _quantize(_gather(self._moment(local, i, proxy, True), p), qmap)
            quant |= {f"state{i}": codes, f"qmap{i}": qmap, f"absmax{i}": absmax}
        return quant

    def load_full_state_dict(self, saved: dict[str, Any]) -> None:
        """Load a one-process ``state_dict()`` (every rank holds it) into this rank's shards; a collective."""
        key = self._FSDP_WRAPPED_QUANT_STATE_KEY
        state = {}
        for index, entry in saved["state"].items():
            index = int(index)
            proxy = self.proxies[index]
            quant = entry.get(key) if isinstance(entry, dict) else None
            if quant is None or "state1" not in quant:
                raise ValueError(
                    f"the checkpoint's optimizer state for parameter {index} is not bitsandbytes' "
                    f"(keys {sorted(entry)}): resume with the optimizer it was saved with"
                )
            if ("absmax1" in quant) != self._eight_bit(index):
                raise ValueError(f"parameter {index}: the checkpoint's 8-bit/32-bit state does not match")
            local = self._slice_moments(index, quant)
            if proxy.numel() > 0:
                state[index] = {"step": entry["step"], key: local}
        self.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    def _slice_moments(self, index: int, quant: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's part of parameter ``index``'s one-process moments, in its own layout."""
        proxy, p = self.proxies[index], self.sharded[index]
        if not self._eight_bit(index):
            return {f"state{i}": _slice(quant[f"state{i}"].float(), p).contiguous() for i in (1, 2)}
        local = {}
        offsets = _shard_offsets(proxy)
        start = offsets[torch.distributed.get_rank()]
        for i, name in ((1, "dynamic"), (2, "udynamic")):
            qmap = self.name2qmap[name].to(proxy.device)
            if _aligned(offsets):
                codes = _slice(quant[f"state{i}"], p).contiguous()
                first = start // BLOCK
                absmax = quant[f"absmax{i}"][first : first + _blocks(proxy.numel())].to(proxy.device)
            else:
                moment = _dequantize(quant[f"state{i}"], quant[f"absmax{i}"], quant[f"qmap{i}"])
                codes, absmax = _quantize(_slice(moment, p), qmap)
            local |= {f"state{i}": codes, f"qmap{i}": qmap, f"absmax{i}": absmax.contiguous()}
        return local

    def _moment(self, local: dict, i: int, proxy: Tensor, eight: bool) -> Tensor:
        """Moment ``i`` of this rank's shard in fp32, shaped like the shard (empty when it holds none)."""
        if not local:
            return torch.zeros(proxy.shape, dtype=torch.float32, device=proxy.device)
        if eight:
            return _dequantize(local[f"state{i}"], local[f"absmax{i}"], local[f"qmap{i}"]).view(proxy.shape)
        return local[f"state{i}"].float()


def _blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _shard_offsets(shard: Tensor) -> list[int]:
    """Where each rank's shard starts in the flattened parameter (FSDP2 shards dim 0 in rank order), and
    the parameter's size last; a collective."""
    sizes = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(sizes, shard.numel())
    return [sum(sizes[:r]) for r in range(len(sizes) + 1)]


def _aligned(offsets: list[int]) -> bool:
    """Every non-empty shard starts on a block boundary: its blocks are one process's."""
    return all(start % BLOCK == 0 for start, end in itertools.pairwise(offsets) if end > start)


def _gather_blocks(absmax: Tensor) -> Tensor:
    """Concatenate every rank's per-block absmax, in rank order; a collective."""
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, absmax.cpu())
    return torch.cat(parts).to(absmax.device)


def _slice(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``full``, sharded like parameter ``like``."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(like.device).view(like.shape)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _gather(shard: Tensor, like: Tensor) -> Tensor:
    """The full tensor from every rank's shard of a tensor sharded like parameter ``like``; a collective."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        shard.contiguous(), like.device_mesh, like.placements, run_check=False, shape=like.shape,
        stride=like.stride(),
    ).full_tensor()  # fmt: skip


def _quantize(x: Tensor, qmap: Tensor) -> tuple[Tensor, Tensor]:
    import bitsandbytes.functional as F

    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.uint8, device=x.device), x.new_empty(0)
    codes, quant_state = F.quantize_blockwise(x.contiguous(), code=qmap, blocksize=BLOCK)
    return codes, quant_state.absmax


def _dequantize(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    import bitsandbytes.functional as F

    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    return F.dequantize_blockwise(
        codes, absmax=absmax.to(codes.device), code=qmap.to(codes.device), blocksize=BLOCK
    )


@functools.cache
def local_shard_optimizer(cls: type) -> type:
    """``cls`` (a bitsandbytes optimizer class) running on FSDP2 local shards."""
    return type(f"Sharded{cls.__name__}", (LocalShards, cls), {"__doc__": f"{cls.__name__} on local shards."})


__all__ = ["LocalShards", "local_shard_optimizer"]
