"""The durable side of ``fastrlhf rank``: checked submissions become records appended to the output JSONL.

Each record is one ``write`` of one line, flushed and fsynced before the page hears "saved", so a killed
server loses at most a submission it never confirmed. On start the file is read back: a line torn by a kill
mid-write (the only way an unconfirmed line can exist) is cut off, and the records say which items each
labeler has finished, which is all a resume needs.

A record (what ``fastrlhf rm`` reads, for status "ranked")::

    {"prompt", "responses": [K], "ranking": [best..worst], "ties": [[i, j], ...], "labeler", "item_id",
     "shown_order": [K], "ratings": {"i": 1-7}, "flags": {"i": [flag]}, "comment", "status",
     "submitted_at", "unchanged_order_confirmed"}

All indices are indices into ``responses`` (the data file's order), never screen positions.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastrlhf.data import DataError
from fastrlhf.rank.task import LABELER_PATTERN, Item, Task

log = logging.getLogger(__name__)

STATUSES = ("ranked", "cannot_rank", "skipped")
FINAL_FOR_ITEM = ("ranked", "cannot_rank")
"""Statuses that finish an item for everyone: a skip leaves it to another labeler."""
MAX_COMMENT = 5000


class SubmissionError(ValueError):
    """A submission the server refuses; ``field`` names the part of it that is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _position(key: Any, k: int, name: str) -> int:
    """A screen position, from a JSON key ("2") or value (2)."""
    if isinstance(key, str) and key.isdigit():
        key = int(key)
    if not _int(key) or not 0 <= key < k:
        raise SubmissionError(name, f"expected a position 0..{k - 1}, got {key!r}")
    return key


def check_labeler(name: Any) -> str:
    if not isinstance(name, str) or not LABELER_PATTERN.match(name) or not name.strip():
        raise SubmissionError("labeler", "expected 1-64 letters, digits, spaces or _ . @ -")
    return name


def build_record(
    item: Item, labeler: str, shown: list[int], body: dict[str, Any], flag_ids: set[str]
) -> dict[str, Any]:
    """Check a page submission and turn screen positions into response indices.

    ``body`` is ``{"status", "tiers": [[position, ...], ...] (best tier first), "ratings": {position: 1-7},
    "flags": {position: [flag id]}, "comment", "unchanged_order_confirmed"}``; ``shown[position]`` is the
    response index shown there.
    """
    k = len(item.responses)
    status = body.get("status")
    if status not in STATUSES:
        raise SubmissionError("status", f"expected one of {', '.join(STATUSES)}, got {status!r}")
    ranking: list[int] = []
    ties: list[list[int]] = []
    confirmed = body.get("unchanged_order_confirmed", False)
    if not isinstance(confirmed, bool):
        raise SubmissionError("unchanged_order_confirmed", "expected true or false")
    if status == "ranked":
        tiers = body.get("tiers")
        if not isinstance(tiers, list) or not all(isinstance(t, list) and t for t in tiers):
            raise SubmissionError("tiers", "expected a list of non-empty lists of positions")
        positions = [_position(p, k, "tiers") for tier in tiers for p in tier]
        if sorted(positions) != list(range(k)):
            raise SubmissionError("tiers", f"expected every position 0..{k - 1} exactly once, got {tiers!r}")
        unchanged = all(len(t) == 1 for t in tiers) and positions == list(range(k))
        if unchanged and not confirmed:
            raise SubmissionError("unchanged_order_confirmed", "the order is the one shown; confirm it")
        confirmed = confirmed and unchanged
        ranking = [shown[p] for p in positions]
        ties = [[shown[p] for p in tier] for tier in tiers if len(tier) > 1]
    else:
        confirmed = False
    ratings: dict[str, int] = {}
    raw_ratings = body.get("ratings") or {}
    if not isinstance(raw_ratings, dict):
        raise SubmissionError("ratings", "expected an object of position: 1-7")
    for key, value in raw_ratings.items():
        index = shown[_position(key, k, "ratings")]
        if not _int(value) or not 1 <= value <= 7:
            raise SubmissionError("ratings", f"expected a rating 1..7, got {value!r}")
        ratings[str(index)] = value
    flags: dict[str, list[str]] = {}
    raw_flags = body.get("flags") or {}
    if not isinstance(raw_flags, dict):
        raise SubmissionError("flags", "expected an object of position: [flag id]")
    for key, value in raw_flags.items():
        index = shown[_position(key, k, "flags")]
        if not isinstance(value, list) or not all(v in flag_ids for v in value):
            raise SubmissionError("flags", f"expected a list of {sorted(flag_ids)}, got {value!r}")
        if value:
            flags[str(index)] = sorted(set(value))
    comment = body.get("comment", "")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise SubmissionError("comment", f"expected a string of at most {MAX_COMMENT} characters")
    return {
        "prompt": item.prompt,
        "responses": item.responses,
        "ranking": ranking,
        "ties": ties,
        "labeler": labeler,
        "item_id": item.item_id,
        "shown_order": shown,
        "ratings": dict(sorted(ratings.items(), key=lambda kv: int(kv[0]))),
        "flags": dict(sorted(flags.items(), key=lambda kv: int(kv[0]))),
        "comment": comment,
        "status": status,
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "unchanged_order_confirmed": confirmed,
    }


