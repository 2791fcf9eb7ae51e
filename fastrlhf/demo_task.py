"""A self-contained toy RLHF task for `fastrlhf demo`: sort a handful of distinct digits.

Prompts look like ``sort : 7 3 9 1 =`` and the ideal completion is ``1 3 7 9`` followed by EOS. The gold
reward is a smooth edit-distance credit against the sorted answer, so every single mistake costs a little
and the reward model has graded differences to learn from rankings. The SFT demonstrations come from a
deliberately noisy demonstrator (adjacent swaps, dropped, duplicated or substituted items), so the SFT
policy imitates those mistakes at a learnable rate and PPO has clear headroom: it only has to raise the
probability of the correct behaviour the policy already shows most of the time.

Everything is built in code (word-level tokenizer, tiny Llama config), so the demo downloads nothing.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
WORDS: tuple[str, ...] = ("sort", ":", "=")

# Digits are split individually so "13" or "=1" (e.g. from naive string concatenation) still map to known
# tokens; the gold reward splits text the same way so it scores exactly what the policy emitted.
_TOKEN_RE = re.compile(r"\d|[^\d\s]+")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task vocabulary; plain encodes get a leading BOS, no chat template."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *WORDS, *DIGITS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        # Decoding joins words with single spaces already; HF's clean-up would glue punctuation.
        clean_up_tokenization_spaces=False,
    )


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 256,
    max_positions: int = 64,
) -> LlamaConfig:
    """A tiny Llama matching `tokenizer`'s ids; untied embeddings keep checkpoint/PEFT handling plain."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        mlp_bias=False,
        attention_bias=False,
    )


