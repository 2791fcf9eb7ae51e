"""linear_token_logprobs' backward skips: token blocks with no upstream gradient (exact), and the optional
gradient filtering of negligible vocabulary tiles (an approximation), against float64 references that
apply the same rule to the same tiles."""

import math

import pytest
import torch
from test_linear_token_logprobs import ref_fn, use_backend

from fastrlhf.kernels import linear_token_logprobs

B, T, H, V = 4, 13, 40, 1000  # 52 tokens: three full 16-row blocks of the test tiles and a partial one
BLOCK_N, BLOCK_V = 16, 32  # test_linear_token_logprobs.small_tiles


@pytest.fixture
def fused(monkeypatch):
    return use_backend(monkeypatch, "triton")


def inputs(scale: float = 8.0, seed: int = 0):
    """Logits of std ~scale: peaked rows, as a trained model's, so tiles' largest probabilities spread."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * scale / math.sqrt(H)
    bias = torch.randn(V, generator=gen)
    return hidden, weight, bias, torch.randint(0, V, (B, T), generator=gen)


def grads(hidden, weight, bias, ids, g_lp, g_ent, **options):
    """(dhidden, dweight, dbias) of sum(g_lp * logp + g_ent * entropy)."""
    params = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, ent = linear_token_logprobs(
        params[0], params[1], ids, bias=params[2], return_entropy=True, **options
    )
    torch.autograd.backward([logp, ent], [g_lp, g_ent])
    return [p.grad for p in params]


def reference_grads(hidden, weight, bias, ids, g_lp, g_ent, temperature, keep=None):
    """float64 gradients from d(loss)/d(logits) written out, zeroed outside ``keep`` ([N, V] bool)."""
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    b = 0.0 if bias is None else bias.double()
    z = (h @ w.t() + b) / temperature
    p = torch.softmax(z, -1)
    mean_z = (p * z).sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(ids.reshape(-1), w.shape[0]).double()
    g_lp, g_ent = g_lp.reshape(-1, 1).double(), g_ent.reshape(-1, 1).double()
    dz = g_lp * (onehot - p) - g_ent * p * (z - mean_z)
    if keep is not None:
        dz = dz * keep
    dr = dz / temperature
    return [(dr @ w).reshape(hidden.shape), dr.t() @ h, dr.sum(0)]


def assert_close(got, want):
    for g, g64 in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5 * g64.abs().max().item())


def test_blocks_without_upstream_gradient_are_skipped_exactly(fused):
    """Block 0 has no gradient at all (skipped); block 1 only entropy gradients and block 2 one logp
    gradient (both kept); block 3 has a NaN among zeros, which must reach the gradients, not be skipped."""
    hidden, weight, bias, ids = inputs()
    gen = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    flat_lp, flat_ent = g_lp.view(-1), g_ent.view(-1)
    flat_lp[:32] = 0
    flat_ent[:16] = 0
    flat_ent[32:48] = 0
    flat_lp[33:48] = 0
    got = grads(hidden, weight, bias, ids, g_lp, g_ent)
    assert_close(got, reference_grads(hidden, weight, bias, ids, g_lp, g_ent, 1.0))
    dh = got[0].view(-1, H)
    assert (dh[:16] == 0).all() and (dh[16:33] != 0).any(dim=1).all() and (dh[33:48] == 0).all()

    flat_lp[48:], flat_ent[48:] = 0, 0
    flat_lp[50] = math.nan
    dh, dw, db = grads(hidden, weight, bias, ids, g_lp, g_ent)
    assert dh.view(-1, H)[50].isnan().all() and dw.isnan().all() and db.isnan().all()


def tile_max_probability(hidden, weight, bias, ids, g_lp, temperature, block_n=BLOCK_N, block_v=BLOCK_V):
    """[row blocks, vocabulary tiles] largest float64 probability; +inf where a target with a logp gradient
    falls (such tiles are always kept)."""
    z = (hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().t() + bias.double()) / temperature
    p = torch.softmax(z, -1)
    (n, v), blocks = p.shape, (-(-p.shape[0] // block_n), -(-p.shape[1] // block_v))
    padded = p.new_zeros(blocks[0] * block_n, blocks[1] * block_v)
    padded[:n, :v] = p
    tile_max = padded.view(blocks[0], block_n, blocks[1], block_v).amax(dim=(1, 3))
    rows = torch.arange(n, device=p.device)
    has_target = g_lp.reshape(-1) != 0
    tile_max[rows[has_target] // block_n, ids.reshape(-1)[has_target] // block_v] = math.inf
    return tile_max


def kept_entries(kept_tiles: torch.Tensor, n: int, v: int, block_n=BLOCK_N, block_v=BLOCK_V) -> torch.Tensor:
    """[N, V] bool: the logits whose tile the filter keeps."""
    return kept_tiles.repeat_interleave(block_n, 0).repeat_interleave(block_v, 1)[:n, :v]


def eps_between_tiles(tile_max: torch.Tensor) -> float:
    """A threshold between two consecutive tile maxima near the median, with the widest ratio among them:
    float32's probabilities cannot fall on the other side of it."""
    values = tile_max[tile_max.isfinite()].unique().sort().values.cpu()
    middle = values[len(values) // 4 : 3 * len(values) // 4 + 1]
    ratios = middle[1:] / middle[:-1]
    i = int(ratios.argmax())
    assert ratios[i] > 1.001
    return math.sqrt(middle[i].item() * middle[i + 1].item())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradient_filter_skips_exactly_the_negligible_tiles(fused, temperature):
    hidden, weight, bias, ids = inputs()
    gen = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    g_lp.view(-1)[5] = 0  # a row whose target tile is not kept for it
    tile_max = tile_max_probability(hidden, weight, bias, ids, g_lp, temperature)
    eps = eps_between_tiles(tile_max)
    kept_tiles = tile_max >= eps
    assert 0.2 < kept_tiles.double().mean() < 0.9  # the filter has work to do, and work left
    keep = kept_entries(kept_tiles, B * T, V)

    got = grads(hidden, weight, bias, ids, g_lp, g_ent, temperature=temperature, grad_filter_eps=eps)
    assert_close(got, reference_grads(hidden, weight, bias, ids, g_lp, g_ent, temperature, keep))
    # The skipped terms are small but not nothing: the exact gradient is outside the tolerances.
    exact = reference_grads(hidden, weight, bias, ids, g_lp, g_ent, temperature)
    with pytest.raises(AssertionError):
        assert_close(got, exact)
    # The forward is never filtered.
    options = {"bias": bias, "temperature": temperature}
    logp = linear_token_logprobs(hidden, weight, ids, grad_filter_eps=eps, **options)
    want = ref_fn(hidden.double(), weight.double(), ids, **(options | {"bias": bias.double()}))
    torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)


