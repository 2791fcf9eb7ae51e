"""The models both systems train: architecture shapes, and random-weight model directories saved from them.

Nothing is downloaded: a word-level tokenizer of the shape's vocabulary size and configs with the published
dimensions of each model are enough to measure speed and memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """The architecture of every model of a run (policy, reference, reward, critic share it)."""

    name: str
    arch: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    max_positions: int = 4096


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape("tiny-llama", "llama", 64, 2, 4, 4, 256, 512, False, 128),
    "0.5b": ModelShape("qwen2.5-0.5b", "qwen2", 896, 24, 14, 2, 4864, 151936, True),
    "1.5b": ModelShape("qwen2.5-1.5b", "qwen2", 1536, 28, 12, 2, 8960, 151936, True),
    "3b": ModelShape("qwen2.5-3b", "qwen2", 2048, 36, 16, 2, 11008, 151936, True),
    "8b": ModelShape("llama-3-8b", "llama", 4096, 32, 32, 8, 14336, 128256, False),
}

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer with exactly ``vocab_size`` entries: 4 specials, then "t0", "t1", ...

    Plain encodes get a leading BOS; the pad token differs from EOS (no token is added at load time).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *(f"t{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def model_config(shape: ModelShape, tokenizer: Any) -> Any:
    """A transformers config for ``shape`` with the tokenizer's special ids."""
    if shape.name == "tiny-llama":
        from fastrlhf.demo_task import tiny_llama_config

        return tiny_llama_config(
            tokenizer,
            hidden_size=shape.hidden,
            layers=shape.layers,
            heads=shape.heads,
            intermediate=shape.intermediate,
            max_positions=shape.max_positions,
        )
    common = {
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": shape.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if shape.arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(rms_norm_eps=1e-6, rope_theta=1e6, **common)
    from transformers import LlamaConfig

    return LlamaConfig(rms_norm_eps=1e-5, rope_theta=5e5, **common)


def build_model_dirs(shape: ModelShape, root: Path, dtype: str, device: str) -> tuple[Path, Path]:
    """Random-weight policy (CausalLM) and reward model (SequenceClassification, 1 label) saved under root.

    The reference is the policy directory and the critic starts from the reward directory on both sides.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = build_tokenizer(shape.vocab)
    torch_dtype = getattr(torch, dtype)
    policy_dir, reward_dir = root / "policy", root / "reward"
    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(model_config(shape, tok), dtype=torch_dtype)
    policy.generation_config.pad_token_id = tok.pad_token_id
    policy.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    del policy  # one full model in memory at a time: the 8B shape is 16 GB in bf16
    rm_cfg = model_config(shape, tok)
    rm_cfg.num_labels = 1
    with torch.device(device):
        reward = AutoModelForSequenceClassification.from_config(rm_cfg, dtype=torch_dtype)
    reward.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)
    del reward
    if device == "cuda":
        torch.cuda.empty_cache()
    return policy_dir, reward_dir


def make_prompts(n: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[str]:
    """``n`` prompts of exactly ``prompt_len`` tokens each (BOS + prompt_len - 1 random words), so that
    neither system pads."""
    rng = random.Random(seed)
    top = min(vocab_size - len(SPECIAL_TOKENS), 1000)
    return [" ".join(f"t{rng.randrange(top)}" for _ in range(prompt_len - 1)) for _ in range(n)]
