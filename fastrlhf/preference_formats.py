"""The public preference formats `fastrlhf rm` reads natively, each turned into a ``Ranking``.

* TRL preference: ``prompt/chosen/rejected``, strings or chat messages; without ``prompt`` ("implicit
  prompt"), the shared leading messages are the prompt.
* Anthropic HH-RLHF: ``chosen``/``rejected`` full transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``);
  the prompt is their shared prefix up to its last ``"\\n\\nAssistant:"``, the responses are the rest.
* UltraFeedback (``openbmb/UltraFeedback``): ``instruction`` plus ``completions[{response,
  fine-grained_score, annotations}]``; ranked by ``fine-grained_score`` (else the mean of the numeric
  annotation ratings), equal scores tied, unscored completions ("N/A", NaN) dropped.
* OpenAssistant (oasst1/oasst2): flat message rows (``message_id``, ``parent_id``, ``role``, ``text``,
  ``rank``) or message trees (``{"prompt": {..., "replies": [...]}}``). The ranked assistant siblings of a
  message form a ranking (lower ``rank`` is better, equal ranks tied, null ranks dropped); the prompt is the
  chat from the root to their parent.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from fastrlhf.data import DataError, Prompt, Ranking, _as_prompt, _as_response, _as_str, _get, _typename

HH_ASSISTANT = "\n\nAssistant:"
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _ranking_from_scores(
    prompt: Prompt, responses: list[str], scores: list[float], line: int | str, *, higher_is_better: bool
) -> Ranking:
    """Best first by score; equal scores become tie groups (indices in file order)."""
    sign = -1.0 if higher_is_better else 1.0
    ranking = sorted(range(len(responses)), key=lambda i: (sign * scores[i], i))
    by_score: dict[float, list[int]] = defaultdict(list)
    for i in ranking:
        by_score[scores[i]].append(i)
    ties = [g for g in by_score.values() if len(g) > 1]
    return Ranking(prompt, responses, ranking, line, ties)


# ---------------------------------------------------------------------------------------- TRL and HH-RLHF


def chosen_rejected_ranking(rec: dict[str, Any], source: str, line: int | str) -> Ranking:
    """TRL's explicit or implicit-prompt pair, or an HH-RLHF transcript pair, as a K=2 ranking."""
    rejected = _get(rec, "rejected", source, line)
    chosen = rec["chosen"]
    if "prompt" in rec:
        prompt = _as_prompt(rec["prompt"], source, line)
        responses = [
            _as_response(chosen, "chosen", source, line),
            _as_response(rejected, "rejected", source, line),
        ]
        return Ranking(prompt, responses, [0, 1], line)
    if isinstance(chosen, str):
        rejected = _as_str(rejected, "rejected", source, line)
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        cut = chosen.rfind(HH_ASSISTANT, 0, shared)
        if cut < 0:
            raise DataError(
                source, line, "chosen",
                "no prompt: chosen and rejected must be transcripts sharing a prefix that ends in "
                f"{HH_ASSISTANT!r} (HH-RLHF), or the record needs a 'prompt'",
            )  # fmt: skip
        cut += len(HH_ASSISTANT)
        return Ranking(chosen[:cut], [chosen[cut:], rejected[cut:]], [0, 1], line)
    # Conversational with an implicit prompt: the shared leading messages, then one assistant reply each.
    chosen = _as_prompt(chosen, source, line, "chosen")
    rejected = _as_prompt(rejected, source, line, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for name, chat in (("chosen", chosen), ("rejected", rejected)):
        if shared == 0 or len(chat) != shared + 1 or chat[-1]["role"] != "assistant":
            raise DataError(
                source, line, name,
                "with no 'prompt', chosen and rejected must share their leading messages and differ in one "
                "final assistant message",
            )  # fmt: skip
    return Ranking(chosen[:shared], [chosen[-1]["content"], rejected[-1]["content"]], [0, 1], line)


# -------------------------------------------------------------------------------------------- UltraFeedback


def _number(value: Any) -> float | None:
    """A finite rating from a number or a numeric string; None for "N/A", NaN and the like."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _ultrafeedback_score(completion: dict[str, Any]) -> float | None:
    score = _number(completion.get("fine-grained_score"))
    if score is not None:
        return score
    annotations = completion.get("annotations")
    if isinstance(annotations, dict):
        ratings = [_number(a.get("Rating")) for a in annotations.values() if isinstance(a, dict)]
        ratings = [r for r in ratings if r is not None]
        if ratings:
            return sum(ratings) / len(ratings)
    return None


def ultrafeedback_ranking(rec: dict[str, Any], source: str, line: int | str) -> Ranking | None:
    """Rank a prompt's rated completions; None when fewer than two have a score."""
    prompt = _as_prompt(
        rec["instruction"] if "instruction" in rec else _get(rec, "prompt", source, line), source, line
    )
    completions = rec["completions"]
    if not isinstance(completions, list):
        raise DataError(source, line, "completions", f"expected a list, got {_typename(completions)}")
    responses, scores = [], []
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            raise DataError(source, line, f"completions[{i}]", f"expected an object, got {_typename(c)}")
        if "response" not in c:
            raise DataError(source, line, f"completions[{i}].response", "missing")
        response = _as_str(c["response"], f"completions[{i}].response", source, line)
        score = _ultrafeedback_score(c)
        if score is not None:
            responses.append(response)
            scores.append(score)
    if len(responses) < 2:
        return None
    return _ranking_from_scores(prompt, responses, scores, line, higher_is_better=True)


# -------------------------------------------------------------------------------------------- OpenAssistant


def is_oasst_row(rec: dict[str, Any]) -> bool:
    return "message_id" in rec and "parent_id" in rec and "role" in rec


def is_oasst_tree(rec: dict[str, Any]) -> bool:
    return isinstance(rec.get("prompt"), dict) and "replies" in rec["prompt"]


def _oasst_message(msg: Any, source: str, line: int | str, name: str) -> dict[str, str]:
    if not isinstance(msg, dict):
        raise DataError(source, line, name, f"expected a message object, got {_typename(msg)}")
    role = _get(msg, "role", source, line)
    if role not in OASST_ROLES:
        raise DataError(source, line, f"{name}.role", f"expected 'prompter' or 'assistant', got {role!r}")
    return {
        "role": OASST_ROLES[role],
        "content": _as_str(_get(msg, "text", source, line), f"{name}.text", source, line),
    }


def _rank(msg: dict[str, Any], source: str, line: int | str, name: str) -> int | None:
    rank = msg.get("rank")
    if rank is None or msg.get("deleted"):
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank):
        raise DataError(source, line, f"{name}.rank", f"expected an integer or null, got {rank!r}")
    return int(rank)


