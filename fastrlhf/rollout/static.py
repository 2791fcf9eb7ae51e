"""The static backend: own decode loop on a preallocated static KV cache, on the policy's own parameters.

One rollout:

1. The prompts are left-padded to a multiple of ``prompt_bucket`` (P) and the batch to a power-of-two
   bucket (B, extra rows repeat the last prompt and count as finished). The cache holds B x (P +
   max_new_tokens) positions; it is allocated by the first rollout of that shape and reused after.
2. Prefill: one forward over the prompts (eager), then the first token is sampled.
3. Decode: one step = forward of the last tokens at their cache position + ``sample_tokens`` (temperature,
   top-p, suppressed ids, EOS masked before ``min_new_tokens``) + bookkeeping, all on the device with
   static shapes. On CUDA each (batch bucket, cache length) step is captured once as a CUDA graph and
   replayed. Every ``compact_every`` steps the host reads how many rows are unfinished; when they fit a
   smaller bucket, their cache rows move to the front and the smaller bucket's step runs from then on.

Parameters are read in place by the graphs, so an optimizer step that updates them in place is seen by the
next rollout. A step that swaps a parameter's storage (``p.data = ...``) changes its address; the engine
compares addresses (and LoRA adapter switches) before every rollout and re-captures when they moved.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from fastrlhf.config import RolloutConfig
from fastrlhf.kernels import sample_tokens
from fastrlhf.models import position_ids, unwrap
from fastrlhf.rollout import Generation, SamplingParams, synchronize
from fastrlhf.rollout import kv_cache as kvc
from fastrlhf.rollout.hf import HFEngine

log = logging.getLogger("fastrlhf")


def batch_buckets(batch: int, smallest: int) -> list[int]:
    """Powers of two from ``smallest`` up to the first one >= ``batch``, largest first."""
    top = max(smallest, 1 << max(batch - 1, 0).bit_length())
    sizes, size = [], top
    while size >= smallest:
        sizes.append(size)
        size //= 2
    return sizes or [top]


def prompt_bucket_len(prompt_len: int, bucket: int) -> int:
    return max(bucket, math.ceil(prompt_len / bucket) * bucket)


def weights_fingerprint(model: nn.Module) -> tuple:
    """Parameter and buffer addresses and the LoRA adapter switches: what a captured graph bakes in."""
    tensors = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))
    adapters = tuple(
        bool(m.disable_adapters)
        for m in model.modules()
        if isinstance(getattr(m, "disable_adapters", None), bool)
    )
    return tensors, adapters


@dataclass
class _DecodeState:
    """The device tensors one rollout's decode steps read and write (fixed addresses for CUDA graphs)."""

    tokens_in: torch.Tensor  # [B, 1] the token each row feeds next
    positions: torch.Tensor  # [B, 1] its position id
    mask: torch.Tensor  # [B, L] attention mask over the cache
    rows: torch.Tensor  # [B] the output row each slot writes to
    finished: torch.Tensor  # [B] bool
    out: torch.Tensor  # [B, max_new] response tokens, pad-initialized
    step: torch.Tensor  # [1] index of the token being sampled
    cache_position: torch.Tensor  # [1] cache slot of the token being fed
    seed: torch.Tensor  # [1] sampling seed, advanced every step
    eos: torch.Tensor  # [E] EOS ids
    suppress: torch.Tensor | None  # [S] never-sampled ids
    suppress_ids: tuple[int, ...]  # the same on the host

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens_in, self.positions, self.mask, self.rows, self.finished, self.out, self.step,
                self.cache_position, self.seed]  # fmt: skip


@dataclass
class _Storage:
    """The KV cache of one (batch, cache length, dtype) shape, its batch-bucket views and their graphs."""

    key: tuple
    cache: object  # transformers StaticCache, batch = the largest bucket
    views: dict[int, object] = field(default_factory=dict)
    graphs: dict[tuple, torch.cuda.CUDAGraph] = field(default_factory=dict)
    state: _DecodeState | None = None


