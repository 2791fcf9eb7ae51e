"""The ranking task: its options, the items read from ``fastrlhf sample`` output, and per-labeler orders.

Everything here is a pure function of the data file and the options, so a restarted server rebuilds the same
task: the same item ids, the same overlap set and the same shown order for every (labeler, item).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import random
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastrlhf.config import ConfigError, OptionChecker
from fastrlhf.data import DataError, read_jsonl

DEFAULT_FLAGS = (
    "fails_instruction:Fails to follow the instruction,"
    "unsafe:Unsafe or harmful,"
    "hallucination:Makes things up,"
    "inappropriate:Inappropriate for an assistant,"
    "opinion:Expresses an opinion or moral judgment"
)
"""InstructGPT's per-output metadata labels (Table 3), shortened; ``id:label`` pairs, comma-separated."""

MAX_RESPONSES = 16
"""The page stays usable up to this many responses per prompt (InstructGPT showed 4 to 9)."""

LABELER_PATTERN = re.compile(r"^[\w.@ -]{1,64}$")
"""A labeler name: letters, digits, ``_ . @ -`` and spaces, at most 64 characters."""

_FLAG_ID = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_HOST_NAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class RankConfig:
    """``fastrlhf rank``: a ranking page on localhost that appends one fsynced JSONL line per submission."""

    data: str = ""
    """Input JSONL from ``fastrlhf sample``: ``{"prompt", "responses": [K]}`` per line (optional ``id``)."""
    out: str = "rankings.jsonl"
    """Output JSONL, appended to and resumed from; ``fastrlhf rm`` reads it (records with status "ranked")."""
    host: str = "127.0.0.1"
    """Interface to bind. Anything but a loopback address opens the page to the network (token-protected)."""
    port: int = 8765
    """TCP port; 0 picks a free one (printed at start)."""
    allow_hosts: str = ""
    """Extra comma-separated host names the page may be reached by (``Host`` header), e.g. when binding
    0.0.0.0. Loopback names, and the bound host itself, are always allowed."""
    token: str = ""
    """Secret every API request must carry. Empty: a random one per start (it is part of the printed URL)."""
    overlap: int = 0
    """Items every labeler ranks, for inter-labeler agreement (a seeded sample of the data). Every other
    item is handed to one labeler only."""
    seed: int = 0
    """Seed of the overlap sample and of each labeler's shown order."""
    flags: str = DEFAULT_FLAGS
    """Per-response flags the labeler can tick, as comma-separated ``id:label`` pairs; empty for none."""
    open_browser: bool = False
    """Open the page in the default browser once the server is up."""

    def flag_list(self) -> list[tuple[str, str]]:
        """``[(id, label), ...]`` from ``flags``, with a clear error naming the option."""
        out: list[tuple[str, str]] = []
        for part in (p.strip() for p in self.flags.split(",")):
            if not part:
                continue
            flag_id, _, label = part.partition(":")
            flag_id = flag_id.strip()
            if not _FLAG_ID.match(flag_id):
                raise ValueError(f"flags: {flag_id!r} is not a flag id (lowercase letters, digits, _)")
            if flag_id in (f for f, _ in out):
                raise ValueError(f"flags: {flag_id!r} is given twice")
            out.append((flag_id, label.strip() or flag_id.replace("_", " ")))
        return out

    def allowed_hosts(self) -> set[str]:
        """Host names (no port) the ``Host`` header may carry."""
        hosts = set(_LOCAL_HOSTS) | {h.strip().lower() for h in self.allow_hosts.split(",") if h.strip()}
        if self.host not in ("0.0.0.0", "::", ""):
            hosts.add(self.host.lower())
        return hosts

    def check(self) -> None:
        """Raise ``ValueError`` naming the option for settings that cannot work."""
        self.validate()

    def validate(self, prefix: str = "", *, provided: Collection[str] = ()) -> RankConfig:
        """Raise :class:`~fastrlhf.config.ConfigError` naming the option for settings that cannot work.
        ``provided=("data",)``: no data needed (the agreement report of ``out`` alone)."""
        c = OptionChecker(self, prefix, provided)
        if not self.data and "data" not in c.provided:
            raise ConfigError(f"{prefix}data: give the JSONL to rank (--data to_rank.jsonl)")
        if not self.out:
            raise ConfigError(f"{prefix}out: give the output JSONL (--out rankings.jsonl)")
        c.out_file("out")
        if not _is_host(self.host):
            c.fail("host", "an IP address or a host name (127.0.0.1 keeps the page local)")
        for host in (h.strip() for h in self.allow_hosts.split(",")):
            if host and not _is_host(host):
                c.fail("allow_hosts", f"comma-separated host names ({host!r} is not one)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{prefix}port: expected 0..65535, got {self.port}")
        if self.overlap < 0:
            raise ConfigError(f"{prefix}overlap: expected >= 0, got {self.overlap}")
        if self.token and len(self.token) < 8:
            c.fail("token", "at least 8 characters (or empty for a random one)", "*" * len(self.token))
        c.seed()
        try:
            self.flag_list()
        except ValueError as e:
            raise ConfigError(f"{prefix}{e}") from None
        return self


