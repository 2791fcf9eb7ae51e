"""group_advantages: both backends against a float64 plain loop, odd group sizes, ties, extremes, errors."""

from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.kernels import group_advantages
from fastrlhf.kernels.group_advantages import group_advantages_reference


def _loop(scores: list[float], k: int, estimator: str, eps: float) -> list[float]:
    """Each formula written out per group in float64 Python."""
    out = []
    for g in range(0, len(scores), k):
        group = scores[g : g + k]
        mean = sum(group) / k
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / (k - 1))
        for s in group:
            if estimator == "grpo":
                out.append((s - mean) / (std + eps))
            elif estimator == "dr_grpo":
                out.append(s - mean)
            else:
                out.append(s - (sum(group) - s) / (k - 1))
    return out


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize(("groups", "k"), [(1, 2), (3, 5), (7, 3), (2, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_a_float64_loop(backend, estimator, groups, k, dtype):
    scores = (torch.randn(groups * k) * 3 + 1).to(dtype)
    got = group_advantages(scores, k, estimator=estimator)
    want = torch.tensor(_loop(scores.double().tolist(), k, estimator, 1e-4), dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == (groups * k,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(group_advantages_reference(scores, k, estimator=estimator).double(), want)


def test_rloo_is_k_over_k_minus_1_times_dr_grpo(backend):
    scores = torch.randn(5 * 7)
    rloo = group_advantages(scores, 7, estimator="rloo")
    torch.testing.assert_close(rloo, 7 / 6 * group_advantages(scores, 7, estimator="dr_grpo"))


def test_tied_group_gives_zero_not_nan_and_groups_are_independent(backend):
    scores = torch.tensor([2.0, 2.0, 2.0, 1e6, -1e6, 0.0, 5.0, 5.0, 5.0])
    adv = group_advantages(scores, 3, estimator="grpo")
    assert torch.isfinite(adv).all()
    assert adv[:3].abs().max() == 0 and adv[6:].abs().max() == 0
    torch.testing.assert_close(adv[3:6], torch.tensor([1.0, -1.0, 0.0]), atol=1e-6, rtol=1e-6)
    assert float(group_advantages(scores, 3, estimator="grpo").sum()) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(
    ("scores", "k", "estimator", "match"),
    [
        (torch.zeros(6), 1, "grpo", "group_size"),
        (torch.zeros(7), 2, "grpo", "multiple"),
        (torch.zeros(6, 1), 2, "grpo", "1-D"),
        (torch.zeros(6, dtype=torch.int64), 2, "grpo", "float32"),
        (torch.zeros(6), 2, "ppo", "estimator"),
    ],
)
def test_bad_input_names_the_argument(scores, k, estimator, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(scores, k, estimator=estimator)
