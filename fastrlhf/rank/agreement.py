"""``fastrlhf rank --report``: who ranked what, how often labelers agree, and signs of position/length bias.

Agreement is measured where two labelers ranked the same item (the overlap set):

* **pairwise agreement**, InstructGPT's measure (72.6% between its training labelers): over the response
  pairs both labelers ordered strictly, the share they ordered the same way. Pairs either of them tied are
  counted apart (``tied_pairs``), since a tie is neither agreement nor disagreement.
* **Kendall's tau-b** between the two rankings, which accounts for ties: 1 identical, -1 reversed, about 0
  for unrelated rankings.

Each labeler's last record per item counts (a record file may hold earlier attempts).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import combinations
from typing import Any

from fastrlhf.correlation import spearman


def tier_ranks(ranking: list[int], ties: list[list[int]] | None = None) -> dict[int, int]:
    """Response index -> rank (0 = best); tied responses share the best position of their group."""
    position = {idx: pos for pos, idx in enumerate(ranking)}
    ranks = dict(position)
    for group in ties or []:
        best = min(position[i] for i in group)
        for i in group:
            ranks[i] = best
    return ranks


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def pair_counts(a: dict[int, int], b: dict[int, int]) -> tuple[int, int, int]:
    """(agreeing, disagreeing, tied) response pairs of two rank maps over the same responses.

    ``tied`` counts pairs either ranking ties; the other two count pairs both order strictly.
    """
    agree = disagree = tied = 0
    for i, j in combinations(sorted(a), 2):
        sa, sb = _sign(a[i] - a[j]), _sign(b[i] - b[j])
        if sa == 0 or sb == 0:
            tied += 1
        elif sa == sb:
            agree += 1
        else:
            disagree += 1
    return agree, disagree, tied


def kendall_tau_b(a: dict[int, int], b: dict[int, int]) -> float | None:
    """Kendall's tau-b of two rank maps; None when one of them ties everything (undefined)."""
    concordant = discordant = ties_a = ties_b = 0
    for i, j in combinations(sorted(a), 2):
        sa, sb = _sign(a[i] - a[j]), _sign(b[i] - b[j])
        if sa == 0 and sb == 0:
            continue
        if sa == 0:
            ties_a += 1
        elif sb == 0:
            ties_b += 1
        elif sa == sb:
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return None if denominator == 0 else (concordant - discordant) / denominator


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def agreement_report(records: Iterable[dict[str, Any]], n_items: int | None = None) -> dict[str, Any]:
    """Counts, inter-labeler agreement on shared items, and bias indicators, as plain data."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        latest[(r["labeler"], r["item_id"])] = r
    statuses: dict[str, Counter[str]] = defaultdict(Counter)
    ranked_by_item: dict[str, dict[str, dict[int, int]]] = defaultdict(dict)
    finished: set[str] = set()
    tied_pairs = all_pairs = 0
    best_shown_first: list[float] = []
    chance_first: list[float] = []
    length_rank: list[float] = []
    for (labeler, item_id), r in latest.items():
        statuses[labeler][r["status"]] += 1
        if r["status"] != "skipped":
            finished.add(item_id)
        if r["status"] != "ranked":
            continue
        ranks = tier_ranks(r["ranking"], r.get("ties"))
        ranked_by_item[item_id][labeler] = ranks
        k = len(ranks)
        all_pairs += k * (k - 1) // 2
        tied_pairs += sum(len(g) * (len(g) - 1) // 2 for g in r.get("ties") or [])
        shown = r.get("shown_order")
        if shown:
            best = [i for i, rank in ranks.items() if rank == 0]
            best_shown_first.append(sum(1 for i in best if shown[0] == i) / len(best))
            chance_first.append(1 / k)
        rho = spearman([len(s) for s in r["responses"]], [ranks[i] for i in range(k)])
        if not math.isnan(rho):
            length_rank.append(-rho)  # positive: longer responses ranked better
    pair_rows: dict[tuple[str, str], dict[str, Any]] = {}
    for by_labeler in ranked_by_item.values():
        for la, lb in combinations(sorted(by_labeler), 2):
            empty = {"items": 0, "agree": 0, "disagree": 0, "tied": 0, "taus": []}
            row = pair_rows.setdefault((la, lb), empty)
            agree, disagree, tied = pair_counts(by_labeler[la], by_labeler[lb])
            row["items"] += 1
            row["agree"] += agree
            row["disagree"] += disagree
            row["tied"] += tied
            tau = kendall_tau_b(by_labeler[la], by_labeler[lb])
            if tau is not None:
                row["taus"].append(tau)
    pairs = []
    for (la, lb), row in sorted(pair_rows.items()):
        strict = row["agree"] + row["disagree"]
        pairs.append(
            {
                "labelers": [la, lb],
                "items": row["items"],
                "pairwise_agreement": row["agree"] / strict if strict else None,
                "strict_pairs": strict,
                "tied_pairs": row["tied"],
                "kendall_tau_b": _mean(row["taus"]),
            }
        )
    agree_total = sum(row["agree"] for row in pair_rows.values())
    strict_total = agree_total + sum(row["disagree"] for row in pair_rows.values())
    return {
        "items": n_items,
        "items_finished": len(finished),
        "labelers": {name: dict(sorted(c.items())) for name, c in sorted(statuses.items())},
        "shared_items": sum(1 for by in ranked_by_item.values() if len(by) >= 2),
        "pairwise_agreement": agree_total / strict_total if strict_total else None,
        "kendall_tau_b": _mean(t for row in pair_rows.values() for t in row["taus"]),
        "labeler_pairs": pairs,
        "tie_share": tied_pairs / all_pairs if all_pairs else None,
        "best_shown_first": _mean(best_shown_first),
        "best_shown_first_by_chance": _mean(chance_first),
        "length_rank_spearman": _mean(length_rank),
    }


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value:+.3f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines ``fastrlhf rank --report`` prints."""
    total = f" of {report['items']}" if report["items"] is not None else ""
    lines = [f"items finished (ranked or cannot_rank): {report['items_finished']}{total}"]
    for name, counts in report["labelers"].items():
        lines.append(f"  {name}: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    lines.append(f"items ranked by two or more labelers: {report['shared_items']}")
    if report["labeler_pairs"]:
        lines.append(
            f"inter-labeler agreement: pairwise {_fmt(report['pairwise_agreement'], True)} "
            f"(InstructGPT: 72.6%), Kendall tau-b {_fmt(report['kendall_tau_b'])}"
        )
        for row in report["labeler_pairs"]:
            a, b = row["labelers"]
            lines.append(
                f"  {a} vs {b}: {row['items']} items, pairwise {_fmt(row['pairwise_agreement'], True)} "
                f"of {row['strict_pairs']} pairs ({row['tied_pairs']} tied by either), "
                f"tau-b {_fmt(row['kendall_tau_b'])}"
            )
    else:
        lines.append("inter-labeler agreement: n/a (no item ranked by two labelers; see --overlap)")
    lines.append(f"tied response pairs: {_fmt(report['tie_share'], True)}")
    lines.append(
        f"best response was shown first: {_fmt(report['best_shown_first'], True)} "
        f"(chance {_fmt(report['best_shown_first_by_chance'], True)})"
    )
    rho = _fmt(report["length_rank_spearman"])
    lines.append(f"length-rank Spearman (positive: longer ranked better): {rho}")
    return "\n".join(lines)