def _sibling_ranking(
    chat: list[dict[str, str]], replies: list[tuple[dict[str, Any], str]], source: str, line
) -> Ranking | None:
    ranked = [(msg, name) for msg, name in replies if msg.get("role") == "assistant"]
    ranked = [(msg, name, _rank(msg, source, line, name)) for msg, name in ranked]
    ranked = [(msg, name, rank) for msg, name, rank in ranked if rank is not None]
    if len(ranked) < 2:
        return None
    responses = [_oasst_message(m, source, line, name)["content"] for m, name, _ in ranked]
    ranks = [float(rank) for _, _, rank in ranked]
    return _ranking_from_scores(chat, responses, ranks, line, higher_is_better=False)


def oasst_tree_rankings(rec: dict[str, Any], source: str, line: int | str) -> list[Ranking]:
    """Every ranked set of assistant siblings in a message tree (``{"prompt": {..., "replies": [...]}}``)."""
    out: list[Ranking] = []
    stack: list[tuple[dict[str, Any], list[dict[str, str]], str]] = [(rec["prompt"], [], "prompt")]
    while stack:
        node, path, name = stack.pop()
        chat = [*path, _oasst_message(node, source, line, name)]
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise DataError(source, line, f"{name}.replies", f"expected a list, got {_typename(replies)}")
        named = [(r, f"{name}.replies[{i}]") for i, r in enumerate(replies)]
        if chat[-1]["role"] == "user":
            ranking = _sibling_ranking(chat, named, source, line)
            if ranking is not None:
                out.append(ranking)
        stack.extend((r, chat, n) for r, n in reversed(named) if isinstance(r, dict))
    return out


def oasst_row_rankings(rows: list[tuple[int | str, dict[str, Any]]], source: str) -> list[Ranking]:
    """Rankings from flat oasst message rows: ranked assistant siblings grouped by ``parent_id``."""
    by_id = {rec["message_id"]: (line, rec) for line, rec in rows}
    children: dict[Any, list[tuple[int | str, dict[str, Any]]]] = defaultdict(list)
    for line, rec in rows:
        if rec["parent_id"] is not None:
            children[rec["parent_id"]].append((line, rec))
    out = []
    for parent_id, kids in children.items():
        first_line = kids[0][0]
        if parent_id not in by_id:
            if any(rec.get("role") == "assistant" and rec.get("rank") is not None for _, rec in kids):
                raise DataError(source, first_line, "parent_id", f"message {parent_id!r} is not in the data")
            continue
        chat: list[dict[str, str]] = []
        node_id: Any = parent_id
        while node_id is not None:
            if node_id not in by_id:
                raise DataError(
                    source, first_line, "parent_id", f"ancestor message {node_id!r} is not in the data"
                )
            node_line, node = by_id[node_id]
            chat.insert(0, _oasst_message(node, source, node_line, "text"))
            node_id = node["parent_id"]
        if chat[-1]["role"] != "user":
            continue
        ranking = _sibling_ranking(chat, [(rec, "message") for _, rec in kids], source, first_line)
        if ranking is not None:
            out.append(ranking)
    return out
