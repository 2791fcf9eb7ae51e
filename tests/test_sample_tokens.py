"""sample_tokens: greedy, log-probs, the nucleus, the sampling distribution, seeds, validation.

Checks against independent references: torch.argmax and float64 log_softmax for greedy and logp, a sorted
cumulative sum for the nucleus, chi-square tests of many draws against the renormalized nucleus
probabilities, and a Kolmogorov-Smirnov test of the kernel's Exp(1) noise. The Triton interpreter is slow
(tens of ms per program), so the statistical tests draw through the torch path and through the float64
reference that replays the kernel's Philox stream, and the kernel is checked to pick the reference's ids.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastrlhf.kernels import sample_tokens
from fastrlhf.kernels._triton import tl, triton
from fastrlhf.kernels.sample_tokens import (
    kernel_noise,
    nucleus_reference,
    sample_tokens_reference,
    sample_with_threshold,
)

ST = importlib.import_module("fastrlhf.kernels.sample_tokens")

# False-alarm rate of each statistical test (the draws are seeded, so each outcome is fixed).
ALPHA = 1e-4


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 128 (statistics and sampling) and 64 (search): V=257..1000 crosses several of them."""
    monkeypatch.setattr(ST, "MAX_BLOCK_V", 128)
    monkeypatch.setattr(ST, "MAX_SEARCH_BLOCK_V", 64)


