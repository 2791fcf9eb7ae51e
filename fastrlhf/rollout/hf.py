"""The reference backend: transformers ``generate`` with its dynamic KV cache and its own sampling."""

from __future__ import annotations

import time

import torch
from torch import nn

from fastrlhf.rollout import Generation, SamplingParams, synchronize


class HFEngine:
    """``model.generate``; nothing is kept between calls."""

    name = "hf"

    def generate(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams
    ) -> Generation:
        synchronize(input_ids.device)
        t0 = time.perf_counter()
        sampling = (
            {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        )
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=not params.greedy,
            **sampling,
            repetition_penalty=1.0,  # a model's generation_config must not bend what PPO's log-probs assume
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            eos_token_id=params.eos_token_id,
            pad_token_id=params.pad_token_id,
            suppress_tokens=list(params.suppress_ids) or None,
            use_cache=True,
        )
        synchronize(input_ids.device)
        return Generation(out[:, input_ids.shape[1] :], time.perf_counter() - t0, self.name)

    def release(self) -> None:
        pass
