"""Aggregation and the bias report against independent references (scipy's optimizer and Spearman)."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
from scipy import optimize, stats

from fastrlhf.correlation import spearman
from fastrlhf.judge import aggregate, bradley_terry, combine_orders, copeland, tie_groups
from fastrlhf.judge.bias import BiasReport


def random_first(k: int, seed: int) -> torch.Tensor:
    first = torch.rand(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return first.fill_diagonal_(0.5)


def test_combine_orders_averages_both_orders_and_ties_disagreements():
    first = torch.tensor([[0.5, 0.9, 0.7], [0.2, 0.5, 0.5], [0.6, 0.95, 0.5]], dtype=torch.float64)
    pairwise, decided = combine_orders(first)
    for i in range(3):
        for j in range(3):
            expected = 0.5 if i == j else 0.5 * (first[i, j] + 1 - first[j, i])
            assert float(pairwise[i, j]) == pytest.approx(float(expected), abs=1e-15)
    assert torch.allclose(pairwise + pairwise.T, torch.ones(3, 3, dtype=torch.float64))
    # (0,1): 0 wins shown first (0.9) and shown second (0.2 < 0.5): decided. (0,2): first wins both
    # times (0.7, 0.6): tie. (1,2): 0.5 once is no verdict: tie.
    assert decided.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    identical = torch.tensor([[False, True, False], [True, False, False], [False] * 3])
    assert not combine_orders(first, identical)[1].any()


@pytest.mark.parametrize("k, prior", [(3, 0.1), (5, 0.01), (7, 1.0)])
def test_bradley_terry_matches_scipy(k, prior):
    pairwise, _ = combine_orders(random_first(k, seed=k))
    p = pairwise.numpy()

    def neg_log_posterior(s):
        total = sum(
            p[i, j] * math.log(1 / (1 + math.exp(s[j] - s[i])))
            + p[j, i] * math.log(1 / (1 + math.exp(s[i] - s[j])))
            for i, j in combinations(range(k), 2)
        )
        return -total + prior / 2 * float((s**2).sum())

    reference = optimize.minimize(neg_log_posterior, x0=[0.0] * k, method="BFGS", options={"gtol": 1e-10}).x
    assert bradley_terry(pairwise, prior).numpy() == pytest.approx(reference, abs=1e-5)


def test_bradley_terry_stays_finite_when_one_response_wins_everything():
    pairwise = torch.tensor([[0.5, 1.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    scores = bradley_terry(pairwise, prior=0.1)
    assert torch.isfinite(scores).all() and scores[0] > scores[1] > scores[2]
    with pytest.raises(ValueError, match="bt_prior must be > 0"):
        bradley_terry(pairwise, prior=0.0)


def test_copeland_counts_wins_and_half_ties():
    pairwise = torch.tensor([[0.5, 0.8, 0.6], [0.2, 0.5, 0.7], [0.4, 0.3, 0.5]], dtype=torch.float64)
    decided = torch.tensor([[False, True, False], [True, False, True], [False, True, False]])
    assert copeland(pairwise, decided).tolist() == [1.5, 1.0, 0.5]


def test_copeland_and_bradley_terry_orders_differ_where_they_should():
    # 0 beats 1 and 2 narrowly but loses to 3 badly; 3 loses to 1 and 2: Copeland counts wins, BT margins.
    p = torch.tensor(
        [[0.5, 0.55, 0.55, 0.02], [0.45, 0.5, 0.5, 0.6], [0.45, 0.5, 0.5, 0.6], [0.98, 0.4, 0.4, 0.5]],
        dtype=torch.float64,
    )
    first = p.clone()  # a position-free judge: first[i, j] = p[i, j] in both orders
    by_wins = aggregate(first, method="copeland")
    by_bt = aggregate(first, method="bradley_terry")
    assert by_wins.ranking[0] == 0 and by_bt.ranking[0] == 3
    with pytest.raises(ValueError, match="aggregate must be"):
        aggregate(first, method="elo")


def test_tie_groups_are_contiguous_cliques():
    decided = torch.ones(5, 5, dtype=torch.bool)
    for a, b in [(1, 2), (2, 4), (1, 4), (0, 3), (4, 0)]:
        decided[a, b] = decided[b, a] = False
    assert tie_groups([1, 2, 4, 0, 3], decided) == [[1, 2, 4], [0, 3]]
    assert tie_groups([3, 1, 0, 2, 4], decided) == [[2, 4]]
    assert tie_groups([0], decided) == []


def test_spearman_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(1)
    for n in (3, 7, 11):
        x = torch.randint(0, 4, (n,), generator=gen).double().tolist()
        y = torch.randn(n, generator=gen, dtype=torch.float64).tolist()
        expected = stats.spearmanr(x, y).statistic
        assert spearman(x, y) == pytest.approx(expected, abs=1e-12) or math.isnan(expected)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_bias_report_counts_an_intransitive_triad_and_length_preference():
    # A cycle 0 > 1 > 2 > 0, decided in both orders; and a fourth response that loses everything.
    p = torch.full((4, 4), 0.5, dtype=torch.float64)
    for win, lose in [(0, 1), (1, 2), (2, 0), (0, 3), (1, 3), (2, 3)]:
        p[win, lose], p[lose, win] = 0.9, 0.1
    result = aggregate(p)
    report = BiasReport()
    report.add(p, torch.ones(4, 4, dtype=torch.float64), result, lengths=[10, 10, 10, 1])
    summary = report.summary()
    assert summary["intransitive_triad_share"] == pytest.approx(1 / 4)  # (0,1,2) of the 4 triads
    assert summary["order_consistency"] == 1.0 and summary["tie_share"] == 0.0
    assert summary["first_position_win_rate"] == pytest.approx(0.5)
    expected_rho = stats.spearmanr([10, 10, 10, 1], [4 - result.ranking.index(i) for i in range(4)]).statistic
    assert summary["length_rank_spearman"] == pytest.approx(expected_rho)