def seed_of(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def extreme_logits(B: int, V: int, dtype: torch.dtype) -> torch.Tensor:
    """Random logits with +-1e4 entries, -inf entries and an exact tie for the maximum in row 1."""
    x = torch.randn(B, V) * 3
    x[0, 5], x[0, V - 2] = 1e4, -1e4
    x[1, 10] = x[1, V - 7] = 50.0  # tied maximum in different blocks: greedy must pick id 10
    x[2, ::3] = -math.inf
    x[3, 1] = 1e4
    x[3, 2] = 1e4 - 8.0
    return x.to(dtype)


def nucleus_margin(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Per row: how far top_p is from the cumulative masses on either side of the nucleus boundary.

    The boundary sits between the last group of equal logits that the nucleus needs and the group after
    it. Where top_p lies within fp32 rounding of a sum (about 1e-6) of either mass, both answers are
    right, so exact-set comparisons skip such rows. top_p = 1 keeps every allowed id by definition.
    """
    if top_p >= 1.0:
        return torch.full(logits.shape[:1], math.inf, dtype=torch.float64)
    z = logits.double() / temperature
    zs, order = z.sort(dim=-1, descending=True)
    cum = torch.softmax(z, dim=-1).gather(1, order).cumsum(dim=-1)
    group_end = torch.ones_like(zs, dtype=torch.bool)
    group_end[:, :-1] = zs[:, :-1] != zs[:, 1:]
    below = torch.where(group_end & (cum < top_p), top_p - cum, math.inf).amin(dim=-1)
    above = torch.where(group_end & (cum >= top_p), cum - top_p, math.inf).amin(dim=-1)
    return torch.minimum(below, above)


# ------------------------------------------------------------------------------------- greedy and log-probs


@pytest.mark.parametrize(
    ("dtype", "temperature"),
    [(torch.float32, 1.0), (torch.float32, 0.37), (torch.bfloat16, 0.37), (torch.float16, 1.0)],
)
def test_greedy_is_argmax_and_logp_is_log_softmax(backend, small_blocks, dtype, temperature):
    B, V = 5, 257
    logits = extreme_logits(B, V, dtype)
    suppress = torch.tensor([7, 5, 200])  # id 5 is row 0's +1e4 maximum
    ids, logp = sample_tokens(logits, temperature=temperature, suppress_ids=suppress, greedy=True)
    z = logits.double() / temperature
    z[:, suppress] = -math.inf
    expected = z.argmax(dim=-1)
    assert ids.dtype == torch.int64 and logp.dtype == torch.float32
    assert ids.tolist() == expected.tolist()
    assert ids[1] == 10
    ref = torch.log_softmax(z, dim=-1).gather(1, expected[:, None]).squeeze(1)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "temperature", "top_p"),
    [
        (torch.float32, 1.0, 1.0),
        (torch.float32, 0.37, 0.9),
        (torch.bfloat16, 0.37, 0.9),
        (torch.bfloat16, 1.0, 1.0),
        (torch.float16, 2.5, 0.5),
    ],
)
def test_sampled_ids_are_the_references_and_logp_is_the_full_softmax(
    backend, small_blocks, dtype, temperature, top_p
):
    B, V = 4, 193
    logits = extreme_logits(B, V, dtype)
    suppress = torch.tensor([3, 5, 11])
    seed = seed_of(2024)
    ids, logp = sample_tokens(logits, temperature=temperature, top_p=top_p, suppress_ids=suppress, seed=seed)
    logp_all, kept = nucleus_reference(logits, temperature=temperature, top_p=top_p, suppress_ids=suppress)
    assert kept.gather(1, ids[:, None]).all(), "a sampled id outside the nucleus"
    assert not torch.isin(ids, suppress).any()
    # logp is the full (not truncated) softmax at the temperature over the allowed ids.
    ref = logp_all.gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-6, atol=1e-5)
    if backend == "triton":  # the same Philox stream as the reference: the same draw
        ref_ids, _ = sample_tokens_reference(
            logits, temperature=temperature, top_p=top_p, suppress_ids=suppress, seed=seed
        )
        assert ids.tolist() == ref_ids.tolist()


def test_kernel_draws_the_references_ids_across_blocks(triton_backend, small_blocks):
    B, V = 3, 517
    logits = torch.randn(B, V) * 2
    for seed, (temperature, top_p) in enumerate([(1.0, 1.0), (0.7, 0.95), (1.3, 0.6)]):
        ids, _ = sample_tokens(logits, temperature=temperature, top_p=top_p, seed=seed_of(seed))
        ref_ids, _ = sample_tokens_reference(logits, temperature=temperature, top_p=top_p, seed=seed_of(seed))
        assert ids.tolist() == ref_ids.tolist()


def test_rows_without_an_allowed_finite_logit_give_id_0_and_nan(backend):
    logits = torch.randn(3, 9)
    logits[0] = -math.inf
    logits[1, 4:] = -math.inf
    suppress = torch.tensor([0, 1, 2, 3])  # row 1 has nothing left
    for greedy, top_p in [(True, 1.0), (False, 1.0), (False, 0.8)]:
        ids, logp = sample_tokens(logits, top_p=top_p, suppress_ids=suppress, seed=seed_of(1), greedy=greedy)
        assert ids[:2].tolist() == [0, 0]
        assert logp[:2].isnan().all()
        assert 4 <= ids[2] < 9 and logp[2].isfinite()


# ------------------------------------------------------------------------------------------------ nucleus


@pytest.mark.parametrize(
    ("top_p", "quantized"),
    [(1e-6, True), (0.3, False), (0.9, False), (0.9, True), (0.999, False), (1.0, True)],
)
def test_threshold_keeps_exactly_the_sorted_cumsum_nucleus(backend, small_blocks, top_p, quantized):
    (B, V), temperature = (6, 1000) if backend == "torch" else (4, 157), 0.8
    logits = torch.randn(B, V) * 2
    if quantized:  # many ties, also at the nucleus boundary: all tied ids are kept
        logits = (logits * 2).round() / 2
    logits[0, :50] = -math.inf
    suppress = torch.tensor([int(logits[1].argmax()), 17])
    result = sample_with_threshold(
        logits, temperature=temperature, top_p=top_p, suppress_ids=suppress, seed=seed_of(3)
    )
    allowed = logits.clone()
    allowed[:, suppress] = -math.inf
    kept = (allowed >= result.threshold[:, None]) & (allowed > -math.inf)
    _, ref_kept = nucleus_reference(logits, temperature=temperature, top_p=top_p, suppress_ids=suppress)
    clear = nucleus_margin(allowed, temperature, top_p) > 2e-6
    assert clear.sum() >= B // 2
    assert torch.equal(kept[clear], ref_kept[clear])
    assert kept.gather(1, result.ids[:, None]).all()
    if top_p == 1.0:
        assert result.threshold.eq(-math.inf).all()


def test_backends_agree_on_kept_sets_and_greedy_ids(monkeypatch, small_blocks):
    B, V, temperature = 5, 401, 1.4
    logits = (torch.randn(B, V) * 3).round() / 4
    suppress = torch.tensor([0, 399])
    out = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("FASTRLHF_KERNELS", name)
        nucleus = sample_with_threshold(logits, temperature=temperature, top_p=0.85, suppress_ids=suppress)
        greedy = sample_with_threshold(logits, temperature=temperature, suppress_ids=suppress, greedy=True)
        out[name] = nucleus.threshold, greedy.ids, greedy.logp
    clear = nucleus_margin(logits.index_fill(1, suppress, -math.inf), temperature, 0.85) > 2e-6
    assert clear.sum() >= B - 1
    assert torch.equal(out["torch"][0][clear], out["triton"][0][clear])
    assert torch.equal(out["torch"][1], out["triton"][1])
    torch.testing.assert_close(out["torch"][2], out["triton"][2], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- distribution


def chi_square_pvalue(ids: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of the counts of ``ids`` under ``probs`` [V]; a draw of a zero-probability id gives 0."""
    counts = torch.bincount(ids, minlength=probs.numel()).double()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = counts.sum() * probs[support]
    assert expected.min() >= 5, "too few draws for the chi-square approximation"
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


ROW = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.6, 0.2, -0.4, -1.0, 8.0, -math.inf, -1.7])
ROW_SUPPRESS = torch.tensor([8])  # the likeliest id, suppressed
# (temperature, top_p): nuclei of 11 ids, 6 ids, 4 ids (a boundary tie: ids 1 and 2), 1 id.
DIST_CASES = [(1.0, 1.0), (0.6, 0.9), (1.7, 0.5), (1.0, 0.15)]


