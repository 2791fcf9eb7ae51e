"""Datasets for the three stages, their validation, tokenization and batching.

Formats (JSON Lines, one object per line; blank lines are skipped):

* SFT: ``{"prompt": P, "completion": "..."}``. TRL's conversational variant, where ``completion`` is a list
  holding one assistant message, is accepted and reduced to that message's content.
* Rankings: K-way ``{"prompt": P, "responses": [...], "ranking": [2, 0, 1]}`` where ``ranking`` lists
  response indices best-first, with optional ``"ties": [[0, 1], ...]`` (disjoint groups judged equal: their
  pairs are dropped, as InstructGPT did), ``"status"`` (only "ranked" records train; "cannot_rank" and
  "skipped" ones are skipped) and ``"pairwise_probs"`` (a judge's [K][K] P(i better than j), for
  ``RMConfig.soft_targets``). Also read natively, and mixable in one file: TRL's ``prompt/chosen/rejected``
  (strings or chat messages, with or without the prompt), Anthropic HH-RLHF transcripts, UltraFeedback's
  ``completions`` with ratings and OpenAssistant's ranked replies (flat message rows or trees); see
  :mod:`fastrlhf.preference_formats`.
* Samples to rank (``fastrlhf sample`` output): ``{"prompt": P, "responses": [...]}`` with an optional ``id``.
* Prompts: ``.jsonl`` records with ``prompt``, or ``.txt`` with one prompt per non-empty line.

A prompt ``P`` is a string or a chat: a list of ``{"role": ..., "content": ...}`` messages.
Bad records raise :class:`DataError` naming the file, the line and the field, so a broken dataset fails at
load time with a message that points at the fix rather than deep inside a training step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

Prompt = str | list[dict[str, str]]
"""A plain-text prompt, or a chat as a list of {"role", "content"} messages (TRL's conversational format)."""

PAD_TOKEN = "<|pad|>"


class DataError(ValueError):
    """A malformed record: the message reads ``<source>:<line>: field '<field>': <problem>``.

    For Hugging Face datasets the location is ``<name> (<split>) row <index>`` (the 0-based ``ds[index]``).
    """

    def __init__(self, source: str, line: int | str, field: str | None, problem: str) -> None:
        self.source, self.line, self.field, self.problem = source, line, field, problem
        where = f"{source}:{line}" if isinstance(line, int) else f"{source} {line}"
        super().__init__(f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}")


@dataclass
class SFTExample:
    """One demonstration: the prompt and the completion the model is trained to produce."""

    prompt: Prompt
    completion: str
    line: int | str | None = field(default=None, compare=False)
    """Where the record came from (1-based line, or dataset row), for error reports."""


@dataclass
class Ranking:
    """K >= 2 responses to one prompt; ``ranking`` lists response indices best-first (a permutation)."""

    prompt: Prompt
    responses: list[str]
    ranking: list[int]
    line: int | str | None = field(default=None, compare=False)
    """Where the record came from (1-based line, or dataset row), for error reports."""
    ties: list[list[int]] = field(default_factory=list)
    """Disjoint groups of >= 2 response indices judged equal; pairs inside a group are not trained on."""
    pairwise_probs: list[list[float]] | None = None
    """A judge's [K][K] P(response i is better than response j), for soft targets; None for people."""


@dataclass
class Sample:
    """One prompt and its K responses to rank (``fastrlhf sample`` output)."""

    prompt: Prompt
    responses: list[str]
    item_id: str
    """The record's ``id``, or a digest of prompt and responses (the same one ``fastrlhf rank`` uses)."""
    line: int | str | None = field(default=None, compare=False)


RANKING_STATUSES = ("ranked", "cannot_rank", "skipped")

DATASET_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
"""Local files read through the `datasets` package (by its builder of that name); others are JSON Lines."""


# ----------------------------------------------------------------------------------------------- reading


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSON Lines file as ``(1-based line number, record)`` pairs, skipping blank lines."""
    out = []
    # utf-8-sig: files saved by some editors start with a BOM that json.loads rejects.
    with open(path, encoding="utf-8-sig") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(str(path), lineno, None, f"invalid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataError(str(path), lineno, None, f"expected a JSON object, got {_typename(record)}")
            out.append((lineno, record))
    return out


def _records(path: str | Path, split: str) -> tuple[str, list[tuple[int | str, dict[str, Any]]]]:
    """(source name, located records) from a local JSONL file or, failing that, a Hugging Face dataset."""
    p = Path(path)
    builder = DATASET_FILE_BUILDERS.get(p.suffix.lower())
    if p.is_file() and builder is None:
        return str(path), list(read_jsonl(p))
    try:
        import datasets  # optional dependency: only needed for hub / non-JSONL datasets
    except ImportError:
        if p.is_file():
            raise ImportError(f"{path}: reading {p.suffix} files needs the `datasets` package") from None
        raise FileNotFoundError(
            f"{path}: no such file (and the `datasets` package, needed to load it as a Hugging Face dataset "
            "name, is not installed)"
        ) from None
    source = f"{path} ({split})"
    if p.is_file():
        rows = datasets.load_dataset(builder, data_files={split: str(p)}, split=split)
    else:
        rows = datasets.load_dataset(str(path), split=split)
    located: list[tuple[int | str, dict[str, Any]]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(source, f"row {i}", None, f"expected a record, got {_typename(row)}")
        located.append((f"row {i}", row))
    return source, located


def _typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(record: dict[str, Any], name: str, source: str, line: int | str) -> Any:
    if name not in record:
        raise DataError(source, line, name, "missing")
    return record[name]


def _as_str(value: Any, name: str, source: str, line: int | str) -> str:
    if not isinstance(value, str):
        raise DataError(source, line, name, f"expected a string, got {_typename(value)}")
    return value


def _as_prompt(value: Any, source: str, line: int | str, name: str = "prompt") -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(source, line, name, "empty prompt")
        return value
    if not isinstance(value, list):
        raise DataError(
            source, line, name, f"expected a string or a list of messages, got {_typename(value)}"
        )
    if not value:
        raise DataError(source, line, name, "empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(source, line, f"{name}[{i}]", f"expected a message object, got {_typename(msg)}")
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(source, line, f"{name}[{i}].{key}", "missing")
            _as_str(msg[key], f"{name}[{i}].{key}", source, line)
    return value


def _as_response(value: Any, name: str, source: str, line: int | str) -> str:
    """A response string; TRL's conversational ``[{"role": "assistant", "content": ...}]`` is unwrapped."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise DataError(source, line, name, "expected a string or a list with one assistant message")
        return _as_str(value[0].get("content"), f"{name}[0].content", source, line)
    return _as_str(value, name, source, line)


def _as_ranking(value: Any, k: int, source: str, line: int | str) -> list[int]:
    # bool is an int subclass; [True, False] is a data bug, not a ranking.
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(source, line, "ranking", f"expected a list of integers, got {value!r}")
    if sorted(value) != list(range(k)):
        raise DataError(
            source, line, "ranking", f"expected a permutation of 0..{k - 1} (best first), got {value!r}"
        )
    return list(value)


def _as_ties(value: Any, k: int, source: str, line: int | str) -> list[list[int]]:
    """Disjoint groups of >= 2 distinct response indices."""
    if not isinstance(value, list):
        raise DataError(source, line, "ties", f"expected a list of groups of response indices, got {value!r}")
    seen: set[int] = set()
    groups = []
    for g, group in enumerate(value):
        name = f"ties[{g}]"
        if not isinstance(group, list) or len(group) < 2:
            raise DataError(
                source, line, name, f"expected a list of at least 2 response indices, got {group!r}"
            )
        for index in group:
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < k:
                raise DataError(source, line, name, f"expected indices in 0..{k - 1}, got {index!r}")
            if index in seen:
                raise DataError(
                    source, line, name, f"response {index} is in two tie groups (or twice in one)"
                )
            seen.add(index)
        groups.append(list(group))
    return groups


def _as_pairwise_probs(value: Any, k: int, source: str, line: int | str) -> list[list[float]]:
    """A [K][K] matrix of probabilities with p[i][j] + p[j][i] = 1 (a transposed or random one fails)."""
    name = "pairwise_probs"
    if (
        not isinstance(value, list)
        or len(value) != k
        or not all(isinstance(r, list) and len(r) == k for r in value)
    ):
        raise DataError(source, line, name, f"expected a {k} x {k} matrix (one row per response)")
    for i, row in enumerate(value):
        for j, p in enumerate(row):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise DataError(
                    source, line, f"{name}[{i}][{j}]", f"expected a probability in [0, 1], got {p!r}"
                )
    for i in range(k):
        for j in range(i, k):
            if abs(value[i][j] + value[j][i] - 1.0) > 1e-3:
                raise DataError(
                    source,
                    line,
                    f"{name}[{i}][{j}]",
                    f"p[i][j] + p[j][i] must be 1, got {value[i][j] + value[j][i]}",
                )
    return [[float(p) for p in row] for row in value]


def ranked_pairs(ranking: Sequence[int], ties: Sequence[Sequence[int]] = ()) -> list[tuple[int, int]]:
    """(better, worse) response pairs of a best-first ``ranking``, leaving out pairs inside a tie group."""
    group = {index: g for g, members in enumerate(ties) for index in members}
    return [
        (a, b) for a, b in combinations(ranking, 2) if a not in group or group[a] != group.get(b)
    ]  # combinations keep best-first order


def _k_way_ranking(rec: dict[str, Any], prompt: Prompt, source: str, line: int | str) -> Ranking | None:
    """The shared schema (what ``fastrlhf rank`` and ``fastrlhf judge`` write); None when not ranked."""
    status = rec.get("status", "ranked")
    if status not in RANKING_STATUSES:
        raise DataError(
            source, line, "status", f"expected one of {', '.join(RANKING_STATUSES)}, got {status!r}"
        )
    raw = rec["responses"]
    if not isinstance(raw, list) or len(raw) < 2:
        got = f"{len(raw)}" if isinstance(raw, list) else _typename(raw)
        raise DataError(source, line, "responses", f"expected a list of at least 2 responses, got {got}")
    responses = [_as_response(r, f"responses[{i}]", source, line) for i, r in enumerate(raw)]
    if status != "ranked":
        return None
    ranking = _as_ranking(_get(rec, "ranking", source, line), len(responses), source, line)
    ties = _as_ties(rec.get("ties") or [], len(responses), source, line)
    probs = rec.get("pairwise_probs")
    if probs is not None:
        probs = _as_pairwise_probs(probs, len(responses), source, line)
    return Ranking(prompt, responses, ranking, line, ties, probs)


# ----------------------------------------------------------------------------------------------- loaders


def load_sft(path: str | Path, *, split: str = "train") -> list[SFTExample]:
    """Load ``prompt``/``completion`` records (``split`` applies to Hugging Face datasets only)."""
    source, records = _records(path, split)
    out = []
    for line, rec in records:
        prompt = _as_prompt(_get(rec, "prompt", source, line), source, line)
        completion = _as_response(_get(rec, "completion", source, line), "completion", source, line)
        out.append(SFTExample(prompt, completion, line))
    return out


def load_rankings(path: str | Path, *, split: str = "train") -> list[Ranking]:
    """Load rankings in any of the formats of the module docstring (records may mix formats).

    Records that are not ranked (``status`` "cannot_rank" or "skipped", UltraFeedback prompts with fewer
    than two rated completions, OpenAssistant replies without a rank) are left out, and counted in the log.
    """
    from fastrlhf import preference_formats as formats

    source, records = _records(path, split)
    out: list[Ranking] = []
    oasst_rows: list[tuple[int | str, dict[str, Any]]] = []
    skipped = 0
    for line, rec in records:
        if formats.is_oasst_row(rec):
            oasst_rows.append((line, rec))
            continue
        if formats.is_oasst_tree(rec):
            out.extend(formats.oasst_tree_rankings(rec, source, line))
            continue
        if "completions" in rec:
            ranking = formats.ultrafeedback_ranking(rec, source, line)
        elif "responses" in rec:
            prompt = _as_prompt(_get(rec, "prompt", source, line), source, line)
            ranking = _k_way_ranking(rec, prompt, source, line)
        elif "chosen" in rec:
            ranking = formats.chosen_rejected_ranking(rec, source, line)
        elif "prompt" in rec or "rejected" in rec:
            raise DataError(
                source, line, "chosen", "missing (a record needs chosen/rejected or responses/ranking)"
            )
        else:
            raise DataError(
                source, line, None,
                "unrecognized record: expected responses/ranking, prompt/chosen/rejected, chosen/rejected "
                "transcripts, UltraFeedback completions or OpenAssistant messages",
            )  # fmt: skip
        if ranking is None:
            skipped += 1
        else:
            out.append(ranking)
    if oasst_rows:
        out.extend(formats.oasst_row_rankings(oasst_rows, source))
    if skipped:
        logging.getLogger("fastrlhf").info(
            "%s: %d records are not rankings (status, or too few ratings)", source, skipped
        )
    return out


def load_samples(path: str | Path, *, split: str = "train") -> list[Sample]:
    """Load ``{"prompt", "responses": [K >= 2]}`` records to rank, with the item ids of ``fastrlhf rank``."""
    import hashlib

    source, records = _records(path, split)
    out: list[Sample] = []
    seen: dict[str, int | str] = {}
    for line, rec in records:
        prompt = _as_prompt(_get(rec, "prompt", source, line), source, line)
        raw = _get(rec, "responses", source, line)
        if not isinstance(raw, list) or len(raw) < 2:
            got = f"{len(raw)}" if isinstance(raw, list) else _typename(raw)
            raise DataError(source, line, "responses", f"expected a list of at least 2 responses, got {got}")
        responses = [_as_str(r, f"responses[{i}]", source, line) for i, r in enumerate(raw)]
        if "id" in rec:
            item_id = rec["id"]
            if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not str(item_id).strip():
                raise DataError(
                    source, line, "id", f"expected a non-empty string or integer, got {item_id!r}"
                )
            item_id = str(item_id)
            if item_id in seen:
                raise DataError(source, line, "id", f"{item_id!r} was already used at {seen[item_id]}")
        else:  # the content digest, numbered like `fastrlhf rank` numbers identical records
            content = json.dumps([prompt, raw], ensure_ascii=False, sort_keys=True)
            base = item_id = hashlib.sha256(content.encode()).hexdigest()[:12]
            n = 2
            while item_id in seen:
                item_id, n = f"{base}-{n}", n + 1
        seen[item_id] = line
        out.append(Sample(prompt, responses, item_id, line))
    if not out:
        raise DataError(source, 1, None, "no records to rank")
    return out


def load_prompts(path: str | Path, *, split: str = "train") -> list[Prompt]:
    """Load PPO prompts from ``.txt`` (one per non-empty line) or from records with a ``prompt`` field."""
    p = Path(path)
    if p.suffix == ".txt" and p.is_file():
        with open(p, encoding="utf-8-sig") as f:
            return [text.rstrip("\r\n") for text in f if text.strip()]
    source, records = _records(path, split)
    return [_as_prompt(_get(rec, "prompt", source, line), source, line) for line, rec in records]


# ------------------------------------------------------------------------------------------ tokenization


def ensure_pad_token(tokenizer: Any, model: torch.nn.Module | None = None) -> bool:
    """Give the tokenizer a pad token distinct from EOS; True when one was added.

    Padding with EOS would make masks built from ``ids == pad_id`` hide real EOS tokens, so the model would
    never learn to stop. The new ``<|pad|>`` row of a resized embedding is never trained: the caller should
    keep it out of sampling (e.g. ``logits[..., pad_id] = -inf``) during generation.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if model is not None:
        # Many checkpoints already pad their embeddings (e.g. to a multiple of 64): resize only if needed.
        needed = max(len(tokenizer), tokenizer.pad_token_id + 1)
        if model.get_input_embeddings().num_embeddings < needed:
            model.resize_token_embeddings(needed)
        for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            if cfg is not None:
                cfg.pad_token_id = tokenizer.pad_token_id
    return True


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt, ending where the model's response starts.

    With a chat template the prompt is rendered with ``add_generation_prompt=True`` (a plain string becomes
    one user message); otherwise plain text is encoded with the tokenizer's special tokens (BOS if it adds
    one).
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if not isinstance(ids, list):  # a BatchEncoding on versions that ignore return_dict=False
            ids = ids["input_ids"]
        return list(ids)
    if not isinstance(prompt, str):
        # Inventing a chat format here would train on a format nothing else uses; make the mismatch loud.
        raise ValueError(
            "a chat prompt needs a tokenizer with a chat_template; set one or use string prompts"
        )
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Response token ids (no special tokens) followed by EOS.

    Encoded apart from the prompt so the ids match what generation appends after ``encode_prompt``'s ids.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token; responses must end with one so the model learns to stop"
        )
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def filter_long_prompts(
    prompt_ids: Sequence[Sequence[int]],
    max_len: int,
    source: str,
    *,
    lines: Sequence[int | str | None] | None = None,
    what: str = "prompt",
) -> tuple[list[int], str | None]:
    """Indices of sequences of at most ``max_len`` tokens, and a report of the others (None if none).

    Truncating a prompt silently changes the task, so over-long ones are reported (count, where, lengths)
    and the caller drops them with the report as a warning. ``lines`` (e.g. ``SFTExample.line``) locates
    them in the file; without it the report gives 0-based indices.
    """
    kept, long = [], []
    for i, ids in enumerate(prompt_ids):
        (kept if len(ids) <= max_len else long).append(i)
    if not long:
        return kept, None
    shown = 10  # enough to find the pattern without flooding the log

    def where(i: int) -> str:
        loc = lines[i] if lines is not None else None
        return f"#{i}" if loc is None else (f"line {loc}" if isinstance(loc, int) else str(loc))

    items = ", ".join(f"{where(i)} ({len(prompt_ids[i])} tokens)" for i in long[:shown])
    more = f", and {len(long) - shown} more" if len(long) > shown else ""
    head = f"{source}: {len(long)} of {len(prompt_ids)} {what}s exceed the limit of {max_len} tokens"
    report = f"{head}: {items}{more}"
    return kept, report


# ---------------------------------------------------------------------------------------------- batching


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not seqs:
        raise ValueError("cannot pad an empty batch")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("cannot pad an empty sequence (its row would attend to nothing)")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad for generation, so every row's next token is sampled at the same last column."""
    return _pad(seqs, pad_id, left=True)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad for training: ``(input_ids, attention_mask)``, both int64 ``[B, T]``."""
    return _pad(seqs, pad_id, left=False)


def sft_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + completion`` rows with ``loss_mask`` (float32) 1 on completion tokens only.

    ``loss_mask[b, t]`` refers to token ``input_ids[b, t]``: the loss at position t is that of predicting
    token t from positions < t, i.e. from ``logits[b, t - 1]``. A loss over shifted logits therefore uses
    ``logits[:, :-1]``, ``input_ids[:, 1:]`` and ``loss_mask[:, 1:]``.
    """
    ids, mask = pad_right([[*p, *c] for p, c in examples], pad_id)
    loss_mask = torch.zeros(ids.shape, dtype=torch.float32)
    for row, (p, c) in enumerate(examples):
        loss_mask[row, len(p) : len(p) + len(c)] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def ranking_batch(
    items: Sequence[tuple[Any, ...]], pad_id: int, *, soft_targets: bool = False
) -> dict[str, torch.Tensor]:
    """Every response of every ranking as a right-padded ``prompt + response`` row, plus the pairs to compare.

    An item is ``(prompt ids, [response ids], ranking)`` or ``(prompt ids, [response ids], ranking, ties,
    pairwise_probs)`` with ``pairwise_probs`` None or [K][K]. Item ``i``'s K responses occupy consecutive rows
    in their original order. Returns ``input_ids`` and ``attention_mask`` ``[R, T]``; ``last_index`` ``[R]``,
    each row's final token (where a reward is read); ``pairs`` ``[P, 2]`` (better row, worse row) over the
    ranking's C(K, 2) pairs less those inside a tie group; ``group`` ``[P]``, the item of each pair;
    ``pair_target`` ``[P]``, P(better beats worse): 1, or with ``soft_targets`` the item's
    ``pairwise_probs`` (then over all C(K, 2) pairs, tied ones included); and ``pair_weight`` ``[P]`` =
    1 / (pairs of the item * items with pairs), so ``-(pair_weight * logsigmoid(r_better - r_worse)).sum()``
    is InstructGPT's loss: the mean over each ranking's pairs, then over rankings (each ranking is one batch
    element, so large K does not dominate).
    """
    rows: list[list[int]] = []
    pairs: list[tuple[int, int]] = []
    group: list[int] = []
    target: list[float] = []
    per_item: list[list[tuple[int, int, float]]] = []
    for i, (prompt, responses, ranking, *extra) in enumerate(items):
        ties = extra[0] if extra else ()
        probs = extra[1] if len(extra) > 1 else None
        k = len(responses)
        if k < 2 or sorted(ranking) != list(range(k)):
            raise ValueError(f"item {i}: ranking {list(ranking)} is not a permutation of {k} >= 2 responses")
        base = len(rows)
        rows.extend([*prompt, *r] for r in responses)
        if soft_targets and probs is not None:
            item_pairs = [(a, b, float(probs[a][b])) for a, b in combinations(ranking, 2)]
        else:
            item_pairs = [(a, b, 1.0) for a, b in ranked_pairs(ranking, ties or ())]
        per_item.append([(base + a, base + b, t) for a, b, t in item_pairs])
    n_items = sum(1 for p in per_item if p)
    weight: list[float] = []
    for i, item_pairs in enumerate(per_item):
        for better, worse, t in item_pairs:
            pairs.append((better, worse))
            group.append(i)
            target.append(t)
            weight.append(1.0 / (len(item_pairs) * n_items))
    ids, mask = pad_right(rows, pad_id)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "last_index": mask.sum(dim=1) - 1,
        "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        "group": torch.tensor(group, dtype=torch.long),
        "pair_target": torch.tensor(target, dtype=torch.float32),
        "pair_weight": torch.tensor(weight, dtype=torch.float32),
    }
