"""Single-order verdicts from a local causal LM: P(first response wins) from the logits of the label tokens.

For a prompt with K responses, every ordered pair (i shown as A, j as B) is rendered through the judging
template; the judge's next-token distribution after the template gives p_A and p_B, and the verdict is
``p_A / (p_A + p_B)``. Nothing is generated and no text is parsed. The mass ``p_A + p_B`` is kept: when it is
small the template does not make this model answer with a label, and the report says so.

Batching: all K(K-1) rows of a prompt start with the same tokens (rubric and prompt), so that prefix runs
once with ``use_cache`` and the rows' suffixes run in batches of ``batch_size`` against copies of its cache,
right-padded (causal attention never looks at the padding after a row's last token). ``share_prefix=False``
runs whole rows, left-padded, instead; both give the same numbers as one unbatched forward per row.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fastrlhf.config import JudgeConfig
from fastrlhf.data import Prompt, pad_left

log = logging.getLogger("fastrlhf")

DEFAULT_TEMPLATE = """\
You are comparing two responses to the same prompt. Decide which response a careful user would rather \
receive. Being truthful and harmless matters more than being helpful; a response that follows the \
instruction beats one that does not; do not prefer a response for being longer or shorter.

Prompt:
{prompt}

Response A:
{response_a}

Response B:
{response_b}

Which response is better? Answer with one letter, A or B.{answer}The better response is: Response"""
"""The built-in judging prompt: InstructGPT's priorities and OpenAssistant's ranking guidelines, shortened."""

PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")
ANSWER_MARK = "{answer}"


@dataclass
class Verdicts:
    """A prompt's single-order verdicts: ``first[i, j]`` = P(first wins | i shown first, j second)."""

    first: torch.Tensor
    """[K, K] float64; the diagonal is 0.5 and unused."""
    label_mass: torch.Tensor
    """[K, K] float64, p_A + p_B of each ordered pair (1 on the diagonal)."""
    truncated: int = 0
    """Responses cut by ``max_response_tokens``."""


class Judge(Protocol):
    """Anything that gives single-order verdicts: :class:`LMJudge`, or the demo's noisy gold judge."""

    name: str

    def verdicts(self, prompt: Prompt, responses: list[str]) -> Verdicts: ...


def load_template(path: str) -> str:
    """The judging template from ``path`` (empty: the default), checked for its placeholders."""
    text = Path(path).read_text(encoding="utf-8") if path else DEFAULT_TEMPLATE
    where = f"template {path}" if path else "the default template"
    for name in PLACEHOLDERS:
        if text.count(name) != 1:
            raise ValueError(f"{where}: needs {name} exactly once, found it {text.count(name)} times")
    if text.count(ANSWER_MARK) > 1:
        raise ValueError(f"{where}: {ANSWER_MARK} may appear at most once")
    if text != text.rstrip():
        raise ValueError(
            f"{where}: ends with whitespace; end it right before the label (most tokenizers put the space "
            "into the label token)"
        )
    return text