def nucleus_probs(temperature: float, top_p: float) -> torch.Tensor:
    logp_all, kept = nucleus_reference(
        ROW[None], temperature=temperature, top_p=top_p, suppress_ids=ROW_SUPPRESS
    )
    p = logp_all.exp()[0] * kept[0]
    return p / p.sum()


def draw_torch(n: int, temperature: float, top_p: float, seed: int = 7) -> torch.Tensor:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTRLHF_KERNELS", "torch")
        ids, _ = sample_tokens(
            ROW.expand(n, -1),
            temperature=temperature,
            top_p=top_p,
            suppress_ids=ROW_SUPPRESS,
            seed=seed_of(seed),
        )
    return ids


def draw_kernel_noise(n: int, temperature: float, top_p: float, seed: int = 7) -> torch.Tensor:
    ids, _ = sample_tokens_reference(
        ROW.expand(n, -1), temperature=temperature, top_p=top_p, suppress_ids=ROW_SUPPRESS, seed=seed_of(seed)
    )
    return ids


@pytest.mark.parametrize(("temperature", "top_p"), DIST_CASES)
@pytest.mark.parametrize("draw", [draw_torch, draw_kernel_noise], ids=["torch_path", "kernel_noise"])
def test_frequencies_match_the_renormalized_nucleus(draw, temperature, top_p):
    ids = draw(8000, temperature, top_p)
    assert chi_square_pvalue(ids, nucleus_probs(temperature, top_p)) > ALPHA


