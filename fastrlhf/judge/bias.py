"""The judge's bias report: position bias, order consistency, verbosity, label-token mass, ties, cycles.

Numbers to compare against: MT-Bench's GPT-4 was order-consistent on about 65% of pairs; human labelers agree
with each other 63-77% of the time (Anthropic HH, InstructGPT). A first-position win rate far from 0.5, a
label mass far below 1 or a strong length-rank correlation each say the judge should not be trusted as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import torch

from fastrlhf.correlation import spearman
from fastrlhf.judge.aggregate import Aggregate


@dataclass
class BiasReport:
    """Running totals over the judged prompts; :meth:`summary` turns them into rates."""

    items: int = 0
    ordered_pairs: int = 0
    first_wins: float = 0.0
    first_prob_sum: float = 0.0
    pairs: int = 0
    consistent_pairs: int = 0
    tied_pairs: int = 0
    triads: int = 0
    intransitive_triads: int = 0
    label_mass_sum: float = 0.0
    label_mass_min: float = math.inf
    length_correlations: list[float] = field(default_factory=list)
    truncated_responses: int = 0

    def add(
        self, first: torch.Tensor, label_mass: torch.Tensor, result: Aggregate, lengths: list[int]
    ) -> None:
        """Count one prompt: its single-order matrix, label mass, aggregate and response lengths."""
        k = first.shape[0]
        off = ~torch.eye(k, dtype=torch.bool)
        f = first.to(torch.float64)[off]
        self.items += 1
        self.ordered_pairs += f.numel()
        self.first_wins += float((f > 0.5).sum()) + 0.5 * float((f == 0.5).sum())
        self.first_prob_sum += float(f.sum())
        mass = label_mass.to(torch.float64)[off]
        self.label_mass_sum += float(mass.sum())
        self.label_mass_min = min(self.label_mass_min, float(mass.min()))
        self.pairs += k * (k - 1) // 2
        self.consistent_pairs += int(result.decided.triu(1).sum())
        self.tied_pairs += sum(len(g) * (len(g) - 1) // 2 for g in result.ties)
        # A triad is intransitive when all three of its pairs are decided and their winners form a cycle.
        beats = result.decided & (result.pairwise > 0.5)
        for a, b, c in combinations(range(k), 3):
            self.triads += 1
            if all(bool(result.decided[x, y]) for x, y in ((a, b), (b, c), (a, c))):
                cycle = (beats[a, b] and beats[b, c] and beats[c, a]) or (
                    beats[b, a] and beats[c, b] and beats[a, c]
                )
                self.intransitive_triads += int(bool(cycle))
        quality = [0.0] * k
        for position, index in enumerate(result.ranking):
            quality[index] = float(k - position)  # higher is better
        rho = spearman([float(n) for n in lengths], quality)
        if not math.isnan(rho):
            self.length_correlations.append(rho)

    def summary(self, min_label_mass: float = 0.5) -> dict[str, Any]:
        """Rates over everything added, plus plain-language warnings."""
        ratio = lambda a, b: a / b if b else float("nan")
        out: dict[str, Any] = {
            "items": self.items,
            "ordered_pairs": self.ordered_pairs,
            "first_position_win_rate": ratio(self.first_wins, self.ordered_pairs),
            "first_position_mean_prob": ratio(self.first_prob_sum, self.ordered_pairs),
            "order_consistency": ratio(self.consistent_pairs, self.pairs),
            "tie_share": ratio(self.tied_pairs, self.pairs),
            "intransitive_triad_share": ratio(self.intransitive_triads, self.triads),
            "length_rank_spearman": ratio(sum(self.length_correlations), len(self.length_correlations)),
            "label_mass_mean": ratio(self.label_mass_sum, self.ordered_pairs),
            "label_mass_min": self.label_mass_min if self.ordered_pairs else float("nan"),
            "truncated_responses": self.truncated_responses,
        }
        warnings = []
        if abs(out["first_position_win_rate"] - 0.5) > 0.15:
            warnings.append(
                f"position bias: the first-shown response wins {out['first_position_win_rate']:.0%}"
            )
        if out["label_mass_mean"] < min_label_mass:
            warnings.append(
                f"the label tokens get only {out['label_mass_mean']:.1%} of the probability on average: "
                "check the template and the labels for this model"
            )
        if out["length_rank_spearman"] > 0.5:
            warnings.append(f"verbosity bias: length-rank correlation {out['length_rank_spearman']:.2f}")
        if self.truncated_responses:
            warnings.append(f"{self.truncated_responses} responses were cut to their first and last tokens")
        out["warnings"] = warnings
        return out


def format_report(summary: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    lines = [
        f"judged {summary['items']} prompts ({summary['ordered_pairs']} ordered pairs)",
        f"  first-position win rate   {summary['first_position_win_rate']:.3f}  (0.5 is unbiased)",
        f"  order consistency         {summary['order_consistency']:.3f}  (pairs both orders agree on)",
        f"  tied pairs                {summary['tie_share']:.3f}",
        f"  intransitive triads       {summary['intransitive_triad_share']:.3f}",
        f"  length-rank Spearman      {summary['length_rank_spearman']:.3f}  (> 0: longer ranked better)",
        f"  label-token mass          {summary['label_mass_mean']:.3f} mean, "
        f"{summary['label_mass_min']:.3f} min",
    ]
    lines += [f"  warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)
