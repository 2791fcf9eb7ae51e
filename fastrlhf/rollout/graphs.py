"""CUDA graphs of the static backend's decode step: how one is captured, and what decides that a captured
graph went stale.

A graph replays fixed device addresses. Parameters updated in place by the optimizer (what torch optimizers
do) keep their addresses, so the next rollout's replay reads the new weights; a parameter whose storage was
swapped (``p.data = ...``, a re-created module, a LoRA adapter switched on or off) is seen through
``weights_fingerprint``, and the engine captures again.
"""

from __future__ import annotations

import torch
from torch import nn


def weights_fingerprint(model: nn.Module) -> tuple:
    """Parameter and buffer addresses and the LoRA adapter switches: what a captured graph bakes in."""
    tensors = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))
    adapters = tuple(
        bool(m.disable_adapters)
        for m in model.modules()
        if isinstance(getattr(m, "disable_adapters", None), bool)
    )
    return tensors, adapters


def capture_cuda_graph(body, restore, pool) -> torch.cuda.CUDAGraph:
    """Warm ``body`` up on a side stream (as ``torch.cuda.graphs`` asks), undo it, capture it, undo the
    capture's host-side effects: the graph's first replay is then the step itself."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        body()
    restore()
    return graph