def test_chi_square_catches_planted_bugs():
    n, temperature, top_p = 8000, 0.6, 0.9
    probs = nucleus_probs(temperature, top_p)
    assert chi_square_pvalue(draw_torch(n, temperature, top_p), probs) > ALPHA
    # Temperature ignored.
    assert chi_square_pvalue(draw_torch(n, 1.0, top_p), probs) < ALPHA
    # top_p off by one token, either way: top_p values whose nuclei are one id smaller / larger.
    sizes = {p: int((nucleus_probs(temperature, p) > 0).sum()) for p in (0.8, 0.9, 0.95)}
    assert sizes == {0.8: sizes[0.9] - 1, 0.9: sizes[0.9], 0.95: sizes[0.9] + 1}
    assert chi_square_pvalue(draw_torch(n, temperature, 0.8), probs) < ALPHA
    assert chi_square_pvalue(draw_torch(n, temperature, 0.95), probs) < ALPHA
    # The Gumbel-max key with the noise's sign flipped (argmax of logp + log E).
    logp_all, kept = nucleus_reference(
        ROW.expand(n, -1), temperature=temperature, top_p=top_p, suppress_ids=ROW_SUPPRESS
    )
    keys = logp_all + kernel_noise(seed_of(5), n, ROW.numel()).log()
    assert chi_square_pvalue(keys.masked_fill(~kept, -math.inf).argmax(dim=-1), probs) < ALPHA


def test_advancing_the_seed_gives_fresh_draws():
    """The engine's use: one row per step, seed.add_(1) between steps; the steps' draws follow the nucleus."""
    temperature, top_p = 1.0, 0.9
    seed = seed_of(11)
    ids = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTRLHF_KERNELS", "torch")
        for _ in range(1000):
            ids.append(
                sample_tokens(
                    ROW[None], temperature=temperature, top_p=top_p, suppress_ids=ROW_SUPPRESS, seed=seed
                )[0]
            )
            seed.add_(1)
    assert chi_square_pvalue(torch.cat(ids), nucleus_probs(temperature, top_p)) > ALPHA
    # The kernel's stream: rows of consecutive seeds are independent (agreement near sum p^2, not 1).
    n = 3000
    a = draw_kernel_noise(n, temperature, top_p, seed=100)
    b = draw_kernel_noise(n, temperature, top_p, seed=101)
    p = nucleus_probs(temperature, top_p)
    agree = (a == b).double().mean()
    assert abs(agree - (p**2).sum()) < 5 * math.sqrt(float((p**2).sum()) / n)