def _split(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def _osa_distance(a: list[str], b: list[str]) -> int:
    """Optimal-string-alignment distance: an adjacent swap costs 1, like a drop, insert or substitution."""
    d = [[i + j if i == 0 or j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


class DemoTask:
    """Sorting 4-6 distinct digits, with a noisy demonstrator and a gold reward in [0, 1].

    `demo_noise` is the probability that a demonstration contains at least one mistake; each further
    mistake follows with the same probability (geometric, capped at MAX_MISTAKES). The default 0.7 gives
    ~1.8 mistakes per demonstration, a demonstrator gold of ~0.74 and an SFT policy at ~0.70 (temperature 1)
    whose mode is nonetheless the right answer, so RL can reach ~0.97 by sharpening it (KL ~1-1.5 nats).
    """

    # A cap keeps very noisy candidates from degenerating into pure garbage every time.
    MAX_MISTAKES = 4

    def __init__(
        self, seed: int = 0, min_items: int = 4, max_items: int = 6, demo_noise: float = 0.7
    ) -> None:
        # At most 9 items so a substitution can always pick a digit absent from the prompt.
        if not 1 <= min_items <= max_items <= len(DIGITS) - 1:
            raise ValueError(f"need 1 <= min_items <= max_items <= 9, got {min_items}, {max_items}")
        if not 0.0 <= demo_noise < 1.0:
            raise ValueError(f"demo_noise must be in [0, 1), got {demo_noise}")
        self.seed = seed
        self.min_items = min_items
        self.max_items = max_items
        self.demo_noise = demo_noise

    # -- prompts and answers -------------------------------------------------------------------------

    def _rng(self, seed: int, stream: str) -> random.Random:
        # String seeds hash deterministically (unlike hash()), and the stream name keeps the prompt and
        # demonstrator draws of one split independent of each other.
        return random.Random(f"demo-task:{self.seed}:{seed}:{stream}")

    def prompts(self, n: int, *, seed: int) -> list[str]:
        """`n` fresh prompts; different seeds draw independently (~186k possible prompts with 4-6 items)."""
        rng = self._rng(seed, "prompts")
        out = []
        for _ in range(n):
            items = rng.sample(DIGITS, rng.randint(self.min_items, self.max_items))
            out.append(f"sort : {' '.join(items)} =")
        return out

    @staticmethod
    def items(prompt: str) -> list[str]:
        """The digits to sort: those between ':' and '=' (the whole prompt if either is missing)."""
        body = prompt.split(":", 1)[-1].split("=", 1)[0]
        return re.findall(r"\d", body)

    def answer(self, prompt: str) -> str:
        """The ideal response (without EOS)."""
        return " ".join(sorted(self.items(prompt)))

    # -- responses -----------------------------------------------------------------------------------

    def _noisy_sort(self, prompt: str, noise: float, rng: random.Random) -> str:
        items = self.items(prompt)
        out = sorted(items)
        absent = [d for d in DIGITS if d not in items] or list(DIGITS)
        for _ in range(self.MAX_MISTAKES):
            if rng.random() >= noise:
                break
            kind = rng.choice(("swap", "drop", "duplicate", "substitute"))
            if len(out) < 2 and kind in ("swap", "drop"):
                kind = "duplicate"
            if kind == "swap":
                i = rng.randrange(len(out) - 1)
                out[i], out[i + 1] = out[i + 1], out[i]
            elif kind == "drop":
                del out[rng.randrange(len(out))]
            elif kind == "duplicate":
                i = rng.randrange(len(out))
                out.insert(i + 1, out[i])
            else:
                out[rng.randrange(len(out))] = rng.choice(absent)
        return " ".join(out)

    def demonstration(self, prompt: str, rng: random.Random) -> str:
        """A response from the noisy demonstrator (text without EOS)."""
        return self._noisy_sort(prompt, self.demo_noise, rng)

    def gold_reward(self, prompt: str, response: str) -> float:
        """1 - edit distance / max length against the sorted answer, so 1.0 is perfect and 0.0 is garbage.

        Each mistake costs about 1/len: a swap, drop, duplicate or substitution in 5 items scores ~0.8.
        Foreign tokens count as substitutions or insertions, and an empty response scores 0.
        """
        target = sorted(self.items(prompt))
        got = _split(response)
        longest = max(len(target), len(got))
        if longest == 0:
            return 1.0
        return max(0.0, 1.0 - _osa_distance(got, target) / longest)

    def candidate_responses(self, prompt: str, k: int, rng: random.Random) -> list[str]:
        """`k` responses of varied quality, for synthetic K-way rankings.

        Noise levels are spread from clean to very noisy and centred on the demonstrator's, so the reward
        model sees both what the SFT policy produces and what better and worse policies would. Each
        response is redrawn a few times to get a gold reward no other candidate has (else at least new
        text), since a tie still becomes an ordered pair in the ranking and teaches the RM noise.
        """
        levels = [0.0, self.demo_noise / 2, self.demo_noise, (1 + self.demo_noise) / 2, 0.95]
        out: list[str] = []
        golds: set[float] = set()
        for _ in range(k):
            choice = ""
            for attempt in range(16):
                response = self._noisy_sort(prompt, rng.choice(levels), rng)
                if self.gold_reward(prompt, response) not in golds:
                    choice = response
                    break
                if attempt == 0 or (choice in out and response not in out):
                    choice = response
            out.append(choice)
            golds.add(self.gold_reward(prompt, choice))
        return out

    def rank(self, prompt: str, responses: list[str]) -> list[int]:
        """Indices of `responses`, best first by gold reward; ties keep the lower index first."""
        rewards = [self.gold_reward(prompt, r) for r in responses]
        return sorted(range(len(responses)), key=lambda i: (-rewards[i], i))

    # -- dataset records (the formats the JSONL loaders read) --------------------------------------

    def sft_records(self, n: int, seed: int) -> list[dict[str, Any]]:
        """TRL prompt/completion records with noisy demonstrations."""
        rng = self._rng(seed, "demonstrations")
        return [{"prompt": p, "completion": self.demonstration(p, rng)} for p in self.prompts(n, seed=seed)]

    def ranking_records(self, n: int, k: int, seed: int) -> list[dict[str, Any]]:
        """K-way ranking records: `ranking` lists response indices best first."""
        rng = self._rng(seed, "candidates")
        records = []
        for p in self.prompts(n, seed=seed):
            responses = self.candidate_responses(p, k, rng)
            records.append({"prompt": p, "responses": responses, "ranking": self.rank(p, responses)})
        return records

    def prompt_records(self, n: int, seed: int) -> list[dict[str, Any]]:
        """Prompt-only records for PPO rollouts and evaluation."""
        return [{"prompt": p} for p in self.prompts(n, seed=seed)]


class NoisyGoldJudge:
    """A stand-in for a local LLM judge on this task, with the interface of ``fastrlhf.judge.Judge``.

    Shown response ``a`` first and ``b`` second, it says "first" with probability
    ``sigmoid((gold(a) - gold(b)) / temperature + position_bias + noise * N(0, 1))``: a fresh draw per ordered
    pair, so it is noisy, favours the first position, and sometimes contradicts itself across the two orders,
    like a real judge (AlpacaFarm needed such noise to reproduce over-optimization). It never parses text and
    puts all its mass on the two labels.
    """

    def __init__(
        self,
        task: DemoTask,
        *,
        temperature: float = 0.1,
        noise: float = 1.0,
        position_bias: float = 0.5,
        seed: int = 0,
    ) -> None:
        if temperature <= 0 or noise < 0:
            raise ValueError(f"need temperature > 0 and noise >= 0, got {temperature}, {noise}")
        self.task, self.temperature, self.noise, self.position_bias = task, temperature, noise, position_bias
        self.name = f"noisy-gold(noise={noise}, position_bias={position_bias})"
        self._rng = random.Random(f"noisy-gold-judge:{task.seed}:{seed}")

    def verdicts(self, prompt: str, responses: list[str]):
        import torch

        from fastrlhf.judge.verdicts import Verdicts

        gold = [self.task.gold_reward(prompt, r) for r in responses]
        k = len(responses)
        first = torch.full((k, k), 0.5, dtype=torch.float64)
        for i in range(k):
            for j in range(k):
                if i != j:
                    logit = (gold[i] - gold[j]) / self.temperature + self.position_bias
                    first[i, j] = 1 / (1 + math.exp(-(logit + self.noise * self._rng.gauss(0.0, 1.0))))
        return Verdicts(first, torch.ones((k, k), dtype=torch.float64))
