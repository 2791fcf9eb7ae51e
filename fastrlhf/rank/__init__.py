"""``fastrlhf rank``: people rank ``fastrlhf sample`` output in a browser, for ``fastrlhf rm`` to read.

``serve`` runs the page (``fastrlhf.rank.server``), ``report`` prints inter-labeler agreement
(``fastrlhf.rank.agreement``). Only serving needs Starlette and uvicorn: ``pip install 'fastrlhf[rank]'``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastrlhf.data import DataError, read_jsonl
from fastrlhf.rank.agreement import agreement_report, format_report
from fastrlhf.rank.task import RankConfig, load_task

__all__ = ["RankConfig", "agreement_report", "format_report", "report", "run_rank", "serve"]


def report(cfg: RankConfig) -> str:
    """The agreement report of ``cfg.out`` (``cfg.data``, when given, supplies the item count)."""
    if not Path(cfg.out).is_file():
        raise FileNotFoundError(f"out: {cfg.out}: no such file")
    records = []
    for line, record in read_jsonl(cfg.out):
        for name in ("labeler", "item_id", "status", "responses"):
            if name not in record:
                raise DataError(cfg.out, line, name, "missing")
        if record["status"] == "ranked" and not isinstance(record.get("ranking"), list):
            raise DataError(cfg.out, line, "ranking", "expected a list")
        records.append(record)
    n_items = len(load_task(cfg).items) if cfg.data else None
    return format_report(agreement_report(records, n_items))


def serve(cfg: RankConfig) -> None:
    """Serve the ranking page until interrupted (see ``fastrlhf.rank.server.serve``)."""
    from fastrlhf.rank.server import serve as _serve

    _serve(cfg)


def run_rank(cfg: RankConfig, *, show_report: bool = False) -> int:
    """What ``fastrlhf rank`` does: print the report, or serve the page."""
    if show_report:
        print(report(cfg))
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        serve(cfg)
    return 0
