"""Inter-labeler agreement and the report of ``fastrlhf rank --report``, against closed forms."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fastrlhf.rank.agreement import agreement_report, format_report, kendall_tau_b, pair_counts, tier_ranks


def random_tiered(rng: random.Random, k: int) -> tuple[list[int], list[list[int]]]:
    order = list(range(k))
    rng.shuffle(order)
    ties, start = [], 0
    while start < k:
        size = rng.choice([1, 1, 2, 3])
        if size > 1 and start + size <= k:
            ties.append(order[start : start + size])
        start += size
    return order, ties


def tau_b_textbook(a: dict[int, int], b: dict[int, int]) -> float | None:
    """tau-b = sum sign(da) sign(db) / sqrt((n0 - n1)(n0 - n2)), over all pairs, in numpy."""
    keys = sorted(a)
    x, y = np.array([a[i] for i in keys], float), np.array([b[i] for i in keys], float)
    sx, sy = np.sign(x[:, None] - x[None, :]), np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(keys), 1)
    n0 = len(iu[0])
    n1, n2 = int((sx[iu] == 0).sum()), int((sy[iu] == 0).sum())
    if n0 in (n1, n2):
        return None
    return float((sx[iu] * sy[iu]).sum() / math.sqrt((n0 - n1) * (n0 - n2)))


def test_tier_ranks_share_the_best_position_of_a_group():
    assert tier_ranks([2, 0, 1, 3], [[0, 1]]) == {2: 0, 0: 1, 1: 1, 3: 3}
    assert tier_ranks([3, 1, 0, 2], [[3, 1], [0, 2]]) == {3: 0, 1: 0, 0: 2, 2: 2}
    assert tier_ranks([1, 0]) == {1: 0, 0: 1}


def test_kendall_tau_b_matches_the_textbook_formula_on_random_tied_rankings():
    rng = random.Random(3)
    checked = 0
    for _ in range(300):
        k = rng.randint(2, 9)
        a, b = tier_ranks(*random_tiered(rng, k)), tier_ranks(*random_tiered(rng, k))
        expected, got = tau_b_textbook(a, b), kendall_tau_b(a, b)
        if expected is None:
            assert got is None
        else:
            assert got == pytest.approx(expected, abs=1e-12)
            checked += 1
    assert checked > 250
    ranks = {i: i for i in range(5)}
    assert kendall_tau_b(ranks, ranks) == 1.0
    assert kendall_tau_b(ranks, {i: 4 - i for i in range(5)}) == -1.0
    assert kendall_tau_b(ranks, dict.fromkeys(range(5), 0)) is None  # everything tied: undefined


def test_pair_counts_by_a_plain_loop():
    a = tier_ranks([0, 1, 2, 3])
    b = tier_ranks([1, 0, 2, 3], [[2, 3]])
    # pairs: (0,1) disagree, (0,2) (0,3) (1,2) (1,3) agree, (2,3) tied by b
    assert pair_counts(a, b) == (4, 1, 1)
    rng = random.Random(5)
    for _ in range(100):  # against sign products in numpy
        k = rng.randint(2, 8)
        x, y = tier_ranks(*random_tiered(rng, k)), tier_ranks(*random_tiered(rng, k))
        vx, vy = np.array([x[i] for i in range(k)]), np.array([y[i] for i in range(k)])
        iu = np.triu_indices(k, 1)
        product = (np.sign(vx[:, None] - vx[None, :]) * np.sign(vy[:, None] - vy[None, :]))[iu]
        assert pair_counts(x, y) == (
            int((product > 0).sum()),
            int((product < 0).sum()),
            int((product == 0).sum()),
        )


def record(labeler, item, ranking, ties=(), shown=None, status="ranked", responses=None):
    k = len(ranking) or 3
    return {
        "labeler": labeler,
        "item_id": item,
        "status": status,
        "ranking": list(ranking),
        "ties": [list(t) for t in ties],
        "shown_order": list(shown) if shown is not None else list(range(k)),
        "responses": responses or ["x" * (i + 1) for i in range(k)],
    }


def test_report_on_a_hand_computed_overlap():
    records = [
        record("alice", "i1", [0, 1, 2]),
        record("bob", "i1", [0, 1, 2]),  # identical: 3/3 pairs, tau 1
        record("alice", "i2", [0, 1, 2]),
        record("bob", "i2", [1, 0, 2], shown=[2, 1, 0]),  # (0,1) swapped: 2/3 pairs, tau 1/3
        record("alice", "i3", [2, 1, 0], shown=[2, 0, 1]),  # only alice: no agreement term
        record("bob", "i4", [], status="cannot_rank"),
        record("bob", "i5", [], status="skipped"),
        record("carol", "i1", [0, 2, 1], ties=[[2, 1]]),  # vs alice and bob: (1,2) tied, 2 agreeing
        record("carol", "i1", [0, 1, 2]),  # a later record of the same labeler replaces the first
    ]
    report = agreement_report(records, n_items=6)
    assert report["items_finished"] == 4 and report["items"] == 6
    assert report["labelers"]["bob"] == {"cannot_rank": 1, "ranked": 2, "skipped": 1}
    assert report["shared_items"] == 2
    # alice-bob: 3 + 2 of 6; alice-carol and bob-carol on i1: 3 of 3 each.
    assert report["pairwise_agreement"] == pytest.approx((5 + 3 + 3) / 12)
    rows = {tuple(r["labelers"]): r for r in report["labeler_pairs"]}
    assert rows["alice", "bob"]["pairwise_agreement"] == pytest.approx(5 / 6)
    assert rows["alice", "bob"]["kendall_tau_b"] == pytest.approx((1 + 1 / 3) / 2)
    assert rows["alice", "carol"]["items"] == 1 and rows["alice", "carol"]["tied_pairs"] == 0
    assert report["tie_share"] == 0.0
    # Best shown first: i1 x3 yes, i2 alice yes, bob no (best 1, shown first 2), i3 yes -> 5 of 6.
    assert report["best_shown_first"] == pytest.approx(5 / 6)
    assert report["best_shown_first_by_chance"] == pytest.approx(1 / 3)
    # Responses grow in length with the index; rankings [0,1,2] put the shortest first.
    assert report["length_rank_spearman"] == pytest.approx((-1 * 4 + -0.5 + 1) / 6)
    text = format_report(report)
    assert "items finished (ranked or cannot_rank): 4 of 6" in text
    assert "pairwise 91.7% (InstructGPT: 72.6%)" in text
    assert "alice vs bob: 2 items, pairwise 83.3% of 6 pairs (0 tied by either), tau-b +0.667" in text
    assert "best response was shown first: 83.3% (chance 33.3%)" in text


def test_report_counts_ties_and_says_when_there_is_no_overlap():
    report = agreement_report([record("al", "i", [0, 1, 2, 3], ties=[[0, 1, 2]])])
    assert report["tie_share"] == pytest.approx(3 / 6)
    assert report["best_shown_first"] == pytest.approx(1 / 3)  # three tied at the top, one shown first
    assert report["pairwise_agreement"] is None
    assert "n/a (no item ranked by two labelers; see --overlap)" in format_report(report)
