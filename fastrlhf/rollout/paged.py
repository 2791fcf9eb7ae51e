"""The paged backend: transformers continuous batching (``generate_batch``, paged attention).

Prompts go in unpadded; finished sequences leave the batch as they end (that is what continuous batching
does), and the responses come back right-padded with ``pad_token_id`` like ``generate``'s.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from fastrlhf.models import unwrap
from fastrlhf.rollout import Generation, SamplingParams, synchronize
from fastrlhf.rollout.hf import HFEngine

log = logging.getLogger("fastrlhf")


class PagedEngine:
    """``model.generate_batch``; the paged cache is built and freed by transformers on every call."""

    name = "paged"

    def __init__(self) -> None:
        self._fallback = HFEngine()
        self._warned = False

    def generate(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> Generation:
        from transformers import GenerationConfig

        base = unwrap(model)
        if not hasattr(base, "generate_batch"):
            if not self._warned:
                log.warning(
                    "rollout.backend=paged: this transformers has no generate_batch; falling back to hf"
                )
                self._warned = True
            return self._fallback.generate(model, input_ids, attention_mask, params)
        device = input_ids.device
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)]
        sampling = (
            {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        )
        config = GenerationConfig(
            do_sample=not params.greedy,
            **sampling,
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            eos_token_id=params.eos_token_id,
            pad_token_id=params.pad_token_id,
            suppress_tokens=list(params.suppress_ids) or None,
        )
        synchronize(device)
        t0 = time.perf_counter()
        outputs = base.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        synchronize(device)
        seconds = time.perf_counter() - t0
        # Request ids are "req_<index of the prompt>".
        responses = [list(outputs[f"req_{i}"].generated_tokens) for i in range(len(prompts))]
        width = max(len(r) for r in responses)
        tokens = torch.full((len(prompts), width), params.pad_token_id, dtype=torch.long)
        for i, r in enumerate(responses):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return Generation(tokens.to(device), seconds, self.name)

    def release(self) -> None:
        pass
