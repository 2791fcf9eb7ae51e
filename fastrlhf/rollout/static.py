"""The static backend: own decode loop on a preallocated static KV cache, on the policy's own parameters.

One rollout:

1. The prompts are left-padded to a multiple of ``prompt_bucket`` (P) and the batch to a power-of-two
   bucket (B, extra rows repeat the last prompt and count as finished). The cache holds B x (P +
   max_new_tokens) positions of the model's KV heads; it is allocated by the first rollout and reused by
   every later one that fits in it (more left padding, or the first rows of the cache). One that does not
   fit replaces it by a cache of the larger of both shapes, so allocations stop at the largest shape.
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
from fastrlhf.rollout.graphs import capture_cuda_graph, weights_fingerprint
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
    """The KV cache of one model, ``batch`` x ``cache_len``, its batch-bucket views and their graphs."""

    key: tuple  # (dtype, id of the model)
    batch: int
    cache_len: int
    cache: object  # transformers StaticCache
    views: dict[int, object] = field(default_factory=dict)
    graphs: dict[tuple, torch.cuda.CUDAGraph] = field(default_factory=dict)
    state: _DecodeState | None = None

    def fits(self, key: tuple, batch: int, cache_len: int) -> bool:
        return self.key == key and batch <= self.batch and cache_len <= self.cache_len

    def view(self, batch: int):
        """The cache's first ``batch`` rows (one view object per size: the graphs captured its counters)."""
        if batch == self.batch:
            return self.cache
        if batch not in self.views:
            self.views[batch] = kvc.batch_view(self.cache, batch)
        return self.views[batch]


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
            raise ValueError(
                "static rollout needs model.eval() (gradient checkpointing acts in training only)"
            )
        device = input_ids.device
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            tokens = self._generate(base, input_ids, attention_mask, params, cache_len)
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
    def _storage_for(self, base: nn.Module, batch: int, cache_len: int, device: torch.device) -> _Storage:
        """The held cache if ``batch`` x ``cache_len`` fits in it, else a new one of the larger shape."""
        key = (base.dtype, id(base))
        old = self._storage
        if old is None or not old.fits(key, batch, cache_len):
            if old is not None and old.key == key:
                grown = max(old.batch, batch), max(old.cache_len, cache_len)
                if kvc.unsupported_reason(base, grown[1]) is None:  # a sliding window can cap the length
                    batch, cache_len = grown
            self._storage = old = None  # free the old cache before allocating the new one
            self._storage = _Storage(key, batch, cache_len, kvc.allocate(base, batch, cache_len, device))
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
        cache_len: int,
    ) -> torch.Tensor:
        device = input_ids.device
        n, prompt_len = input_ids.shape
        buckets = batch_buckets(n, self.cfg.min_batch_bucket)
        big = buckets[0]
        storage = self._storage_for(base, big, cache_len, device)
        cache_len = storage.cache_len
        padded_len = cache_len - params.max_new_tokens  # the prompt bucket's, or more in a longer cache
        cache = storage.view(big)
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
        state = self._decode_state(storage, big, params, mask, prompt_positions, padded_len, n)
        self._sample_and_advance(logits, state, params, big)

        bucket = big
        for step in range(1, params.max_new_tokens):
            if step % self.cfg.compact_every == 1 or self.cfg.compact_every == 1:
                alive = int((~state.finished[:bucket]).sum())
                if alive == 0:
                    break
                smaller = min(b for b in buckets if b >= alive)
                if smaller < bucket:
                    self._compact(cache, state, bucket, smaller)
                    view = storage.view(smaller)
                    kvc.follow_length(view, cache)
                    cache, bucket = view, smaller
            self._decode_step(storage, call, cache, state, params, bucket, cache_len)
        out = state.out[:n, : params.max_new_tokens]
        # A copy: the buffer is the next rollout's (and the captured graphs') output.
        return out[:, : _response_len(out, state.eos, params.max_new_tokens)].clone()

    def _prefill(self, call, cache, ids, mask, positions) -> torch.Tensor:
        """Last-position logits [B, V] of the prompts, written into the cache in chunks of rows."""
        big, padded_len = ids.shape
        cache_positions = torch.arange(padded_len, device=ids.device)
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
        self, storage: _Storage, big: int, params: SamplingParams, mask: torch.Tensor,
        prompt_positions: torch.Tensor, padded_len: int, n: int,
    ) -> _DecodeState:  # fmt: skip
        """Fill the storage's decode tensors in place (their addresses are what the graphs captured); they
        have the storage's rows and length, this rollout uses the first ``big`` rows."""
        device = mask.device
        state = storage.state
        rows, cache_len = storage.batch, storage.cache_len
        if state is None:
            suppress = torch.tensor(params.suppress_ids, dtype=torch.long, device=device)
            state = _DecodeState(
                tokens_in=torch.zeros(rows, 1, dtype=torch.long, device=device),
                positions=torch.zeros(rows, 1, dtype=torch.long, device=device),
                mask=torch.zeros(rows, cache_len, dtype=torch.long, device=device),
                rows=torch.zeros(rows, dtype=torch.long, device=device),
                finished=torch.zeros(rows, dtype=torch.bool, device=device),
                out=torch.zeros(rows, cache_len, dtype=torch.long, device=device),  # >= max_new_tokens
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
        state.mask[:big].copy_(mask)
        state.positions[:big].copy_(prompt_positions[:, -1:] + 1)
        state.rows[:big].copy_(torch.arange(big, device=device))
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


def _response_len(out: torch.Tensor, eos: torch.Tensor, max_new: int) -> int:
    """Columns ``generate`` would return: up to the step at which the last row emitted EOS."""
    is_eos = torch.isin(out, eos)
    has_eos = is_eos.any(-1)
    if not bool(has_eos.all()):
        return max_new
    return int(is_eos.int().argmax(-1).max()) + 1
