"""The records a worker appends as it goes (one JSON object per line), which the report is built from."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cases import Case


class Recorder:
    """Appends one JSON object per line to the parts file (a killed worker leaves every finished line)."""

    def __init__(self, path: Path) -> None:
        self._fh = path.open("a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def append_record(path: Path, **record: Any) -> None:
    rec = Recorder(path)
    try:
        rec.write(**record)
    finally:
        rec.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # the last line of a killed worker
                records.append(json.loads(line))
    return records


def case_record(type_: str, case: Case, provider: str, **fields: Any) -> dict[str, Any]:
    """A record about one (case, provider): a 'row' (timing), 'check' (correctness) or 'start' marker."""
    record = {"type": type_, "case": case.key, "op": case.op, "mode": case.mode, "shape": case.dims}
    return {**record, "dtype": case.dtype, "params": case.opts, "provider": provider, **fields}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class WorkerConfig:
    args: argparse.Namespace  # the parsed command line (cli.parse_args)
    deadline: float  # of this group (time.time() seconds)
    exclude: set[tuple[str, str]] = field(default_factory=set)  # (op, provider) that killed a worker before
    done: set[str] = field(default_factory=set)  # done_keys an earlier attempt at this group recorded

    @property
    def tiny(self) -> bool:
        """A CPU check of the script: tiny shapes (--dry-run, and --smoke, which takes the GPU code path)."""
        return self.args.dry_run or self.args.smoke

    def wants(self, provider: str) -> bool:
        return self.args.providers is None or provider in self.args.providers
