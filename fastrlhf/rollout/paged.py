"""The paged backend: transformers continuous batching (``generate_batch``, paged attention).

Prompts go in unpadded; finished sequences leave the batch as they end (that is what continuous batching
does), and the responses come back right-padded with ``pad_token_id`` like ``generate``'s. The paged KV
cache is sized from the batch (every prompt's length + ``max_new_tokens``, in pages) instead of from the
free device memory, and transformers frees it at the end of every call.

Continuous batching drops ``min_new_tokens`` (its ``MinNewTokensLengthLogitsProcessor`` is marked
unsupported), so it is done in two calls: the first ``min_new_tokens`` tokens with EOS suppressed, then the
rest from the prompts extended by them. Greedy tokens and the sampling distribution are ``generate``'s.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from fastrlhf.config import RolloutConfig
from fastrlhf.models import unwrap
from fastrlhf.rollout import Generation, SamplingParams, synchronize
from fastrlhf.rollout.hf import HFEngine

log = logging.getLogger("fastrlhf")

PAGE_SIZE = 256  # the largest page (transformers' default): tokens of one layer's KV per page


def unsupported_reason(model: nn.Module) -> str | None:
    """Why continuous batching cannot serve ``model``, or None if it can."""
    base = unwrap(model)
    if not hasattr(base, "generate_batch"):
        return "this transformers has no generate_batch (continuous batching)"
    if not getattr(base, "_supports_attention_backend", False):
        return f"{type(base).__name__} cannot run paged attention (no attention-backend support)"
    try:
        from transformers.generation.continuous_batching.cache import group_layers_by_attn_type

        group_layers_by_attn_type(base.config.get_text_config())
    except Exception as e:  # a layer type without a paged cache allocator (state-space, linear attention)
        return f"no paged cache for {type(base).__name__}: {e}"
    return None


class _DropSuppressWarning(logging.Filter):
    """transformers warns on every call that SuppressTokensLogitsProcessor "might not be supported"; it is
    stateless and works (tests/test_rollout.py checks suppressed ids against generate)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SuppressTokensLogitsProcessor" not in record.getMessage()


logging.getLogger("ContinuousBatchingLogger").addFilter(_DropSuppressWarning())


class PagedEngine:
    """``model.generate_batch``; the paged cache is built and freed by transformers on every call."""

    name = "paged"

    def __init__(self, cfg: RolloutConfig | None = None) -> None:
        self.cfg = cfg or RolloutConfig(backend="paged")
        self._fallback = HFEngine()
        self._warned: set[str] = set()

    def generate(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> Generation:
        reason = unsupported_reason(model)
        if reason is not None:
            if reason not in self._warned:
                log.warning("rollout.backend=paged: %s; falling back to hf", reason)
                self._warned.add(reason)
            return self._fallback.generate(model, input_ids, attention_mask, params)
        base = unwrap(model)
        device = input_ids.device
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)]
        synchronize(device)
        t0 = time.perf_counter()
        early: list[list[int]] = [[] for _ in prompts]
        if params.min_new_tokens > 0:
            no_eos = (*params.suppress_ids, params.eos_token_id)
            early = self._batch(base, prompts, params, params.min_new_tokens, no_eos)
        rest = params.max_new_tokens - params.min_new_tokens
        late = [[] for _ in prompts]
        if rest > 0:
            late = self._batch(base, [p + e for p, e in zip(prompts, early, strict=True)], params, rest,
                               params.suppress_ids)  # fmt: skip
        synchronize(device)
        seconds = time.perf_counter() - t0
        responses = [e + x for e, x in zip(early, late, strict=True)]
        width = max(len(r) for r in responses)
        tokens = torch.full((len(prompts), width), params.pad_token_id, dtype=torch.long)
        for i, r in enumerate(responses):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return Generation(tokens.to(device), seconds, self.name)

    def _batch(
        self, base: nn.Module, prompts: list[list[int]], params: SamplingParams, new_tokens: int,
        suppress: tuple[int, ...],
    ) -> list[list[int]]:  # fmt: skip
        """One ``generate_batch`` call of ``new_tokens`` tokens per prompt, on a cache sized for it."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p}
        config = GenerationConfig(
            do_sample=not params.greedy,
            **sampling,
            top_k=None,
            max_new_tokens=new_tokens,
            eos_token_id=params.eos_token_id,
            pad_token_id=params.pad_token_id,
            suppress_tokens=list(suppress) or None,
        )
        longest = max(len(p) for p in prompts)
        # Pages no longer than the longest sequence: SDPA's paged path masks over every cache position.
        page = min(PAGE_SIZE, max(8, 1 << (longest + new_tokens - 1).bit_length()))
        cb = ContinuousBatchingConfig(
            page_size=page,
            num_blocks=sum(math.ceil((len(p) + new_tokens) / page) for p in prompts) + 1,
            max_batch_tokens=max(longest, min(self.cfg.prefill_tokens, sum(len(p) for p in prompts))),
            max_requests_per_batch=len(prompts),
            # Drawn from torch's generator (runs seeded with torch.manual_seed repeat); transformers seeds the
            # global generator with it, so the caller's random stream is restored afterwards.
            seed=int(torch.randint(0, 2**31 - 1, (1,))),
        )
        devices = [base.device] if base.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            outputs = base.generate_batch(
                inputs=prompts, generation_config=config, continuous_batching_config=cb, progress_bar=False
            )
        # Request ids are "req_<index of the prompt>".
        return [list(outputs[f"req_{i}"].generated_tokens) for i in range(len(prompts))]

    def release(self) -> None:
        pass
