"""The paged backend (transformers continuous batching) decodes what hf decodes. Its own file: its
scheduler takes ~15-30 s per call on CPU."""

from __future__ import annotations

import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from fastrlhf.rollout import SamplingParams
from fastrlhf.rollout.hf import HFEngine
from fastrlhf.rollout.paged import PagedEngine


def test_paged_backend_greedy_matches_hf(torch_backend):
    """transformers' continuous batching decodes what generate decodes (unpadded prompts in, right-padded
    responses out). Slow on CPU (its scheduler), so one small batch."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=17, initializer_range=0.5)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.tensor([[0, 0, 1, 7, 9], [1, 12, 8, 5, 6]])
    mask = (ids != 0).long()
    params = SamplingParams(max_new_tokens=4, eos_token_id=3, pad_token_id=0, greedy=True)
    want = HFEngine().generate(model, ids, mask, params).tokens
    got = PagedEngine().generate(model, ids, mask, params)
    assert got.backend == "paged" and torch.equal(got.tokens, want)
