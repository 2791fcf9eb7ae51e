"""gae: both backends against a nested Python loop written here, hand formulas for lam = 0 and lam = 1."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastrlhf.kernels import gae
from fastrlhf.kernels.gae import gae_reference

gae_module = importlib.import_module("fastrlhf.kernels.gae")  # the package attribute `gae` is the function


@pytest.fixture
def small_blocks(monkeypatch):
    """T-blocks of 32 so short rows already cross several blocks."""
    monkeypatch.setattr(gae_module, "_MAX_BLOCK_T", 32)


def loop_gae(rewards, values, mask, gamma, lam):
    """Spec, one row and one step at a time in Python floats (float64)."""
    B, T = rewards.shape
    r, v, m = rewards.double().tolist(), values.double().tolist(), (mask != 0).tolist()
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(T)):
            if not m[b][t]:
                continue
            delta = r[b][t] + gamma * next_value - v[b][t]
            adv[b][t] = delta + gamma * lam * next_adv
            ret[b][t] = adv[b][t] + v[b][t]
            next_value, next_adv = v[b][t], adv[b][t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def make_mask(B: int, T: int) -> torch.Tensor:
    """Row patterns cycling: full, empty, left-padded, right-padded, interior spans, random, single token."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        kind = b % 7
        if kind == 0:
            mask[b] = True
        elif kind == 2:
            mask[b, T // 3 :] = True
        elif kind == 3:
            mask[b, : max(1, 2 * T // 3)] = True
        elif kind == 4:  # multi-turn: response, environment text, response, padding
            mask[b, : T // 2] = True
            mask[b, T // 5 : T // 5 + max(1, T // 7)] = False
            mask[b, T // 2 + T // 8 : T - T // 9] = True
        elif kind == 5:
            mask[b] = torch.rand(T) < 0.6
        elif kind == 6:
            mask[b, T // 2] = True
    return mask


def assert_close_scaled(actual, expected, rtol=1e-5):
    """fp32-level agreement; absolute slack scales with the largest magnitude (long scans sum many terms)."""
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * (1.0 + scale))


def run_and_check(B, T, gamma, lam, *, dtype=torch.float32, mask=None, reward_scale=1.0):
    rewards = (torch.randn(B, T) * reward_scale).to(dtype)
    values = torch.randn(B, T).to(dtype)
    mask = make_mask(B, T) if mask is None else mask
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = loop_gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == (B, T)
    assert_close_scaled(adv, exp_adv)
    assert_close_scaled(ret, exp_ret)
    assert not adv[mask == 0].any() and not ret[mask == 0].any()


@pytest.mark.parametrize("B,T", [(1, 1), (7, 1), (1, 37), (7, 37), (7, 130)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_matches_nested_loop(backend, small_blocks, B, T, gamma, lam):
    run_and_check(B, T, gamma, lam)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.5), (0.7, 0.0)])
def test_parameter_corners(backend, small_blocks, gamma, lam):
    run_and_check(7, 45, gamma, lam)


def test_single_block_and_one_partial_block(backend):
    run_and_check(7, 100, 0.97, 0.9)  # one T-block of 128, padded


def test_long_rows(backend):
    # T = 3001 spans several default T-blocks: full row, multi-turn spans, random mask.
    T = 3001
    mask = torch.stack([torch.ones(T, dtype=torch.bool), make_mask(5, T)[4], torch.rand(T) < 0.5])
    run_and_check(3, T, 1.0, 0.97, mask=mask)


def counted_chain(rewards, values, mask, b):
    idx = (mask[b] != 0).nonzero().flatten()
    return idx, rewards[b, idx].double(), values[b, idx].double()


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_lam_zero_is_one_step_td(backend, small_blocks, gamma):
    B, T = 7, 50
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), make_mask(B, T)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    for b in range(B):
        idx, r, v = counted_chain(rewards, values, mask, b)
        v_next = torch.cat([v[1:], v.new_zeros(1)])  # next *counted* token's value, 0 after the last
        assert_close_scaled(adv[b, idx], r + gamma * v_next - v)
        assert_close_scaled(ret[b, idx], r + gamma * v_next)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_lam_one_is_monte_carlo_return(backend, small_blocks, gamma):
    B, T = 7, 50
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), make_mask(B, T)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for b in range(B):
        idx, r, v = counted_chain(rewards, values, mask, b)
        n = len(idx)
        k = torch.arange(n, dtype=torch.float64)
        discount = torch.triu(gamma ** (k[None, :] - k[:, None]))  # G_i = sum_{j>=i} gamma^(j-i) r_j
        g = discount @ r
        assert_close_scaled(adv[b, idx], g - v)
        assert_close_scaled(ret[b, idx], g)


def test_interior_span_links_across_it(backend, small_blocks):
    # Tokens 0..2 counted, 3..40 masked (across the block boundary at 16), 41..47 counted: token 2 must
    # bootstrap from token 41, not from its neighbour 3 and not from 0.
    T = 48
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, :3] = mask[0, 41:] = True
    rewards, values = torch.randn(1, T), torch.randn(1, T)
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    expected = rewards[0, 2] + 0.9 * values[0, 41] - values[0, 2]
    torch.testing.assert_close(adv[0, 2], expected, rtol=1e-6, atol=1e-6)


def test_garbage_at_masked_positions_does_not_leak(backend, small_blocks):
    B, T = 7, 40
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), make_mask(B, T)
    exp_adv, exp_ret = loop_gae(rewards, values, mask, 0.95, 0.9)
    rewards[~mask] = float("nan")
    values[~mask] = float("inf")
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    assert_close_scaled(adv, exp_adv)
    assert_close_scaled(ret, exp_ret)


def test_extreme_magnitudes(backend, small_blocks):
    run_and_check(7, 60, 1.0, 0.95, reward_scale=1e4)
    run_and_check(7, 60, 0.99, 0.99, reward_scale=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, small_blocks, dtype):
    run_and_check(7, 37, 0.99, 0.95, dtype=dtype)  # loop_gae reads the same rounded inputs


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.uint8, torch.bfloat16])
def test_numeric_masks(backend, small_blocks, mask_dtype):
    run_and_check(7, 33, 1.0, 0.95, mask=make_mask(7, 33).to(mask_dtype))


