"""Enumerable bandit tasks whose KL-regularized optimum is known in closed form.

The reference policy is a tiny Llama whose next-token distributions are set exactly: attention and MLP
outputs are zeroed, so the last hidden state is RMSNorm(embedding of the current token); embeddings are
one-hot rows, so the output layer's column for a token is that token's next-token logits, solved for so
that softmax(logits / T) is the table we choose. Responses have one or two tokens; the reward is on the whole
sequence. The trained policy's exact distribution is read back by enumerating every response, and compared
with the maximizer of E[r] - beta * KL(pi || pi_ref), pi*(y) = pi_ref(y) exp(r(y) / beta) / Z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from fastrlhf.demo_task import build_tokenizer, tiny_llama_config

PROMPT = "="
ANSWERS = ("1", "2", "3")
RARE = 1e-6  # reference probability of every token outside ANSWERS (EOS included)


@dataclass(frozen=True)
class Bandit:
    """A task: the reference's next-token probabilities over ANSWERS (after the prompt, and after each first
    answer token when ``length`` is 2) and the reward of each complete response (missing ones score 0)."""

    first: tuple[float, ...]
    second: dict[str, tuple[float, ...]]
    rewards: dict[str, float]
    length: int

    def reward(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [self.rewards.get(c.strip(), 0.0) for c in completions]


ONE_TOKEN = Bandit(first=(0.6, 0.3, 0.1), second={}, rewards={"1": 0.0, "2": 0.5, "3": 1.0}, length=1)
TWO_TOKENS = Bandit(
    first=(0.5, 0.3, 0.2),
    second={"1": (0.6, 0.3, 0.1), "2": (0.2, 0.5, 0.3), "3": (0.1, 0.2, 0.7)},
    # The best pair starts with the reference's least likely first token; y2 matters given y1.
    rewards={"1 1": 0.2, "1 2": 0.0, "1 3": 0.4, "2 1": 0.0, "2 2": 0.6, "2 3": 0.1, "3 1": 1.0, "3 2": 0.3,
             "3 3": 0.0},
    length=2,
)  # fmt: skip
REWARD_SCALE = 0.05
SMALL_REWARDS = Bandit(
    first=TWO_TOKENS.first,
    second=TWO_TOKENS.second,
    rewards={y: REWARD_SCALE * r for y, r in TWO_TOKENS.rewards.items()},
    length=2,
)
"""TWO_TOKENS with rewards 20x smaller: at beta * REWARD_SCALE it has the same pi*, and a trainer that is
invariant to the reward scale (whitened advantages) must reach it in the same number of steps."""


def _logits(probs: tuple[float, ...], vocab: dict[str, int], size: int, temperature: float) -> torch.Tensor:
    """Logits z with softmax(z / T) giving ``probs`` on ANSWERS and RARE on every other token."""
    p = torch.full((size,), RARE, dtype=torch.float64)
    for token, q in zip(ANSWERS, probs, strict=True):
        p[vocab[token]] = q * (1 - RARE * (size - len(ANSWERS)))
    return temperature * p.log()


def build_reference(task: Bandit, path: Path, temperature: float) -> Path:
    """Save the exact-reference tiny Llama (and its tokenizer) for ``task`` at ``temperature``."""
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    size = len(tok)
    config = tiny_llama_config(tok, hidden_size=24, layers=1, heads=2, intermediate=32)
    model = LlamaForCausalLM(config).double()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :size] = torch.eye(size, dtype=torch.float64)
        model.model.norm.weight.fill_(1.0)
        # RMSNorm maps the one-hot row e_i to e_i / sqrt(1 / H + eps): column i of the output layer times
        # that factor is the next-token logits after token i.
        hidden = config.hidden_size
        scale = 1.0 / math.sqrt(1.0 / hidden + config.rms_norm_eps)
        head = torch.zeros(size, hidden, dtype=torch.float64)
        neutral = _logits((1 / 3, 1 / 3, 1 / 3), vocab, size, temperature)
        for i in range(size):
            head[:, i] = neutral / scale
        head[:, vocab[PROMPT]] = _logits(task.first, vocab, size, temperature) / scale
        for token, probs in task.second.items():
            head[:, vocab[token]] = _logits(probs, vocab, size, temperature) / scale
        model.lm_head.weight.copy_(head)
    model.float().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@torch.no_grad()
def response_distribution(model, tok, length: int, temperature: float) -> dict[tuple[int, ...], float]:
    """Exact probability of every response of up to ``length`` tokens (EOS ends one early; pad is never
    sampled), computed in float64 from the model's own forward at ``temperature``."""
    prompt = tok(PROMPT)["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = model.double() if next(model.parameters()).dtype != torch.float64 else model

    def next_logp(prefix: list[int]) -> torch.Tensor:
        logits = model(torch.tensor([prompt + prefix])).logits[0, -1].double() / temperature
        logits[pad] = -math.inf  # the rollout suppresses the pad token
        return logits.log_softmax(-1)

    out: dict[tuple[int, ...], float] = {}
    first = next_logp([]).exp()
    vocab = [t for t in range(len(tok)) if t != pad]
    for y1 in vocab:
        if length == 1 or y1 == eos:
            out[(y1,)] = float(first[y1])
            continue
        second = next_logp([y1]).exp()
        for y2 in vocab:
            out[(y1, y2)] = float(first[y1] * second[y2])
    return out


@dataclass(frozen=True)
class Evaluation:
    """Expected reward, KL to the reference and the objective E[r] - beta * KL of one distribution."""

    reward: float
    kl: float
    objective: float


def evaluate(pi: dict, ref: dict, rewards: dict[tuple[int, ...], float], beta: float) -> Evaluation:
    er = sum(p * rewards[y] for y, p in pi.items())
    kl = sum(p * (math.log(p) - math.log(ref[y])) for y, p in pi.items() if p > 0)
    return Evaluation(er, kl, er - beta * kl)


def optimum(ref: dict, rewards: dict[tuple[int, ...], float], beta: float) -> dict[tuple[int, ...], float]:
    """pi*(y) = pi_ref(y) exp(r(y) / beta) / Z, normalized in log space."""
    logits = {y: math.log(p) + rewards[y] / beta for y, p in ref.items() if p > 0}
    top = max(logits.values())
    z = sum(math.exp(v - top) for v in logits.values())
    return {y: math.exp(v - top) / z for y, v in logits.items()}


def sequence_rewards(task: Bandit, tok, responses) -> dict[tuple[int, ...], float]:
    """The reward of each enumerated response, through the same decode the trainer uses."""
    texts = tok.batch_decode([list(y) for y in responses], skip_special_tokens=True)
    scores = task.reward([PROMPT] * len(texts), texts)
    return dict(zip(responses, scores, strict=True))


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(y, 0.0) - q.get(y, 0.0)) for y in set(p) | set(q))
