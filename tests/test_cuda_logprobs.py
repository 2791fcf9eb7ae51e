"""The compiled log-prob kernels on a GPU, at sizes where several V-blocks and chunks are crossed.

Run on a CUDA machine with ``TRITON_INTERPRET=0 pytest -m cuda tests``; skipped elsewhere.
"""

import importlib

import pytest
import torch

from fastrlhf.kernels import linear_token_logprobs, token_logprobs
from fastrlhf.kernels.linear_token_logprobs import linear_token_logprobs_reference
from fastrlhf.kernels.token_logprobs import token_logprobs_reference

pytestmark = pytest.mark.cuda
lin = importlib.import_module("fastrlhf.kernels.linear_token_logprobs")

# Relative-norm tolerances of gradients: the final rounding to the operand dtype, well under the error of a
# GEMM that rounds logits to bf16/fp16 (see test_linear_token_logprobs.py). The linear op also rounds dL/dz
# to the operand dtype for its tensor-core products, which about doubles the error.
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}
LINEAR_GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-3, torch.float16: 8e-4}


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_on_cuda(dtype, temperature):
    torch.manual_seed(0)
    logits = (torch.randn(3, 171, 32003, device="cuda") * 4).to(dtype)[:, :-1]  # strided leading dims
    ids = torch.randint(0, 32003, (3, 170), device="cuda")
    x = logits.detach().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    logp, ent = token_logprobs(x, ids, temperature=temperature, return_entropy=True)
    ref_logp, ref_ent = token_logprobs_reference(x64, ids, temperature=temperature, return_entropy=True)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=2e-5)
    w1, w2 = torch.randn_like(logp), torch.randn_like(ent)
    torch.autograd.backward([logp, ent], [w1, w2])
    torch.autograd.backward([ref_logp, ref_ent], [w1.double(), w2.double()])
    assert x.grad.dtype == dtype
    assert rel_norm(x.grad, x64.grad) < GRAD_TOL[dtype]


LINEAR_CASES = [  # (V, H, dtype): Qwen2.5 and GPT-2 vocabularies, 0.5B and 7B widths
    (151936, 896, torch.bfloat16),
    (151936, 4096, torch.bfloat16),
    (50257, 896, torch.float16),
    (50257, 4096, torch.float16),
    (50021, 256, torch.float32),
]
LINEAR_OPTIONS = [
    dict(),
    dict(temperature=0.7, bias=True),
    dict(softcap=30.0),
    dict(logit_scale=0.0625, temperature=1.3),
    dict(softcap=5.0, logit_scale=2.0, bias=True),
]


