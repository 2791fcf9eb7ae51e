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

Checkpoints: each rank saves its own ``state_dict()`` (its shards, bnb's layout), and a resume at the same
world size loads it back as it is. At another world size, :func:`merge_shard_states` makes one process's
``state_dict()`` of the saved ranks' and :meth:`LocalShards.load_full_state_dict` slices that for this
rank (one process loads it directly). Where the shards are aligned, on both sides, the 8-bit codes and the
per-block absmax move as they are, so such a resume continues bit for bit. Elsewhere the moments are
dequantized, concatenated (or sliced) and quantized again on the other blocks: one more rounding of the
moments to 8 bits, of the size every step makes. (Re-quantizing is not exact even on the same blocks: the
signed map has +1 but not -1, so a block whose largest first moment is negative comes back with a 0.7%
smaller absmax.) Memory: one full moment at a time on each rank while loading at another world size.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

BLOCK = 256  # bitsandbytes' block size for the 8-bit optimizer states
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"  # bnb's state_dict() wraps each state under it


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

    def load_full_state_dict(self, saved: dict[str, Any]) -> None:
        """Load a one-process ``state_dict()`` (every rank holds it) into this rank's shards."""
        key = QUANT_STATE_KEY
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
        offsets = _shard_offsets(p.shape, torch.distributed.get_world_size())
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


def _blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _shard_offsets(shape: torch.Size, world_size: int) -> list[int]:
    """Where each rank's shard starts in the flattened parameter of ``shape`` (FSDP2 splits dim 0 in rank
    order), and the parameter's size last."""
    from fastrlhf.distributed.fsdp import shard_rows

    row = math.prod(shape[1:])
    sizes = [r * row for r in shard_rows(shape[0] if len(shape) else 1, world_size)]
    return [sum(sizes[:r]) for r in range(world_size + 1)]


def _aligned(offsets: list[int]) -> bool:
    """Every non-empty shard starts on a block boundary: its blocks are one process's."""
    return all(start % BLOCK == 0 for start, end in itertools.pairwise(offsets) if end > start)


def _slice(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``full``, sharded like parameter ``like``."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(like.device).view(like.shape)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


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


def merge_shard_states(states: list[dict[str, Any]], shapes: list[torch.Size]) -> dict[str, Any]:
    """One process's ``state_dict()`` from every rank's :class:`LocalShards` ``state_dict()`` (rank order),
    for parameters of full ``shapes``; no collectives (it reads saved files). Where the ranks' shards were
    aligned the 8-bit codes and absmax are concatenated as they are; elsewhere each rank's moments are
    dequantized, concatenated and quantized again on one process's blocks."""
    key = QUANT_STATE_KEY
    merged = {}
    for index, shape in enumerate(shapes):
        entries = [s["state"].get(index) for s in states]
        if all(e is None for e in entries):
            continue
        offsets = _shard_offsets(shape, len(states))
        sizes = [end - start for start, end in itertools.pairwise(offsets)]
        quants = [e[key] if e else None for e in entries]
        present = next(q for q in quants if q is not None)
        step = max(e["step"] for e in entries if e)

        full = {}
        for i in (1, 2):
            if "absmax1" not in present:  # 32-bit moments
                full[f"state{i}"] = torch.cat(_pieces(quants, sizes, f"state{i}", torch.zeros)).view(shape)
                continue
            qmap = present[f"qmap{i}"]
            if _aligned(offsets):  # one process's blocks: codes and absmax as they are
                codes = torch.cat(
                    _pieces(quants, sizes, f"state{i}", lambda n: torch.zeros(n, dtype=torch.uint8))
                )
                absmax = torch.cat(_pieces(quants, sizes, f"absmax{i}", lambda n: torch.zeros(_blocks(n))))
            else:
                moments = [
                    _dequantize(q[f"state{i}"], q[f"absmax{i}"], q[f"qmap{i}"]).reshape(-1)
                    if q
                    else torch.zeros(n)
                    for q, n in zip(quants, sizes, strict=True)
                ]
                codes, absmax = _quantize(torch.cat(moments), qmap)
            full |= {f"state{i}": codes.view(shape), f"qmap{i}": qmap, f"absmax{i}": absmax}
        merged[index] = {"step": step, key: full}
    return {"state": merged, "param_groups": states[0]["param_groups"]}


def _pieces(quants: list, sizes: list[int], field: str, empty) -> list[Tensor]:
    """Every rank's ``field``, flat, in rank order; ``empty(numel)`` for a rank that saved none."""
    return [q[field].reshape(-1) if q else empty(n) for q, n in zip(quants, sizes, strict=True)]


@functools.cache
def local_shard_optimizer(cls: type) -> type:
    """``cls`` (a bitsandbytes optimizer class) running on FSDP2 local shards."""
    return type(f"Sharded{cls.__name__}", (LocalShards, cls), {"__doc__": f"{cls.__name__} on local shards."})


__all__ = ["LocalShards", "local_shard_optimizer"]
