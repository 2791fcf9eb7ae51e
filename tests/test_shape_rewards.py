"""shape_rewards / ppo_advantages: both backends against float64 loops written here and the references."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastrlhf.kernels import ppo_advantages, shape_rewards
from fastrlhf.kernels.shape_rewards import PPOAdvantages, ppo_advantages_reference, shape_rewards_reference

gae_module = importlib.import_module("fastrlhf.kernels.gae")


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(gae_module, "_MAX_BLOCK_T", 32)


def kl64(logp, ref_logp, estimator):
    d = logp.double() - ref_logp.double()
    return {"k1": d, "k2": 0.5 * d**2, "k3": torch.expm1(-d) + d}[estimator]


def rewards64(scores, logp, ref_logp, mask, kl_coef, estimator):
    """Per row: -kl_coef * kl on counted tokens, the score added at the last counted one."""
    kl = kl64(logp, ref_logp, estimator)
    out = torch.zeros(logp.shape, dtype=torch.float64)
    for b in range(logp.shape[0]):
        counted = [t for t in range(logp.shape[1]) if mask[b, t]]
        for t in counted:
            out[b, t] = -float(kl_coef) * kl[b, t]
        if counted:
            out[b, counted[-1]] += float(scores[b])
    return out


def gae64(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_value = next_adv = 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
                next_adv = adv[b, t] = delta + gamma * lam * next_adv
                next_value = values[b, t].item()
    return adv, torch.where(mask != 0, adv + values.double(), 0.0)


def make_mask(B, T):
    """Full, empty, left-padded, right-padded (long padding), multi-turn spans, random, single token."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        kind = b % 7
        if kind == 0:
            mask[b] = True
        elif kind == 2:
            mask[b, T // 3 :] = True
        elif kind == 3:
            mask[b, : max(1, T // 4)] = True
        elif kind == 4:
            mask[b, : T // 3] = True
            mask[b, T // 2 : T - T // 5] = True
        elif kind == 5:
            mask[b] = torch.rand(T) < 0.5
        elif kind == 6:
            mask[b, T // 2] = True
    return mask


def inputs(B, T, dtype=torch.float32):
    logp = -torch.rand(B, T) * 5
    ref_logp = logp + torch.randn(B, T) * 0.3
    return (
        torch.randn(B) * 2,
        logp.to(dtype),
        ref_logp.to(dtype),
        torch.randn(B, T).to(dtype),
        make_mask(B, T),
    )


def close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * (1 + scale))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("B,T", [(1, 1), (7, 1), (7, 45), (9, 100)])
def test_shape_rewards_matches_loop(backend, small_blocks, estimator, B, T):
    scores, logp, ref_logp, _, mask = inputs(B, T)
    out = shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.05, estimator=estimator)
    close(out, rewards64(scores, logp, ref_logp, mask, 0.05, estimator))


def test_score_lands_once_at_last_counted_token(backend, small_blocks):
    # 32-blocks [96, 100), [64, 96), [32, 64), [0, 32). Row 0: last counted token early, fully masked blocks
    # after it; row 1: counted tokens in every block; row 2: nothing counted; row 3: only the last position.
    T = 100
    mask = torch.zeros(4, T, dtype=torch.bool)
    mask[0, 3:20] = True
    mask[1, ::5] = True
    mask[3, T - 1] = True
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0])
    logp = torch.zeros(4, T)
    out = shape_rewards(scores, logp, logp, mask, kl_coef=0.1)
    expected = torch.zeros(4, T)
    expected[0, 19], expected[1, 95], expected[3, T - 1] = 10.0, 20.0, 40.0
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kl_coef", [0.0, 0.2, torch.tensor(0.2), torch.tensor(0.3, dtype=torch.float64)])
def test_kl_coef_float_or_tensor(backend, kl_coef):
    scores, logp, ref_logp, _, mask = inputs(7, 20)
    out = shape_rewards(scores, logp, ref_logp, mask, kl_coef=kl_coef, estimator="k3")
    close(out, rewards64(scores, logp, ref_logp, mask, kl_coef, "k3"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(backend, dtype):
    scores, logp, ref_logp, _, mask = inputs(7, 30, dtype)
    scores = scores.to(dtype)
    out = shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, estimator="k2")
    close(out, rewards64(scores, logp, ref_logp, mask, 0.1, "k2"))


def test_garbage_at_masked_positions_does_not_leak(backend, small_blocks):
    scores, logp, ref_logp, values, mask = inputs(7, 40)
    expected = ppo_advantages_reference(
        scores.double(), logp.double(), ref_logp.double(), values.double(), mask, kl_coef=0.1, estimator="k3"
    )
    logp[~mask] = float("-inf")
    ref_logp[~mask] = float("nan")
    values[~mask] = float("inf")
    out = ppo_advantages(scores, logp, ref_logp, values, mask, kl_coef=0.1, estimator="k3")
    for got, want in zip(out, expected, strict=True):
        close(got, want)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("estimator,gamma,lam", [("k1", 1.0, 0.95), ("k3", 0.9, 0.8), ("k2", 0.99, 0.0)])
def test_ppo_advantages_matches_independent_loops(backend, small_blocks, whiten, estimator, gamma, lam):
    B, T = 7, 45
    scores, logp, ref_logp, values, mask = inputs(B, T)
    out = ppo_advantages(
        scores,
        logp,
        ref_logp,
        values,
        mask,
        kl_coef=0.05,
        estimator=estimator,
        gamma=gamma,
        lam=lam,
        whiten=whiten,
    )
    assert isinstance(out, PPOAdvantages)
    rewards = rewards64(scores, logp, ref_logp, mask, 0.05, estimator)
    adv, ret = gae64(rewards, values, mask, gamma, lam)
    if whiten:
        counted = adv[mask]
        adv = torch.where(mask, (adv - counted.mean()) / torch.sqrt(counted.var() + 1e-8), 0.0)
    close(out.rewards, rewards)
    close(out.kl, torch.where(mask, kl64(logp, ref_logp, estimator), 0.0))
    close(out.returns, ret)
    close(out.advantages, adv)


def test_ppo_advantages_matches_reference_composition(backend):
    # Long rows crossing the default T-blocks, against the module's references in float64.
    scores, logp, ref_logp, values, mask = inputs(2, 3001)
    mask[1, 1200:1700] = False
    out = ppo_advantages(scores, logp, ref_logp, values, mask, kl_coef=torch.tensor(0.02), estimator="k3")
    ref = ppo_advantages_reference(
        scores.double(), logp.double(), ref_logp.double(), values.double(), mask, kl_coef=0.02, estimator="k3"
    )
    assert ref.advantages.dtype == torch.float64
    for got, want in zip(out, ref, strict=True):
        close(got, want)


def test_outputs_detached_and_float32(backend):
    scores, logp, ref_logp, values, mask = inputs(3, 10, torch.bfloat16)
    logp.requires_grad_(True)
    values.requires_grad_(True)
    out = ppo_advantages(scores, logp, ref_logp, values, mask, kl_coef=0.1)
    assert all(t.dtype == torch.float32 and t.shape == (3, 10) and not t.requires_grad for t in out)
    assert not shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1).requires_grad


def test_numeric_mask_and_strided_inputs(backend):
    scores, logp, ref_logp, values, mask = inputs(5, 30)
    values_ext = torch.cat([values, torch.randn(5, 1)], dim=1)
    out = ppo_advantages(
        scores, logp.t().contiguous().t(), ref_logp, values_ext[:, :-1], mask.float(), kl_coef=0.1
    )
    ref = ppo_advantages_reference(scores, logp, ref_logp, values, mask, kl_coef=0.1)
    for got, want in zip(out, ref, strict=True):
        close(got, want)


def test_empty_batch(backend):
    scores, logp, ref_logp, values, mask = inputs(0, 5)
    out = ppo_advantages(scores, logp, ref_logp, values, mask, kl_coef=0.1)
    assert all(t.shape == (0, 5) for t in out)


def test_validation():
    scores, logp, ref_logp, values, mask = inputs(2, 4)
    kw = {"kl_coef": 0.1}
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(scores[:1], logp, ref_logp, mask, **kw)
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(scores.unsqueeze(1), logp, ref_logp, mask, **kw)
    with pytest.raises(ValueError, match="logp"):
        shape_rewards(scores, logp[0], ref_logp, mask, **kw)
    with pytest.raises(ValueError, match="ref_logp"):
        shape_rewards(scores, logp, ref_logp[:, :3], mask, **kw)
    with pytest.raises(ValueError, match="mask"):
        shape_rewards(scores, logp, ref_logp, mask[:, :3], **kw)
    with pytest.raises(ValueError, match="ref_logp"):
        shape_rewards(scores, logp, ref_logp.double(), mask, **kw)
    with pytest.raises(ValueError, match="kl_coef"):
        shape_rewards(scores, logp, ref_logp, mask, kl_coef=torch.tensor([0.1]))
    with pytest.raises(ValueError, match="kl_coef"):
        shape_rewards(scores, logp, ref_logp, mask, kl_coef="0.1")
    with pytest.raises(ValueError, match="estimator"):
        shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, estimator="k5")
    with pytest.raises(ValueError, match="device"):
        shape_rewards(scores, logp, ref_logp.to("meta"), mask, **kw)
    with pytest.raises(ValueError, match="values"):
        ppo_advantages(scores, logp, ref_logp, values[:, :3], mask, **kw)
    with pytest.raises(ValueError, match="gamma"):
        ppo_advantages(scores, logp, ref_logp, values, mask, gamma=1.01, **kw)
    with pytest.raises(ValueError, match="lam"):
        ppo_advantages(scores, logp, ref_logp, values, mask, lam=-0.5, **kw)
    with pytest.raises(ValueError, match="scores"):
        shape_rewards_reference(scores[:1], logp, ref_logp, mask, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_cuda(estimator):
    scores, logp, ref_logp, values, mask = inputs(70, 1500)
    out = ppo_advantages(
        *(t.cuda() for t in (scores, logp, ref_logp, values, mask)),
        kl_coef=torch.tensor(0.05).cuda(),
        estimator=estimator,
    )
    ref = ppo_advantages_reference(
        scores.double(),
        logp.double(),
        ref_logp.double(),
        values.double(),
        mask,
        kl_coef=0.05,
        estimator=estimator,
    )
    for got, want in zip(out, ref, strict=True):
        close(got.cpu(), want)
