"""From single-order verdicts to one prompt's ranking: both orders combined, ties, Bradley-Terry, Copeland.

Conventions (the unshuffling is where judges go wrong, so they are fixed here once):

* ``first[i, j]`` is the judge's probability that the FIRST shown response wins when response ``i`` is shown
  first and response ``j`` second. The diagonal is unused.
* ``pairwise[i, j]`` is P(response i is better than response j), both orders averaged:
  ``0.5 * (first[i, j] + 1 - first[j, i])``, so ``pairwise[i, j] + pairwise[j, i] == 1`` and the diagonal
  is 0.5.
* A pair is decided when both orders name the same response as the winner; otherwise (the judge followed
  the position, or said exactly 0.5 once) it is a tie, MT-Bench's conservative rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Aggregate:
    """One prompt's judged ranking."""

    ranking: list[int]
    """Response indices, best first."""
    ties: list[list[int]]
    """Disjoint groups (>= 2 responses each) of responses judged equal, in ranking order."""
    pairwise: torch.Tensor
    """[K, K] float64, P(i better than j), both orders averaged."""
    decided: torch.Tensor
    """[K, K] bool, symmetric: both orders agree on the winner."""
    scores: torch.Tensor
    """[K] float64 Bradley-Terry scores (log-strengths, centred by the prior)."""


def combine_orders(
    first: torch.Tensor, identical: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pairwise, decided)`` from the single-order matrix ``first`` (see the module docstring).

    ``identical[i, j]`` (bool) marks responses with the same text: they are tied whatever the judge says.
    """
    first = first.to(torch.float64)
    k = first.shape[0]
    if first.shape != (k, k):
        raise ValueError(
            f"expected a square [K, K] matrix of first-position probabilities, got {tuple(first.shape)}"
        )
    pairwise = 0.5 * (first + 1.0 - first.T)
    pairwise.fill_diagonal_(0.5)
    # i wins in both orders: shown first it wins (> 0.5), shown second the other one loses (< 0.5).
    i_wins = (first > 0.5) & (first.T < 0.5)
    decided = i_wins | i_wins.T
    decided.fill_diagonal_(False)
    if identical is not None:
        decided &= ~identical
    return pairwise, decided


def bradley_terry(pairwise: torch.Tensor, prior: float, *, iterations: int = 100) -> torch.Tensor:
    """Scores s maximizing sum_{i<j} [p_ij log sig(s_i - s_j) + p_ji log sig(s_j - s_i)] - prior/2 |s|^2.

    Soft outcomes count a probability as a fractional win (a draw is half a win, as FastChat's fit). The
    objective is strictly concave for prior > 0, so Newton's method converges in a handful of steps.
    """
    if not prior > 0:
        raise ValueError(
            f"bt_prior must be > 0 (the fit diverges when one response wins every pair), got {prior}"
        )
    p = pairwise.to(torch.float64)
    k = p.shape[0]
    off = ~torch.eye(k, dtype=torch.bool)
    s = torch.zeros(k, dtype=torch.float64)
    for _ in range(iterations):
        sig = torch.sigmoid(s[:, None] - s[None, :])
        grad = torch.where(off, p - sig, 0.0).sum(1) - prior * s
        w = torch.where(off, sig * (1 - sig), 0.0)
        hessian = w - torch.diag(w.sum(1)) - prior * torch.eye(k, dtype=torch.float64)
        step = torch.linalg.solve(hessian, grad)
        s = s - step
        if float(step.abs().max()) < 1e-12:
            break
    return s


def copeland(pairwise: torch.Tensor, decided: torch.Tensor) -> torch.Tensor:
    """Pairwise wins per response: 1 per decided win, 1/2 per tied pair."""
    wins = (decided & (pairwise > 0.5)).to(torch.float64)
    ties = (~decided).to(torch.float64)
    ties.fill_diagonal_(0.0)
    return wins.sum(1) + 0.5 * ties.sum(1)


def tie_groups(ranking: list[int], decided: torch.Tensor) -> list[list[int]]:
    """Runs of consecutive responses in ``ranking`` where every two members are tied.

    Groups stay contiguous in the ranking and disjoint, so the trainer can drop their pairs; a tied pair
    that a decided response separates (a ~ c, but a > b > c) keeps its order.
    """
    groups: list[list[int]] = []
    current = [ranking[0]]
    for index in ranking[1:]:
        if all(not bool(decided[index, member]) for member in current):
            current.append(index)
        else:
            if len(current) > 1:
                groups.append(current)
            current = [index]
    if len(current) > 1:
        groups.append(current)
    return groups


def aggregate(
    first: torch.Tensor,
    *,
    method: str = "bradley_terry",
    prior: float = 0.1,
    identical: torch.Tensor | None = None,
) -> Aggregate:
    """Rank one prompt's responses from the single-order matrix ``first``; equal keys keep the lower index."""
    if method not in ("bradley_terry", "copeland"):
        raise ValueError(f"aggregate must be 'bradley_terry' or 'copeland', got {method!r}")
    pairwise, decided = combine_orders(first, identical)
    scores = bradley_terry(pairwise, prior)
    k = len(scores)
    if method == "copeland":
        wins = copeland(pairwise, decided)
        ranking = sorted(range(k), key=lambda i: (-float(wins[i]), -float(scores[i]), i))
    else:
        ranking = sorted(range(k), key=lambda i: (-float(scores[i]), i))
    return Aggregate(ranking, tie_groups(ranking, decided), pairwise, decided, scores)