def test_gradient_filter_error_on_a_peaked_distribution(fused):
    """At Cut Cross-Entropy's default (2^-12), rows peaked as a trained model's keep 78% of the tiles and
    lose 4e-5 of the exact gradient's norm (measured; at logits of std 8, 96% and 2e-5)."""
    hidden, weight, bias, ids = inputs(scale=16.0)
    gen = torch.Generator().manual_seed(3)
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.zeros(B, T)
    got = grads(hidden, weight, bias, ids, g_lp, g_ent, grad_filter_eps=2**-12)
    exact = reference_grads(hidden, weight, bias, ids, g_lp, g_ent, 1.0)
    for g, g64 in zip(got, exact, strict=True):
        assert 1e-6 < ((g.double() - g64).norm() / g64.norm()).item() < 2e-4


def test_pytorch_path_computes_the_exact_gradient(monkeypatch):
    use_backend(monkeypatch, "torch")
    hidden, weight, bias, ids = inputs()
    gen = torch.Generator().manual_seed(4)
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    got = grads(hidden, weight, bias, ids, g_lp, g_ent, grad_filter_eps=0.5, chunk_size=7)
    assert_close(got, reference_grads(hidden, weight, bias, ids, g_lp, g_ent, 1.0))


@pytest.mark.parametrize("value", [0, 0.0, 1.0, 2, -1e-3, math.nan, math.inf, True, "1e-4"])
def test_grad_filter_eps_validation(value):
    with pytest.raises(ValueError, match="grad_filter_eps"):
        linear_token_logprobs(
            torch.randn(2, 8), torch.randn(16, 8), torch.zeros(2, dtype=torch.long), grad_filter_eps=value
        )