def ks_statistic(samples: torch.Tensor, uniform: bool = False) -> float:
    """Kolmogorov-Smirnov distance of the samples to Exp(1), or to U(0, 1)."""
    x = samples.double().flatten().sort().values
    n = x.numel()
    cdf = x.clamp(0, 1) if uniform else 1 - torch.exp(-x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def ks_critical(n: int) -> float:
    return math.sqrt(-0.5 * math.log(ALPHA / 2) / n)  # asymptotic, false-alarm rate ALPHA


def test_kernel_noise_is_exponential_with_a_fine_lower_tail():
    noise = kernel_noise(seed_of(123456789), 199, 251)
    assert ks_statistic(noise) < ks_critical(noise.numel())
    assert noise.min() > 0 and noise.isfinite().all()
    # The race's winners live at small E: its distribution there is still Exp(1) (P(E < t) ~ t).
    small = noise[noise < 1e-3]
    assert abs(small.numel() / noise.numel() - (1 - math.exp(-1e-3))) < 5 * math.sqrt(1e-3 / noise.numel())
    assert ks_statistic(small * 1e3, uniform=True) < ks_critical(small.numel())  # Exp(1) is ~flat there
    # The kernel's fp32 formula: within a few ulps wherever E could win a race (E < 3).
    fp32 = kernel_noise(seed_of(123456789), 199, 251, dtype=torch.float32).double()
    race = noise < 3
    torch.testing.assert_close(fp32[race], noise[race], rtol=1e-6, atol=0)


@triton.jit
def _noise_probe_kernel(seed_ptr, out_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pairs = row * ((V + 1) // 2) + tl.arange(0, BLOCK // 2)
    cols = tl.arange(0, BLOCK)
    log_e = ST._log_exponential_noise(tl.load(seed_ptr), pairs)
    tl.store(out_ptr + row * V + cols, log_e, mask=cols < V)


def test_kernel_noise_replays_the_kernels_philox_stream(triton_backend):
    B, V = 3, 37  # odd V: the last pair of each row has one column
    seed = seed_of(-987654321012)  # negative: both 32-bit key words set
    out = torch.empty(B, V)
    _noise_probe_kernel[(B,)](seed, out, V, BLOCK=64)
    torch.testing.assert_close(out, kernel_noise(seed, B, V, dtype=torch.float32).log(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------- seeds, shapes


def test_suppressed_ids_are_never_sampled(backend):
    logits = torch.zeros(16, 23)
    logits[:, [4, 9]] = 30.0  # by far the likeliest ids
    suppress = torch.tensor([4, 9])
    ids, _ = sample_tokens(logits, temperature=5.0, suppress_ids=suppress, seed=seed_of(0))
    assert not torch.isin(ids, suppress).any()
    assert ids.unique().numel() > 4


def test_same_seed_same_ids_other_seed_other_ids(backend):
    logits = torch.randn(12, 61)
    a = sample_tokens(logits, top_p=0.9, seed=seed_of(5))[0]
    b = sample_tokens(logits, top_p=0.9, seed=seed_of(5))[0]
    c = sample_tokens(logits, top_p=0.9, seed=seed_of(6))[0]
    assert torch.equal(a, b)
    assert (a != c).sum() > 6
    d, e = sample_tokens(logits)[0], sample_tokens(logits)[0]  # seed=None: fresh from torch's generator
    assert (d != e).sum() > 6


def test_kernel_never_reads_the_seed_on_the_host(triton_backend, monkeypatch):
    """A CUDA graph replays with whatever the seed tensor holds, so the op may not read it on the host."""
    logits = torch.randn(2, 33)
    seed = seed_of(77)
    expected = sample_tokens(logits, top_p=0.7, seed=seed)[0]

    def no_host_read(*args, **kwargs):
        raise AssertionError("the seed was read on the host")

    for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    ids = sample_tokens(logits, top_p=0.7, seed=seed)[0]
    monkeypatch.undo()
    assert torch.equal(ids, expected)


def test_shapes_strides_and_sizes(backend):
    wide = torch.randn(4, 50)
    ids, logp = sample_tokens(wide[:, 3:40], temperature=0.5, top_p=0.8, seed=seed_of(1))  # row stride 50
    ref_ids, ref_logp = sample_tokens(wide[:, 3:40].contiguous(), temperature=0.5, top_p=0.8, seed=seed_of(1))
    assert torch.equal(ids, ref_ids) and torch.equal(logp, ref_logp)
    t_ids, _ = sample_tokens(wide[:, :4].t(), greedy=True)  # unit row stride: copied
    assert torch.equal(t_ids, wide[:, :4].t().argmax(dim=-1))
    ids, logp = sample_tokens(torch.randn(3, 1), top_p=0.5, seed=seed_of(2))  # V = 1
    assert ids.tolist() == [0, 0, 0] and torch.allclose(logp, torch.zeros(3))
    ids, logp = sample_tokens(torch.randn(0, 7), seed=seed_of(2))
    assert ids.shape == (0,) and logp.shape == (0,)
    ids, logp = sample_tokens(torch.randn(2, 5), temperature=1e-3, top_p=1e-9, seed=seed_of(3))
    assert ids.dtype == torch.int64 and logp.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": True}, "top_p"),
        ({"suppress_ids": torch.tensor([1.0])}, "suppress_ids"),
        ({"suppress_ids": torch.tensor([[1]])}, "suppress_ids"),
        ({"suppress_ids": torch.tensor([0, 9])}, "suppress_ids"),
        ({"suppress_ids": torch.tensor([-1])}, "suppress_ids"),
        ({"suppress_ids": [1]}, "suppress_ids"),
        ({"seed": torch.tensor([1], dtype=torch.int32)}, "seed"),
        ({"seed": torch.tensor([1, 2])}, "seed"),
        ({"seed": 5}, "seed"),
        ({"seed": torch.tensor([1], device="meta")}, "device"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_tokens(torch.randn(2, 9), **kwargs)


def test_bad_logits_name_the_argument():
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(torch.randn(9))
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(torch.randn(2, 0))
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(torch.randint(0, 5, (2, 9)))