def linear_inputs(n, v, h, dtype, bias):
    torch.manual_seed(0)
    hidden = torch.randn(2, n // 2 + 1, h, device="cuda").to(dtype)[:, :-1]  # strided, as models pass it
    weight = (torch.randn(v, h, device="cuda") * 8 / h**0.5).to(dtype)
    b = torch.randn(v, device="cuda").to(dtype) if bias else None
    ids = torch.randint(0, v, hidden.shape[:-1], device="cuda")
    ids[0, :3] = torch.tensor([-100, v, v + 5])  # out of range: NaN logp, no gradient
    return hidden, weight, b, ids


@pytest.mark.parametrize(("v", "h", "dtype"), LINEAR_CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("options", LINEAR_OPTIONS, ids=["plain", "temp_bias", "softcap", "scale", "all"])
def test_linear_token_logprobs_on_cuda(v, h, dtype, options):
    options = dict(options)
    hidden, weight, bias, ids = linear_inputs(301, v, h, dtype, options.pop("bias", False))
    params = [t.detach().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    params64 = [t.detach().double().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    kw = dict(bias=params[2]) if bias is not None else {}
    kw64 = dict(bias=params64[2]) if bias is not None else {}
    logp, ent = linear_token_logprobs(*params[:2], ids, return_entropy=True, **kw, **options)
    ref_logp, ref_ent = linear_token_logprobs_reference(
        *params64[:2], ids, return_entropy=True, **kw64, **options
    )
    assert torch.equal(logp.isnan(), ref_logp.isnan())
    # The logits accumulate in fp32 from the low-precision operands, as the reference does in fp64.
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-4, atol=1e-3, equal_nan=True)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-4, atol=1e-3)
    w1, w2 = torch.randn_like(logp), torch.randn_like(ent)
    valid = ~ref_logp.isnan()
    torch.autograd.backward([torch.where(valid, logp, 0.0), ent], [w1, w2])
    torch.autograd.backward([torch.where(valid, ref_logp, 0.0), ref_ent], [w1.double(), w2.double()])
    for p, p64 in zip(params, params64, strict=True):
        assert p.grad.dtype == dtype
        assert rel_norm(p.grad, p64.grad) < LINEAR_GRAD_TOL[dtype]


def test_linear_atomics_are_deterministic_enough():
    """The backward's fp32 atomics reorder additions only: two runs agree to fp32 rounding."""
    hidden, weight, _, ids = linear_inputs(2048, 151936, 896, torch.bfloat16, False)
    grads = []
    for _ in range(2):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        linear_token_logprobs(h, w, ids.clamp(min=0)).sum().backward()
        grads.append((h.grad.float(), w.grad.float()))
    for a, b in zip(*grads, strict=True):
        differing = (a != b).float().mean().item()
        assert differing < 1e-3, f"{differing:.2e} of the bf16 gradient elements differ between runs"
        assert (a - b).abs().max() <= 2**-7 * a.abs().max()


def test_linear_extra_memory_is_small():
    """No [N, V] or [chunk, V] buffer: fwd+bwd temporaries stay a few MiB plus the fp32 accumulators."""
    n, v, h = 8192, 151936, 896
    hidden, weight, _, ids = linear_inputs(n, v, h, torch.bfloat16, False)
    hidden, ids = hidden.contiguous(), ids.clamp(min=0)
    h_, w_ = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logp, ent = linear_token_logprobs(h_, w_, ids, return_entropy=True)
    torch.autograd.backward([logp, ent], [torch.ones_like(logp), torch.ones_like(ent)])
    torch.cuda.synchronize()
    outputs = h_.grad.numel() * 2 + w_.grad.numel() * 2 + 2 * logp.numel() * 4
    extra = torch.cuda.max_memory_allocated() - base - outputs
    accumulators = n * h * 4 + 32 * 1024**2  # fp32 dhidden + one fp32 dweight slice
    assert extra <= accumulators + 16 * 1024**2, f"{extra / 2**20:.0f} MiB extra"


@pytest.mark.parametrize(("v", "h", "dtype"), [(151936, 896, torch.bfloat16), (50021, 256, torch.float32)])
def test_linear_backward_skips_on_cuda(v, h, dtype):
    """The GPU's tiles: token blocks with no upstream gradient are skipped exactly, and grad_filter_eps
    skips exactly the tiles a float64 reference of the same rule drops."""
    from test_linear_grad_skips import eps_between_tiles, kept_entries, reference_grads, tile_max_probability

    tiles = lin._tiles(dtype, backward=True, capability=torch.cuda.get_device_capability())
    hidden, weight, bias, ids = linear_inputs(6 * tiles.block_n + 37, v, h, dtype, True)
    hidden, ids, n = hidden.contiguous(), ids.clamp(0, v - 1), ids.numel()
    g_lp, g_ent = torch.randn(ids.shape, device="cuda"), torch.randn(ids.shape, device="cuda")
    g_lp.view(-1)[: 2 * tiles.block_n] = 0  # blocks 0 and 1: no logp gradient, and block 0 no entropy one
    g_ent.view(-1)[: tiles.block_n] = 0

    def grads(**options):
        params = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
        out = linear_token_logprobs(params[0], params[1], ids, bias=params[2], return_entropy=True, **options)
        torch.autograd.backward(list(out), [g_lp, g_ent])
        return [p.grad for p in params]

    def check(got, want):
        for g, g64 in zip(got, want, strict=True):
            assert rel_norm(g, g64) < LINEAR_GRAD_TOL[dtype]

    exact = grads()
    check(exact, reference_grads(hidden, weight, bias, ids, g_lp, g_ent, 1.0))
    assert (exact[0].view(-1, h)[: tiles.block_n] == 0).all()

    tile_max = tile_max_probability(hidden, weight, bias, ids, g_lp, 1.0, tiles.block_n, tiles.block_v)
    tile_max[0] = 0.0  # block 0 is skipped before the filter looks at it
    eps = eps_between_tiles(tile_max)
    keep = kept_entries(tile_max >= eps, n, v, tiles.block_n, tiles.block_v)
    filtered = grads(grad_filter_eps=eps)
    check(filtered, reference_grads(hidden, weight, bias, ids, g_lp, g_ent, 1.0, keep))


def test_nan_reaches_the_outputs_on_cuda():
    """Compiled max/maximum may drop NaN operands (the interpreter does not): a NaN logit must still make
    its rows' logp and entropy NaN, in both log-prob ops."""
    hidden, weight, _, ids = linear_inputs(301, 50257, 896, torch.bfloat16, False)
    ids = ids.clamp(min=0)
    weight[7, 3] = float("nan")
    logp, ent = linear_token_logprobs(hidden, weight, ids, return_entropy=True)
    assert logp.isnan().all() and ent.isnan().all()
    logits = torch.randn(4, 32003, device="cuda")
    logits[2, 17] = float("nan")
    logp, ent = token_logprobs(logits, torch.zeros(4, dtype=torch.long, device="cuda"), return_entropy=True)
    assert torch.equal(logp.isnan(), torch.tensor([False, False, True, False], device="cuda"))
    assert torch.equal(ent.isnan(), logp.isnan())
