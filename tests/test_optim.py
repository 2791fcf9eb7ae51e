"""Stochastic rounding into bf16 and the SR wrappers of bitsandbytes' 8-bit AdamW (CPU)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from fastrlhf.optim import stochastic_round_

bnb = pytest.importorskip("bitsandbytes")
from fastrlhf.optim import AdamW8bitSR, PagedAdamW8bitSR  # noqa: E402

BF16_ULP_AT_1 = 2.0**-7  # spacing of bf16 in [1, 2)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sr(x: torch.Tensor, seed: int = 0, **kwargs) -> torch.Tensor:
    return stochastic_round_(torch.empty_like(x, dtype=torch.bfloat16), x, _gen(seed), **kwargs)


def test_exact_values_and_specials_are_preserved() -> None:
    exact = torch.randn(10_000).bfloat16()
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1.0, -2.0, 3.3895313892515355e38])
    x = torch.cat([exact.float(), specials]).repeat(4)
    y = _sr(x)
    assert torch.equal(y.view(torch.int16), x.bfloat16().view(torch.int16))  # bitwise, so -0.0 stays -0.0

    # Quiet NaN, then NaNs whose payload is only in the low 16 bits (+, and - incl. 0xFFFFFFFF which wraps).
    nan_bits = torch.tensor([0x7FC00000, 0x7F800001, -1, -8388607], dtype=torch.int32)
    nans = nan_bits.view(torch.float32).repeat(1000)
    assert nans.isnan().all() and _sr(nans).isnan().all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rounding_is_unbiased_between_neighbours(sign: float) -> None:
    lo, frac = 1.0 + 3 * BF16_ULP_AT_1, 0.3
    value = sign * (lo + frac * BF16_ULP_AT_1)
    n = 200_000
    y = _sr(torch.full((n,), value)).float()
    neighbours = torch.tensor([sign * lo, sign * (lo + BF16_ULP_AT_1)])
    assert torch.isin(y, neighbours).all()
    up = (y.abs() > lo).float().mean().item()  # fraction rounded away from zero
    stderr = math.sqrt(frac * (1 - frac) / n)
    assert abs(up - frac) < 5 * stderr
    assert abs(y.mean().item() - value) < 5 * stderr * BF16_ULP_AT_1


def test_random_values_unbiased() -> None:
    x = torch.randn(1 << 18) * 100
    y = _sr(x).float()
    rtn = x.bfloat16().float()
    err = y - x
    ulp = (rtn.abs() * 2.0**-7).clamp_min(1e-30)  # upper bound on the local spacing
    assert (err.abs() <= ulp * 2).all()
    # Relative errors average to ~0 for SR; round-to-nearest's are bounded but SR's are unbiased.
    rel = (err / ulp).mean().item()
    assert abs(rel) < 5 * 0.5 / math.sqrt(x.numel())


def test_chunking_matches_unchunked_and_non_contiguous_target() -> None:
    x = torch.randn(3, 10_007) * 1e-3 + 1
    whole = _sr(x, seed=3)
    chunked = _sr(x, seed=3, chunk_size=4096)  # several chunks and a ragged tail
    assert torch.equal(whole, chunked)  # the CPU random stream is independent of the chunk size
    target_t = torch.empty(10_007, 3, dtype=torch.bfloat16).t()  # non-contiguous view
    stochastic_round_(target_t, x, _gen(3))
    assert torch.equal(target_t, whole)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(TypeError):
        stochastic_round_(torch.empty(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        stochastic_round_(torch.empty(4, dtype=torch.bfloat16), torch.zeros(3))


def _train(opt_cls, dtype: torch.dtype, numel: int, steps: int = 200, lr: float = 1e-4, **kwargs):
    """Constant-gradient AdamW8bit run: each step moves every weight by ~lr (~1e-4 of a weight ~1)."""
    w0 = 1.0 + torch.rand(numel, generator=_gen(1))  # in [1, 2): one bf16 ulp = 2^-7
    p = torch.nn.Parameter(w0.to(dtype).clone())
    grad = torch.where(torch.arange(numel) % 2 == 0, 1.0, -1.0).to(dtype)  # both directions
    opt = opt_cls([p], lr=lr, weight_decay=0.0, **kwargs)
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return p.detach().float() - w0.to(dtype).float(), opt, p


@pytest.mark.parametrize("numel", [16_384, 4_000])  # 8-bit blockwise states, and 32-bit states (< 4096)
def test_sr_tracks_fp32_where_rtn_stalls(numel: int) -> None:
    moved_fp32, opt32, _ = _train(bnb.optim.AdamW8bit, torch.float32, numel)
    moved_rtn, _, _ = _train(bnb.optim.AdamW8bit, torch.bfloat16, numel)
    moved_sr, opt_sr, p = _train(AdamW8bitSR, torch.bfloat16, numel, generator=_gen(2))
    assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16  # swap fully undone
    state_dtype = torch.uint8 if numel >= 4096 else torch.float32
    assert opt_sr.state[p]["state1"].dtype == state_dtype
    assert next(iter(opt32.state.values()))["state1"].dtype == state_dtype

    total = moved_fp32.abs().mean().item()  # ~200 * 1e-4 = 0.02, about 2.5 bf16 ulps
    assert total > 0.015
    assert moved_rtn.abs().mean().item() < 0.01 * total  # round-to-nearest loses every update
    sign = torch.sign(moved_fp32)
    # In expectation SR moves exactly like fp32: the mean signed movement agrees within 5 standard errors
    # (the standard error is ~1% of the movement here).
    dev = moved_sr - moved_fp32
    stderr = dev.std().item() / math.sqrt(numel)
    assert abs((dev * sign).mean().item()) < 5 * stderr < 0.1 * total
    # Per element SR is a random walk of ~1.6 ulps std around fp32, still below the total movement.
    assert dev.abs().mean().item() < 0.75 * total


def test_state_dict_round_trip() -> None:
    _, opt, p = _train(AdamW8bitSR, torch.bfloat16, 8192, steps=5, generator=_gen(4))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)

    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamW8bitSR([p2], lr=1e-4, weight_decay=0.0, generator=_gen(5))
    opt2.load_state_dict(loaded)
    for key, value in opt.state[p].items():
        other = opt2.state[p2][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    opt.sr_generator = _gen(5)  # same rounding stream from here on
    for q, o in ((p, opt), (p2, opt2)):
        q.grad = torch.ones_like(q)
        o.step()
    assert torch.equal(p, p2) and opt2.state[p2]["step"] == 6


def test_paged_variant_and_non_bf16_params() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU"
        moved, _, p = _train(PagedAdamW8bitSR, torch.bfloat16, 8192, steps=50, lr=1e-3, generator=_gen(6))
    assert p.dtype == torch.bfloat16 and moved.abs().mean().item() > 0.03  # ~50 * 1e-3
    # fp32 params bypass the swap: bit-identical to plain bnb.
    moved_sr, _, _ = _train(AdamW8bitSR, torch.float32, 8192, steps=20)
    moved_ref, _, _ = _train(bnb.optim.AdamW8bit, torch.float32, 8192, steps=20)
    assert torch.equal(moved_sr, moved_ref)


def test_trainer_optimizers_round_bf16_weights_stochastically():
    from fastrlhf.config import ModelConfig, OptimConfig
    from fastrlhf.optim import AdamW8bitSR, make_optimizer

    weight = torch.nn.Parameter(torch.full((8192,), 1.5, dtype=torch.bfloat16))
    opt = make_optimizer(
        [weight], OptimConfig(lr=1e-4), ModelConfig(optimizer="adamw8bit"), torch.device("cpu")
    )
    assert isinstance(opt, AdamW8bitSR)
    for _ in range(50):
        weight.grad = torch.ones_like(weight)
        opt.step()
    moved = float((1.5 - weight.float()).mean())
    assert moved == pytest.approx(50 * 1e-4, rel=0.1)  # round-to-nearest would leave 1.5 untouched
