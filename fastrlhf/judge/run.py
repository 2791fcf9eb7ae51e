"""`fastrlhf judge`: read `fastrlhf sample` output, judge every prompt, write rankings and the bias report."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastrlhf.config import JudgeConfig
from fastrlhf.data import Sample, load_samples
from fastrlhf.judge.aggregate import aggregate
from fastrlhf.judge.bias import BiasReport, format_report
from fastrlhf.judge.verdicts import Judge, load_lm_judge

log = logging.getLogger("fastrlhf")


def judge_records(
    judge: Judge, samples: list[Sample], cfg: JudgeConfig | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ranking records (the shared schema, with ``pairwise_probs``) for ``samples``, and the bias summary."""
    cfg = cfg or JudgeConfig()
    report = BiasReport()
    records = []
    for sample in tqdm(samples, desc="judge", disable=None):
        verdicts = judge.verdicts(sample.prompt, sample.responses)
        k = len(sample.responses)
        identical = torch.tensor(
            [
                [a == b and i != j for j, b in enumerate(sample.responses)]
                for i, a in enumerate(sample.responses)
            ]
        )
        result = aggregate(verdicts.first, method=cfg.aggregate, prior=cfg.bt_prior, identical=identical)
        report.add(verdicts.first, verdicts.label_mass, result, [len(r) for r in sample.responses])
        report.truncated_responses += verdicts.truncated
        records.append(
            {
                "prompt": sample.prompt,
                "responses": sample.responses,
                "ranking": result.ranking,
                "ties": result.ties,
                "labeler": f"judge:{judge.name}",
                "item_id": sample.item_id,
                "status": "ranked",
                "pairwise_probs": [
                    [round(float(result.pairwise[i, j]), 6) for j in range(k)] for i in range(k)
                ],
            }
        )
    return records, report.summary(cfg.min_label_mass)


def report_path(out: str | Path) -> Path:
    """Where the bias report of rankings ``out`` goes: ``rankings.jsonl`` -> ``rankings.bias.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".bias.json")


def write_rankings(records: list[dict[str, Any]], summary: dict[str, Any], out: str | Path) -> Path:
    """Write the rankings JSONL and the bias report atomically (a killed run leaves no half file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    report_path(out).write_text(json.dumps(summary, indent=2) + "\n")
    return out


def judge_file(cfg: JudgeConfig, judge: Judge | None = None) -> tuple[Path, dict[str, Any]]:
    """Judge ``cfg.data`` into ``cfg.out``; prints and saves the bias report. ``judge`` replaces the model."""
    cfg.validate(provided=("model",) if judge is not None else ())  # every option, before anything loads
    samples = load_samples(cfg.data)  # bad data fails before the judge is loaded
    judge = judge or load_lm_judge(cfg)
    records, summary = judge_records(judge, samples, cfg)
    summary = {"judge": judge.name, "data": cfg.data, "aggregate": cfg.aggregate, **summary}
    out = write_rankings(records, summary, cfg.out)
    print(format_report(summary))
    log.info("wrote %d rankings to %s and the bias report to %s", len(records), out, report_path(out))
    return out, summary