def prompt_text(prompt: Prompt) -> str:
    """A chat prompt as ``role: content`` lines, a plain prompt as itself."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class LMJudge:
    """A causal LM as a pairwise judge (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, cfg: JudgeConfig, name: str = "") -> None:
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {cfg.batch_size}")
        if cfg.max_response_tokens < 0:
            raise ValueError(f"max_response_tokens must be >= 0, got {cfg.max_response_tokens}")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.name = name or cfg.model
        self.template = load_template(cfg.template)
        chat = cfg.use_chat_template
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("use_chat_template: the judge's tokenizer has no chat template")
        self.chat = has_template if chat is None else chat
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params
        self.label_ids = self._label_ids()

    # -- text to ids ---------------------------------------------------------------------------------

    def _render(self, prompt: str, first: str, second: str) -> str:
        text = self.template
        user, _, answer = text.partition(ANSWER_MARK)
        # Substituted one at a time into the template's own text, so braces in model output stay literal.
        for name, value in zip(PLACEHOLDERS, (prompt, first, second), strict=True):
            user, answer = user.replace(name, value), answer.replace(name, value)
        if not self.chat:
            return user + ("\n" if ANSWER_MARK in text else "") + answer
        messages = [{"role": "user", "content": user}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return rendered + answer

    def _encode(self, text: str) -> list[int]:
        # A rendered chat template carries its own special tokens; plain text gets the tokenizer's (BOS).
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def _label_ids(self) -> tuple[list[int], list[int]]:
        """The token ids each label may take right after the template: the label as written and with a leading
        space (BPE and SentencePiece put the space into the token), each only where it is exactly one token.
        An error when a label has no such variant, or when the two labels share a token."""
        probe = self._render("Say hi.", "Hi.", "Hello.")
        base = self._encode(probe)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        found: list[list[int]] = []
        for option, label in (("label_a", self.cfg.label_a), ("label_b", self.cfg.label_b)):
            if not label.strip():
                raise ValueError(f"{option}: empty label")
            ids: list[int] = []
            for variant in dict.fromkeys((label, " " + label.lstrip())):
                full = self._encode(probe + variant)
                if full[: len(base)] == base and len(full) == len(base) + 1 and full[-1] != unk:
                    ids.append(full[-1])
            if not ids:
                raise ValueError(
                    f"{option}: {label!r} (with or without a leading space) is not one known token after "
                    "the template; choose another label or end the template differently"
                )
            found.append(sorted(set(ids)))
        if set(found[0]) & set(found[1]):
            raise ValueError(f"label_a and label_b share token ids {sorted(set(found[0]) & set(found[1]))}")
        return found[0], found[1]

    def _truncate(self, text: str) -> tuple[str, bool]:
        limit = self.cfg.max_response_tokens
        if not limit:
            return text, False
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text, False
        head, tail = ids[: (limit + 1) // 2], ids[len(ids) - limit // 2 :]
        return f"{self.tokenizer.decode(head)} [...] {self.tokenizer.decode(tail)}", True

    # -- forward passes ------------------------------------------------------------------------------

    @torch.no_grad()
    def verdicts(self, prompt: Prompt, responses: list[str]) -> Verdicts:
        """Single-order verdicts for every ordered pair of ``responses``."""
        k = len(responses)
        shown, cut = zip(*(self._truncate(r) for r in responses), strict=True)
        text = prompt_text(prompt)
        pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
        rows = [self._encode(self._render(text, shown[i], shown[j])) for i, j in pairs]
        log_a, log_b = self._label_logprobs(rows)
        first = torch.full((k, k), 0.5, dtype=torch.float64)
        mass = torch.ones((k, k), dtype=torch.float64)
        for (i, j), la, lb in zip(pairs, log_a.tolist(), log_b.tolist(), strict=True):
            first[i, j] = float(torch.sigmoid(torch.tensor(la - lb, dtype=torch.float64)))
            mass[i, j] = float(torch.tensor([la, lb], dtype=torch.float64).exp().sum())
        return Verdicts(first, mass, truncated=sum(cut))

    def _label_logprobs(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(label_a), log p(label_b) after each row (float32 log-softmax, summed over a label's ids)."""
        device = next(self.model.parameters()).device
        prefix = 0
        if self.cfg.share_prefix:
            shortest = min(len(r) for r in rows)
            while prefix < shortest - 1 and all(r[prefix] == rows[0][prefix] for r in rows):
                prefix += 1
        last_logits = []
        cache = None
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        longest = max(len(r) for r in rows)
        if isinstance(limit, int) and longest > limit:
            raise ValueError(
                f"a judging prompt has {longest} tokens, more than the judge's {limit} positions: "
                "set max_response_tokens, or use a shorter template"
            )
        if prefix > 0:
            kwargs = {"logits_to_keep": 1} if self._keep_last else {}
            out = self.model(torch.tensor([rows[0][:prefix]], device=device), use_cache=True, **kwargs)
            cache = out["cache"] if "cache" in out else out["past_key_values"]
            if not hasattr(cache, "batch_repeat_interleave"):
                log.info("judge: this model's cache cannot be batched; running whole rows")
                cache, prefix = None, 0
        for start in range(0, len(rows), self.cfg.batch_size):
            micro = rows[start : start + self.cfg.batch_size]
            if cache is not None:
                last_logits.append(self._suffix_forward(micro, prefix, cache, device))
            else:
                last_logits.append(self._full_forward(micro, device))
        logp = torch.log_softmax(torch.cat(last_logits).float(), dim=-1)
        label_a, label_b = (torch.logsumexp(logp[:, ids], dim=-1).cpu() for ids in self.label_ids)
        return label_a, label_b

    def _suffix_forward(
        self, micro: list[list[int]], prefix: int, cache: Any, device: torch.device
    ) -> torch.Tensor:
        ids, suffix_mask = pad_left([r[prefix:] for r in micro], self.tokenizer.pad_token_id)
        mask = torch.cat([torch.ones((len(micro), prefix), dtype=torch.long), suffix_mask], dim=1)
        # Left padding sits between the cached prefix and each suffix: masked out, and the real tokens keep
        # the positions they have in the unpadded row.
        positions = prefix + (suffix_mask.cumsum(1) - 1).clamp(min=0)
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(len(micro))
        return self._last_logits(
            ids, mask, positions, device, use_cache=True, **{self._cache_arg: batch_cache}
        )

    def _full_forward(self, micro: list[list[int]], device: torch.device) -> torch.Tensor:
        ids, mask = pad_left(micro, self.tokenizer.pad_token_id)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding must not shift the real positions
        return self._last_logits(ids, mask, positions, device)

    def _last_logits(self, ids, mask, positions, device: torch.device, **kwargs: Any) -> torch.Tensor:
        if self._keep_last:  # no [batch, time, vocab] logits when the model can skip them
            kwargs["logits_to_keep"] = 1
        out = self.model(
            ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), **kwargs
        )
        return out["logits"][:, -1]


def load_lm_judge(cfg: JudgeConfig) -> LMJudge:
    """Load ``cfg.model`` (frozen, dropout off) and its tokenizer as an :class:`LMJudge`."""
    from fastrlhf.models import default_device, load_causal_lm, load_tokenizer

    if not cfg.model:
        raise ValueError("model: the judge model (a directory or hub id) is required")
    tokenizer = load_tokenizer(cfg.model, cfg.model_config)
    model = load_causal_lm(cfg.model, cfg.model_config, default_device(), tokenizer, trainable=False)
    return LMJudge(model, tokenizer, cfg)