def test_strided_inputs(backend, small_blocks):
    B, T = 6, 40
    values_ext = torch.randn(B, T + 1)  # critic values with a trailing bootstrap column, sliced off
    rewards_t = torch.randn(T, B)
    mask = make_mask(B, T)
    values, rewards = values_ext[:, :-1], rewards_t.t()
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.9)
    exp_adv, exp_ret = loop_gae(rewards, values, mask, 0.9, 0.9)
    assert_close_scaled(adv, exp_adv)
    assert_close_scaled(ret, exp_ret)


def test_outputs_are_detached(backend):
    rewards = torch.randn(3, 9, requires_grad=True)
    values = torch.randn(3, 9, requires_grad=True)
    adv, ret = gae(rewards, values, torch.ones(3, 9, dtype=torch.bool))
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("shape", [(0, 5), (4, 0)])
def test_empty(backend, shape):
    adv, ret = gae(torch.zeros(shape), torch.zeros(shape), torch.zeros(shape, dtype=torch.bool))
    assert adv.shape == ret.shape == shape


def test_reference_is_float64_spec():
    B, T = 7, 29
    rewards, values, mask = (
        torch.randn(B, T, dtype=torch.float64),
        torch.randn(B, T, dtype=torch.float64),
        make_mask(B, T),
    )
    adv, ret = gae_reference(rewards, values, mask, gamma=0.97, lam=0.9)
    assert adv.dtype == torch.float64
    exp_adv, exp_ret = loop_gae(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(adv, exp_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, exp_ret, rtol=1e-12, atol=1e-12)


def test_validation():
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="rewards"):
        gae(r[0], v, m)
    with pytest.raises(ValueError, match="values"):
        gae(r, v.unsqueeze(0), m)
    with pytest.raises(ValueError, match="mask"):
        gae(r, v, m.flatten())
    with pytest.raises(ValueError, match="values"):
        gae(r, torch.randn(2, 6), m)
    with pytest.raises(ValueError, match="mask"):
        gae(r, v, torch.ones(3, 5))
    with pytest.raises(ValueError, match="rewards"):
        gae(r.double(), v, m)
    with pytest.raises(ValueError, match="values"):
        gae(r, v.long(), m)
    with pytest.raises(ValueError, match="device"):
        gae(r, v.to("meta"), m)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="gamma"):
            gae(r, v, m, gamma=bad)
        with pytest.raises(ValueError, match="lam"):
            gae(r, v, m, lam=bad)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, v, m, gamma=torch.tensor(0.9))
    with pytest.raises(ValueError, match="lam"):
        gae_reference(r, v, m, lam=2.0)


@pytest.mark.cuda
@pytest.mark.parametrize("B,T", [(70_000, 3), (5, 3001), (33, 257)])
def test_cuda_matches_loop(B, T):
    # Rows on grid axis 0: B beyond 65,535 must still launch. Under TRITON_INTERPRET=0 this is the compiled
    # kernel; the reference is the module's (float64) loop, itself checked against the nested loop above.
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), make_mask(B, T)
    adv, ret = gae(rewards.cuda(), values.cuda(), mask.cuda(), gamma=0.99, lam=0.95)
    exp_adv, exp_ret = gae_reference(rewards.double(), values.double(), mask, gamma=0.99, lam=0.95)
    assert_close_scaled(adv.cpu(), exp_adv)
    assert_close_scaled(ret.cpu(), exp_ret)