def _is_host(host: str) -> bool:
    """An IP address, a host name, or empty (every interface, like 0.0.0.0)."""
    if not host or _HOST_NAME.match(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class Item:
    """One prompt and its K responses, in the data file's order."""

    item_id: str
    prompt: str | list[dict[str, str]]
    responses: list[str]
    line: int
    overlap: bool = False


@dataclass
class Task:
    """The items of one data file; ``task_id`` is the file's digest, so pages of another task are refused."""

    task_id: str
    items: list[Item]
    by_id: dict[str, Item] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {item.item_id: item for item in self.items}


def _check_prompt(value: Any, source: str, line: int) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(source, line, "prompt", "empty prompt")
        return value
    if not isinstance(value, list) or not value:
        raise DataError(source, line, "prompt", "expected a string or a non-empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(source, line, f"prompt[{i}]", "expected a message object")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise DataError(source, line, f"prompt[{i}].{key}", "expected a string")
    return value


def _item_id(record: dict[str, Any], source: str, line: int) -> str | None:
    """The record's own ``id`` when given; None asks for a content digest."""
    if "id" not in record:
        return None
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(source, line, "id", f"expected a non-empty string or integer, got {value!r}")
    return str(value)


def load_task(cfg: RankConfig) -> Task:
    """Read and validate ``cfg.data``; every problem is a ``DataError`` naming the file, line and field."""
    path = Path(cfg.data)
    if not path.is_file():
        raise FileNotFoundError(f"data: {path}: no such file")
    source = str(path)
    digest_of_file = hashlib.sha256(path.read_bytes()).hexdigest()
    items: list[Item] = []
    seen: dict[str, int] = {}
    for line, record in read_jsonl(path):
        if "prompt" not in record:
            raise DataError(source, line, "prompt", "missing")
        prompt = _check_prompt(record["prompt"], source, line)
        raw = record.get("responses")
        if raw is None:
            raise DataError(source, line, "responses", "missing")
        if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_RESPONSES:
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise DataError(source, line, "responses", f"expected a list of 2..{MAX_RESPONSES}, got {got}")
        for i, r in enumerate(raw):
            if not isinstance(r, str):
                raise DataError(source, line, f"responses[{i}]", f"expected a string, got {type(r).__name__}")
        item_id = _item_id(record, source, line)
        if item_id is None:
            content = json.dumps([prompt, raw], ensure_ascii=False, sort_keys=True)
            item_id = hashlib.sha256(content.encode()).hexdigest()[:12]
            # Identical records stay distinct items, numbered in file order.
            base, n = item_id, 2
            while item_id in seen:
                item_id, n = f"{base}-{n}", n + 1
        elif item_id in seen:
            raise DataError(source, line, "id", f"{item_id!r} was already used on line {seen[item_id]}")
        seen[item_id] = line
        items.append(Item(item_id, prompt, list(raw), line))
    if not items:
        raise DataError(source, 1, None, "no records to rank")
    if cfg.overlap > len(items):
        raise ValueError(f"overlap: {cfg.overlap} items asked for, but {source} has only {len(items)}")
    for index in random.Random(cfg.seed).sample(range(len(items)), cfg.overlap):
        items[index].overlap = True
    return Task(task_id=digest_of_file[:16], items=items)


def shown_order(seed: int, labeler: str, item_id: str, k: int) -> list[int]:
    """The order labeler sees item's responses in: ``shown[position] = response index``.

    Seeded by (seed, labeler, item), so it differs between labelers and survives a restart.
    """
    digest = hashlib.sha256(f"{seed}\0{labeler}\0{item_id}".encode()).digest()
    order = list(range(k))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order