@dataclass
class Progress:
    """What one labeler has done and what is left for them."""

    done: int
    remaining: int


class RankingStore:
    """The output JSONL: read back on start, then appended to (one fsynced line per submission)."""

    def __init__(self, path: str | Path, task: Task) -> None:
        self.path = Path(path)
        self.task = task
        self.records: list[dict[str, Any]] = []
        self.status: dict[tuple[str, str], str] = {}
        """(labeler, item_id) -> status of that labeler's submission."""
        self.finished_items: set[str] = set()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._read_back()
        else:
            self.path.touch()
            _fsync_dir(self.path.parent)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held for the server's life)

    def _read_back(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning(
                "%s: dropping a torn last line (%d bytes) left by a killed server", self.path, len(data) - cut
            )
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
            data = data[:cut]
        source = str(self.path)
        for line, text in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(source, line, None, f"invalid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataError(source, line, None, "expected a JSON object")
            item_id, labeler, status = record.get("item_id"), record.get("labeler"), record.get("status")
            if item_id not in self.task.by_id:
                raise DataError(
                    source,
                    line,
                    "item_id",
                    f"{item_id!r} is not an item of {self.task.task_id} (another data file?)",
                )
            if not isinstance(labeler, str):
                raise DataError(source, line, "labeler", "expected a string")
            if status not in STATUSES:
                raise DataError(source, line, "status", f"expected one of {', '.join(STATUSES)}")
            self._note(record)

    def _note(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.status[(record["labeler"], record["item_id"])] = record["status"]
        if record["status"] in FINAL_FOR_ITEM:
            self.finished_items.add(record["item_id"])

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line and fsync it; raises ``SubmissionError`` if already submitted."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if (record["labeler"], record["item_id"]) in self.status:
                raise SubmissionError("item_id", "already submitted by this labeler")
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._note(record)

    def submitted(self, labeler: str, item_id: str) -> bool:
        return (labeler, item_id) in self.status

    def available_to(self, labeler: str, item: Item) -> bool:
        """Whether ``item`` is still in ``labeler``'s queue (reservations aside)."""
        if self.submitted(labeler, item.item_id):
            return False
        return item.overlap or item.item_id not in self.finished_items

    def progress(self, labeler: str) -> Progress:
        done = sum(1 for (name, _) in self.status if name == labeler)
        remaining = sum(1 for item in self.task.items if self.available_to(labeler, item))
        return Progress(done=done, remaining=remaining)

    def close(self) -> None:
        self._file.close()


def _fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable too (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