class StaticEngine:
    """Static-KV-cache generation with CUDA graphs on CUDA and eager steps elsewhere (see the module doc)."""

    name = "static"

    def __init__(self, cfg: RolloutConfig) -> None:
        self.cfg = cfg
        self._storage: _Storage | None = None
        self._fingerprint: tuple | None = None
        self._pool = None
        self._graphs_broken = False
        self._fallback = HFEngine()
        self._warned: set[str] = set()
        self.allocations = 0  # KV caches allocated so far
        self.captures = 0  # CUDA graphs captured so far
        self.step_shapes: set[tuple[int, int]] = set()  # (batch bucket, cache length) decode steps run

    # ------------------------------------------------------------------------------------------ interface
    def generate(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> Generation:
        base = unwrap(model)
        prompt_len = input_ids.shape[1]
        padded_len = prompt_bucket_len(prompt_len, self.cfg.prompt_bucket)
        cache_len = padded_len + params.max_new_tokens
        reason = kvc.unsupported_reason(base, cache_len)
        if reason is not None:
            if reason not in self._warned:
                log.warning("rollout.backend=static: %s; falling back to hf", reason)
                self._warned.add(reason)
            return self._fallback.generate(model, input_ids, attention_mask, params)
        if base.training:
            raise ValueError("static rollout needs the model in eval mode (gradient checkpointing off)")
        device = input_ids.device
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            tokens = self._generate(base, input_ids, attention_mask, params, padded_len, cache_len)
        synchronize(device)
        seconds = time.perf_counter() - t0
        kv_bytes = kvc.nbytes(self._storage.cache) if self._storage is not None else 0
        if not self.cfg.keep_cache:
            self.release()
        stats = {
            "rollout/graph_captures": float(self.captures),
            "rollout/cache_allocations": float(self.allocations),
        }
        return Generation(tokens, seconds, self.name, kv_bytes, stats)

    def release(self) -> None:
        self._storage = None
        self._pool = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------------- setup
    def _storage_for(self, base: nn.Module, batch: int, cache_len: int, dtype: torch.dtype) -> _Storage:
        key = (batch, cache_len, dtype, id(base))
        if self._storage is None or self._storage.key != key:
            self._storage = None  # free the old cache before allocating the new one
            self._storage = _Storage(key, kvc.new_cache(base, cache_len))
            self.allocations += 1
        fingerprint = weights_fingerprint(base)
        if self._fingerprint != fingerprint:
            self._storage.graphs.clear()  # parameters moved: captured graphs would read stale memory
            self._fingerprint = fingerprint
        return self._storage

    def _generate(
        self,
        base: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        params: SamplingParams,
        padded_len: int,
        cache_len: int,
    ) -> torch.Tensor:
        device = input_ids.device
        n, prompt_len = input_ids.shape
        buckets = batch_buckets(n, self.cfg.min_batch_bucket)
        big = buckets[0]
        storage = self._storage_for(base, big, cache_len, base.dtype)
        cache = storage.cache
        kvc.reset(cache)

        # Prompts left-padded to the bucket length; extra batch rows repeat the last prompt (never NaN).
        extra = [n - 1] * (big - n)
        order = torch.tensor(list(range(n)) + extra, device=device)
        ids = torch.full((big, padded_len), params.pad_token_id, dtype=torch.long, device=device)
        ids[:, padded_len - prompt_len :] = input_ids[order]
        mask = torch.zeros(big, cache_len, dtype=torch.long, device=device)
        mask[:, padded_len - prompt_len : padded_len] = attention_mask[order]
        prompt_positions = position_ids(mask[:, :padded_len])

        call = kvc.ModelCall(base)
        logits = self._prefill(call, cache, ids, mask, prompt_positions)
        state = self._decode_state(storage, big, cache_len, params, mask, prompt_positions, padded_len, n)
        self._sample_and_advance(logits, state, params, big)

        bucket = big
        views = {big: cache}
        for step in range(1, params.max_new_tokens):
            if step % self.cfg.compact_every == 1 or self.cfg.compact_every == 1:
                alive = int((~state.finished[:bucket]).sum())
                if alive == 0:
                    break
                smaller = min(b for b in buckets if b >= alive)
                if smaller < bucket:
                    self._compact(views[bucket], state, bucket, smaller)
                    if smaller not in storage.views:
                        storage.views[smaller] = kvc.batch_view(cache, smaller)
                    views[smaller] = storage.views[smaller]
                    kvc.follow_length(views[smaller], views[bucket])
                    bucket = smaller
            self._decode_step(storage, call, views[bucket], state, params, bucket, cache_len)
        out = state.out[:n]
        # A copy: the buffer is the next rollout's (and the captured graphs') output.
        return out[:, : _response_len(out, state.eos, params.max_new_tokens)].clone()

    def _prefill(self, call, cache, ids, mask, positions) -> torch.Tensor:
        """Last-position logits [B, V] of the prompts, written into the cache in chunks of rows."""
        big, padded_len = ids.shape
        cache_positions = torch.arange(padded_len, device=ids.device)
        if not getattr(cache.layers[0], "is_initialized", False):
            # The first forward allocates the cache at its batch: a one-token forward over every row does
            # it without the activations of a full prefill; the prefill below overwrites its position 0.
            first = torch.zeros_like(mask)
            first[:, 0] = 1
            call(ids[:, :1], first, torch.zeros_like(positions[:, :1]), cache, cache_positions[:1])
            kvc.reset(cache)
        rows = max(1, self.cfg.prefill_tokens // padded_len)
        if rows >= big:
            return call(ids, mask, positions, cache, cache_positions)
        logits = []
        for start in range(0, big, rows):
            stop = min(start + rows, big)
            part = kvc.batch_view(cache, stop - start, start)
            logits.append(
                call(ids[start:stop], mask[start:stop], positions[start:stop], part, cache_positions)
            )
        kvc.follow_length(cache, part)
        return torch.cat(logits)

    def _decode_state(
        self, storage: _Storage, big: int, cache_len: int, params: SamplingParams, mask: torch.Tensor,
        prompt_positions: torch.Tensor, padded_len: int, n: int,
    ) -> _DecodeState:  # fmt: skip
        """Fill the storage's decode tensors in place (their addresses are what the graphs captured)."""
        device = mask.device
        state = storage.state
        if state is None:
            suppress = torch.tensor(params.suppress_ids, dtype=torch.long, device=device)
            state = _DecodeState(
                tokens_in=torch.zeros(big, 1, dtype=torch.long, device=device),
                positions=torch.zeros(big, 1, dtype=torch.long, device=device),
                mask=torch.zeros(big, cache_len, dtype=torch.long, device=device),
                rows=torch.zeros(big, dtype=torch.long, device=device),
                finished=torch.zeros(big, dtype=torch.bool, device=device),
                out=torch.zeros(big, params.max_new_tokens, dtype=torch.long, device=device),
                step=torch.zeros(1, dtype=torch.long, device=device),
                cache_position=torch.zeros(1, dtype=torch.long, device=device),
                seed=torch.zeros(1, dtype=torch.long, device=device),
                eos=torch.tensor([params.eos_token_id], dtype=torch.long, device=device),
                suppress=suppress if suppress.numel() else None,
                suppress_ids=params.suppress_ids,
            )
            storage.state, storage.graphs = state, {}
        elif state.suppress_ids != params.suppress_ids:
            suppress = torch.tensor(params.suppress_ids, dtype=torch.long, device=device)
            state.suppress = suppress if suppress.numel() else None
            state.suppress_ids = params.suppress_ids
            storage.graphs.clear()
        state.eos.fill_(params.eos_token_id)
        state.mask.copy_(mask)
        state.positions.copy_(prompt_positions[:, -1:] + 1)
        state.rows.copy_(torch.arange(big, device=device))
        state.finished.zero_()
        state.finished[n:] = True  # batch-padding rows
        state.out.fill_(params.pad_token_id)
        state.step.zero_()
        state.cache_position.fill_(padded_len)
        # Drawn from torch's generator, so runs seeded with torch.manual_seed repeat.
        state.seed.copy_(torch.randint(0, 2**62, (1,)))
        return state

    # --------------------------------------------------------------------------------------- decode steps
    def _sample_and_advance(
        self, logits: torch.Tensor, state: _DecodeState, params: SamplingParams, bucket: int
    ) -> None:
        """Sample token ``step`` of every slot from ``logits`` [b, V], record it, advance the counters."""
        eos = state.eos
        if params.min_new_tokens > 0:
            early = state.step < params.min_new_tokens  # [1], on the device
            logits = logits.clone()
            logits[:, eos] = torch.where(early, -math.inf, logits[:, eos])
        ids, _ = sample_tokens(
            logits,
            temperature=params.temperature,
            top_p=params.top_p,
            suppress_ids=state.suppress,
            seed=state.seed,
            greedy=params.greedy,
        )
        finished = state.finished[:bucket]
        ids = torch.where(finished, params.pad_token_id, ids)
        state.out.index_put_((state.rows[:bucket], state.step.expand(bucket)), ids)
        finished |= (ids[:, None] == eos).any(-1)
        state.tokens_in[:bucket, 0] = ids
        state.step.add_(1)
        state.seed.add_(1)

    def _step_body(self, call, cache, state: _DecodeState, params: SamplingParams, bucket: int) -> None:
        mask = state.mask[:bucket]
        mask.index_fill_(1, state.cache_position, 1)
        logits = call(state.tokens_in[:bucket], mask, state.positions[:bucket], cache, state.cache_position)
        self._sample_and_advance(logits, state, params, bucket)
        state.positions[:bucket] += 1
        state.cache_position.add_(1)

    def _decode_step(
        self, storage: _Storage, call, cache, state: _DecodeState, params: SamplingParams, bucket: int,
        cache_len: int,
    ) -> None:  # fmt: skip
        self.step_shapes.add((bucket, cache_len))
        if not self._graphs_wanted(state):
            self._step_body(call, cache, state, params, bucket)
            return
        key = (bucket, params)
        graph = storage.graphs.get(key)
        if graph is None:
            graph = self._capture(call, cache, state, params, bucket)
            if graph is None:
                self._step_body(call, cache, state, params, bucket)
                return
            storage.graphs[key] = graph
        graph.replay()

    def _graphs_wanted(self, state: _DecodeState) -> bool:
        return self.cfg.cuda_graphs and state.mask.is_cuda and not self._graphs_broken

    def _capture(self, call, cache, state: _DecodeState, params: SamplingParams, bucket: int):
        """Capture one decode step of ``bucket`` rows; the state is restored, so the replay that follows is
        the real step. None (and eager from then on) if this model's forward cannot be captured."""
        saved = [t.clone() for t in state.tensors()]
        saved_len = kvc.length_state(cache)

        def restore() -> None:
            for t, s in zip(state.tensors(), saved, strict=True):
                t.copy_(s)
            kvc.restore_length(cache, saved_len)

        def body() -> None:
            self._step_body(call, cache, state, params, bucket)

        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = capture_cuda_graph(body, restore, self._pool)
        except Exception as e:  # a host sync or unsupported op inside the model's forward
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            restore()
            self._graphs_broken = True
            log.warning("rollout.backend=static: CUDA graph capture failed (%s); decoding eagerly", e)
            return None
        self.captures += 1
        return graph

    def _compact(self, cache, state: _DecodeState, bucket: int, smaller: int) -> None:
        """Move the unfinished slots to the front so that the first ``smaller`` slots hold all of them."""
        finished = state.finished[:bucket]
        order = torch.argsort(finished.to(torch.int8), stable=True)[:smaller]  # unfinished first
        kvc.reorder_rows(cache, order)
        for t in (state.tokens_in, state.positions, state.mask, state.rows, state.finished):
            t[:smaller] = t[:bucket].index_select(0, order)


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


def _response_len(out: torch.Tensor, eos: torch.Tensor, max_new: int) -> int:
    """Columns ``generate`` would return: up to the step at which the last row emitted EOS."""
    is_eos = torch.isin(out, eos)
    has_eos = is_eos.any(-1)
    if not bool(has_eos.all()):
        return max_new
    return int(is_eos.int().argmax(-1).max()) + 1
