"""A local LLM judge: pairwise verdicts in both orders from answer-token log-probs, aggregated to rankings.

``fastrlhf judge --model JUDGE --data to_rank.jsonl --out rankings.jsonl`` writes what ``fastrlhf rm`` reads,
plus each prompt's pairwise probability matrix, and a bias report next to the output.
"""

from fastrlhf.judge.aggregate import Aggregate, aggregate, bradley_terry, combine_orders, copeland, tie_groups
from fastrlhf.judge.bias import BiasReport, format_report
from fastrlhf.judge.run import judge_file, judge_records
from fastrlhf.judge.verdicts import DEFAULT_TEMPLATE, Judge, LMJudge, Verdicts, load_lm_judge

__all__ = [
    "DEFAULT_TEMPLATE",
    "Aggregate",
    "BiasReport",
    "Judge",
    "LMJudge",
    "Verdicts",
    "aggregate",
    "bradley_terry",
    "combine_orders",
    "copeland",
    "format_report",
    "judge_file",
    "judge_records",
    "load_lm_judge",
    "tie_groups",
]
