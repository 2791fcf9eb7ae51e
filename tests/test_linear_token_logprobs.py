"""linear_token_logprobs against a float64 reference on full logits, on both backends."""

import importlib
import math

import pytest
import torch

from fastrlhf.kernels import linear_token_logprobs

lin = importlib.import_module("fastrlhf.kernels.linear_token_logprobs")
tlp = importlib.import_module("fastrlhf.kernels.token_logprobs")
ref_fn = lin.linear_token_logprobs_reference

B, T, H, V = 3, 5, 40, 1000
N = B * T
# Relative-norm gradient tolerances for bf16/fp16 operands. The PyTorch path on CPU lands near 1.7e-3 / 2e-4
# (the final rounding of the gradient); the fused path, which also rounds dL/dz to the operand dtype for its
# products as tensor cores do, near 3.5e-3 / 4.5e-4; a GEMM that rounds the logits lands near 1.5e-2 / 2e-3.
GRAD_NORM_TOL = {torch.bfloat16: 6e-3, torch.float16: 8e-4}
GRAD_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def small_tiles(dtype, backward, capability):
    """Tiles near tl.dot's minimum of 16: the interpreter crosses many token blocks and vocabulary tiles."""
    return lin._Tiles(16, 32, 16, num_warps=1, num_stages=1)


def use_backend(monkeypatch, name: str) -> str:
    monkeypatch.setenv("FASTRLHF_KERNELS", name)
    monkeypatch.setattr(tlp, "MAX_BLOCK_V", 256)
    monkeypatch.setattr(tlp, "_TORCH_CHUNK_ELEMS", 2500)
    monkeypatch.setattr(lin, "_tiles", small_tiles)
    # Backward vocabulary slices of 7 tiles (V = 1000 takes 5 slices, the last one partial).
    monkeypatch.setattr(lin, "_DW_SLICE_BYTES", 4 * H * 32 * 7)
    return name


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    return use_backend(monkeypatch, request.param)


@pytest.fixture
def fused(monkeypatch):
    """The Triton path only (its tiling details have no PyTorch counterpart)."""
    return use_backend(monkeypatch, "triton")


def make_inputs(dtype=torch.float32, bias=False, scale=8.0):
    """Logits of std ~scale, like a trained LM head (where bf16 logits hurt the most)."""
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) * scale / math.sqrt(H)).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    return hidden, weight, b, torch.randint(0, V, (B, T))


def run(hidden, weight, bias, ids, **kw):
    """(logp, entropy, grads...) of w1*logp + w2*entropy for the op and for the float64 reference."""
    params = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    params64 = [t.detach().double().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    bias_kw, bias64_kw = (dict(bias=params[2]), dict(bias=params64[2])) if bias is not None else ({}, {})
    out = linear_token_logprobs(params[0], params[1], ids, return_entropy=True, **bias_kw, **kw)
    kw.pop("chunk_size", None)
    ref = ref_fn(params64[0], params64[1], ids, return_entropy=True, **bias64_kw, **kw)
    gen = torch.Generator().manual_seed(1)  # the same upstream gradients on every call
    w1, w2 = torch.randn(ids.shape, generator=gen), torch.randn(ids.shape, generator=gen)
    torch.autograd.backward(list(out), [w1, w2])
    torch.autograd.backward(list(ref), [w1.double(), w2.double()])
    return [*out, *(p.grad for p in params)], [*ref, *(p.grad for p in params64)]


def check_forward(out, ref):
    for a, b in zip(out[:2], ref[:2], strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, equal_nan=True)


def check_grads_elementwise(out, ref, rtol):
    # atol scaled to the largest gradient: GEMM sums over V or N terms cancel, fp32 or not.
    for g, g64 in zip(out[2:], ref[2:], strict=True):
        atol = (1e-3 if rtol > 1e-4 else 1e-5) * g64.abs().max().item()
        torch.testing.assert_close(g.double(), g64, rtol=rtol, atol=atol)


def check_grads_norm(out, ref, tol):
    for g, g64 in zip(out[2:], ref[2:], strict=True):
        err = ((g.double() - g64).norm() / g64.norm()).item()
        assert err <= tol, f"relative gradient error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize(
    ("use_bias", "temperature", "chunk_size"),
    [(False, 1.0, None), (True, 0.7, 4), (True, 1.3, 7), (False, 1.0, 1)],
)
def test_matches_float64_reference(backend, use_bias, temperature, chunk_size):
    hidden, weight, bias, ids = make_inputs(bias=use_bias)
    out, ref = run(hidden, weight, bias, ids, temperature=temperature, chunk_size=chunk_size)
    check_forward(out, ref)
    check_grads_elementwise(out, ref, rtol=1e-5)
    assert [g.dtype for g in out[2:]] == [torch.float32] * len(out[2:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients_are_tight(backend, dtype):
    hidden, weight, bias, ids = make_inputs(dtype, bias=True)
    out, ref = run(hidden, weight, bias, ids, temperature=0.7, chunk_size=4)
    check_forward(out, ref)
    assert [g.dtype for g in out[2:]] == [dtype] * 3
    check_grads_elementwise(out, ref, rtol=GRAD_RTOL[dtype])
    check_grads_norm(out, ref, GRAD_NORM_TOL[dtype])


def emulate_native_gemm(monkeypatch, fp32_output=True):
    """The CUDA path on CPU: bf16/fp16 operands whose GEMMs return fp32 (or, to show the bug, bf16/fp16)."""
    monkeypatch.setattr(lin, "_gemm_dtype", lambda weight: weight.dtype)
    if fp32_output:
        mm32 = lambda a, b: torch.mm(a.float(), b.float())  # exact products, fp32 sums, fp32 out
    else:
        mm32 = lambda a, b: torch.mm(a, b).float()  # output rounded to the operands' dtype first
    monkeypatch.setattr(lin, "_mm32", mm32)
    monkeypatch.setattr(lin, "_addmm32_", lambda acc, a, b: acc.add_(mm32(a, b)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_native_low_precision_gemm_path(backend, monkeypatch, dtype):
    # Here d(loss)/d(logits) is written in the weight's dtype by the kernel and fed to the backward GEMMs.
    emulate_native_gemm(monkeypatch)
    hidden, weight, bias, ids = make_inputs(dtype, bias=True)
    out, ref = run(hidden, weight, bias, ids, temperature=0.7, chunk_size=4)
    check_forward(out, ref)
    check_grads_norm(out, ref, GRAD_NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tolerances_catch_low_precision_logits(monkeypatch, dtype):
    """Keeps the tolerances above honest: a GEMM that outputs bf16/fp16 logits must fail each check."""
    monkeypatch.setenv("FASTRLHF_KERNELS", "torch")
    emulate_native_gemm(monkeypatch, fp32_output=False)
    hidden, weight, bias, ids = make_inputs(dtype, bias=True)
    out, ref = run(hidden, weight, bias, ids, temperature=0.7, chunk_size=4)
    with pytest.raises(AssertionError):
        check_forward(out, ref)
    with pytest.raises(AssertionError):
        check_grads_norm(out, ref, GRAD_NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunking_does_not_change_results(monkeypatch, dtype):
    """The PyTorch path's chunk size (the Triton path tiles by itself)."""
    use_backend(monkeypatch, "torch")
    # Multiples of 1/4 make every GEMM exact, so any difference would come from the chunked softmax itself.
    hidden = (torch.randint(-4, 5, (B, T, H)) / 4).to(dtype)
    weight = (torch.randint(-4, 5, (V, H)) / 4).to(dtype)
    bias = (torch.randint(-4, 5, (V,)) / 4).to(dtype)
    ids = torch.randint(0, V, (B, T))
    results = []
    for chunk_size in (N, N, 4):  # 4 does not divide N = 15
        out, _ = run(hidden, weight, bias, ids, temperature=0.7, chunk_size=chunk_size)
        results.append(out)
    for out in results[1:]:
        assert all(((a - b) == 0).all() for a, b in zip(out[:2], results[0][:2], strict=True))
        # Gradients only up to summation order (per-chunk GEMMs, the fp32 weight-gradient sum).
        check_grads_elementwise(out, [*results[0][:2], *(g.double() for g in results[0][2:])], 2**-7)
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))  # same call twice


def test_backends_agree(monkeypatch):
    hidden, weight, bias, ids = make_inputs(bias=True)
    outs = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("FASTRLHF_KERNELS", name)
        outs[name], _ = run(hidden, weight, bias, ids, temperature=1.3, chunk_size=6)
    for a, b in zip(outs["torch"], outs["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_partial_gradients(backend):
    hidden, weight, bias, ids = make_inputs(bias=True)
    w = weight.clone().requires_grad_()
    w64 = weight.double().requires_grad_()
    # Only the weight needs a gradient, and only the entropy flows back.
    _, ent = linear_token_logprobs(hidden, w, ids, bias=bias, return_entropy=True, chunk_size=4)
    _, ent64 = ref_fn(hidden.double(), w64, ids, bias=bias.double(), return_entropy=True)
    ent.sum().backward()
    ent64.sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5 * w64.grad.abs().max().item())
    # Only hidden, logp only.
    h = hidden.clone().requires_grad_()
    h64 = hidden.double().requires_grad_()
    linear_token_logprobs(h, weight, ids, chunk_size=4).sum().backward()
    ref_fn(h64, weight.double(), ids).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-5 * h64.grad.abs().max().item())


def test_out_of_range_ids(backend):
    hidden, weight, bias, ids = make_inputs(bias=True)
    ids.view(-1)[[0, 4, 9]] = torch.tensor([-100, V, V + 3])
    invalid = (ids < 0) | (ids >= V)
    out, ref = run(hidden, weight, bias, ids, temperature=0.7, chunk_size=4)
    assert torch.equal(out[0].isnan(), invalid) and out[1].isfinite().all()
    check_forward(out, ref)
    check_grads_elementwise(out, ref, rtol=1e-5)
    h = hidden.clone().requires_grad_()
    linear_token_logprobs(h, weight, ids, bias=bias, chunk_size=4).backward(torch.ones(ids.shape))
    assert (h.grad[invalid] == 0).all() and (h.grad[~invalid] != 0).all()


def test_single_token_and_empty(backend):
    for shape in [(1, 1), (1,), (0, 3)]:
        _, weight, _, _ = make_inputs()
        ids = torch.randint(0, V, shape)
        out, ref = run(torch.randn(*shape, H), weight, None, ids)
        check_forward(out, ref)
        assert out[0].shape == shape and out[2].shape == (*shape, H)
        if ids.numel():
            check_grads_elementwise(out, ref, rtol=1e-5)


def test_default_chunk_size():
    assert lin.default_chunk_size(152064) == 256
    assert lin.default_chunk_size(32000) == 2048
    for v in (1000, 3001, 50257, 128256):
        c = lin.default_chunk_size(v)
        assert c & (c - 1) == 0 and c * v * 4 <= 256 * 1024**2 < 2 * c * v * 4
    # On CPU there is no fp32-output bf16 GEMM, so the operands are upcast.
    assert lin._gemm_dtype(torch.zeros(2, 2, dtype=torch.bfloat16)) == torch.float32
    assert lin._gemm_dtype(torch.zeros(2, 2)) == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(hidden=torch.randn(2, 3, 8).double()), "hidden"),
        (dict(weight=torch.randn(16, 8).half()), "dtype"),
        (dict(weight=torch.randn(16 * 8)), "weight"),
        (dict(weight=torch.randn(16, 7)), "weight"),
        (dict(weight=torch.randn(16, 8, 1)), "weight"),
        (dict(bias=torch.randn(15)), "bias"),
        (dict(bias=torch.zeros(16, dtype=torch.long)), "bias"),
        (dict(ids=torch.zeros(2, 3)), "ids"),
        (dict(ids=torch.zeros(3, 2, dtype=torch.long)), "ids"),
        (dict(ids=torch.zeros(2, 3, dtype=torch.long, device="meta")), "device"),
        (dict(bias=torch.zeros(16, device="meta")), "device"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-2.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
    ],
)
def test_validation(kwargs, match):
    args = dict(
        hidden=torch.randn(2, 3, 8), weight=torch.randn(16, 8), ids=torch.zeros(2, 3, dtype=torch.long)
    )
    args |= kwargs
    with pytest.raises(ValueError, match=match):
        linear_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("ids"), **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "options",
    [dict(softcap=2.5), dict(logit_scale=0.37), dict(softcap=4.0, logit_scale=1.9, temperature=0.6)],
    ids=["softcap", "scale", "both"],
)
def test_softcap_and_logit_scale(backend, dtype, options):
    """Gemma 2's capping and Cohere/Granite's scale against the float64 reference with the same options."""
    hidden, weight, bias, ids = make_inputs(dtype, bias=True)
    out, ref = run(hidden, weight, bias, ids, chunk_size=4, **options)
    check_forward(out, ref)
    if dtype == torch.float32:
        check_grads_elementwise(out, ref, rtol=1e-5)
    else:
        check_grads_norm(out, ref, GRAD_NORM_TOL[dtype])
    # The options matter: the reference without them is far from what the op returned.
    plain = ref_fn(hidden.double(), weight.double(), ids, bias=bias.double(), return_entropy=True)
    with pytest.raises(AssertionError):
        check_forward(out, plain)


def test_softcap_gradient_is_not_the_uncapped_one(backend):
    """Dropping the tanh derivative (1 - t^2) must fail the gradient check: these logits are capped hard."""
    hidden, weight, bias, ids = make_inputs(bias=True)
    out, ref = run(hidden, weight, bias, ids, chunk_size=4, softcap=1.0)
    check_grads_elementwise(out, ref, rtol=1e-5)
    h64 = hidden.double().requires_grad_()
    logits = h64 @ weight.double().t() + bias.double()
    wrong = logits + (torch.tanh(logits) - logits).detach()  # capped values, identity derivative
    tlp.token_logprobs_reference(wrong, ids).sum().backward()
    assert (h64.grad - ref[2]).norm() > 0.1 * ref[2].norm()


@pytest.mark.parametrize("multiprocessors", [1, 1000])
def test_vocabulary_splits_merge_exactly(fused, monkeypatch, multiprocessors):
    """One vocabulary slice per token block, or one per tile: the merged statistics are the same."""
    monkeypatch.setattr(lin, "_multiprocessors", lambda device: multiprocessors)
    hidden, weight, bias, ids = make_inputs(bias=True)
    out, ref = run(hidden, weight, bias, ids, temperature=0.8)
    check_forward(out, ref)
    check_grads_elementwise(out, ref, rtol=1e-5)


def test_strided_hidden_is_read_in_place(backend):
    """hidden[:, start - 1 : -1] as models.response_logprobs passes it: no copy changes the results."""
    _, weight, _, _ = make_inputs()
    full = torch.randn(B, T + 4, H)
    view = full[:, 3:-1]
    ids = torch.randint(0, V, view.shape[:-1])
    a = linear_token_logprobs(view, weight, ids, return_entropy=True, chunk_size=4)
    b = linear_token_logprobs(view.contiguous(), weight, ids, return_entropy=True, chunk_size=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_masked_vocabulary_and_large_logits(backend):
    """-inf bias entries (banned tokens) and logits around 1e3: finite, exact where the reference is."""
    hidden, weight, _, ids = make_inputs()
    bias = torch.zeros(V)
    bias[::7] = -math.inf
    ids.view(-1)[:3] = torch.tensor([0, 7, 14])  # banned targets: logp = -inf, no NaN anywhere
    out, ref = run(hidden * 100, weight, bias, ids, chunk_size=4)
    assert torch.equal(out[0].isneginf(), ids % 7 == 0) and torch.equal(ref[0].isneginf(), ids % 7 == 0)
    fin = ref[0].isfinite()
    torch.testing.assert_close(out[0][fin].double(), ref[0][fin], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out[1].double(), ref[1], rtol=1e-5, atol=1e-3)
    assert all(g.isfinite().all() for g in out[2:])


def test_nan_weight_poisons_every_row(backend):
    """A NaN in one vocabulary row reaches every token's normalizer: all logp and entropies are NaN, as in
    the reference, never a silently finite result."""
    hidden, weight, _, ids = make_inputs()
    weight[7, 3] = math.nan
    ids.view(-1)[0] = 7
    logp, ent = linear_token_logprobs(hidden, weight, ids, return_entropy=True, chunk_size=4)
    ref_logp, ref_ent = ref_fn(hidden.double(), weight.double(), ids, return_entropy=True)
    assert ref_logp.isnan().all() and ref_ent.isnan().all()
    assert logp.isnan().all() and ent.isnan().all()


def test_deterministic_mode_takes_the_reproducible_path(backend, monkeypatch):
    """torch.use_deterministic_algorithms(True): no atomics, so the PyTorch path, bit-identical repeats."""
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    calls = []
    monkeypatch.setattr(lin, "_triton_forward", lambda *a: calls.append(a))
    hidden, weight, bias, ids = make_inputs(bias=True)
    first, ref = run(hidden, weight, bias, ids, chunk_size=4)
    again, _ = run(hidden, weight, bias, ids, chunk_size=4)
    assert not calls
    check_forward(first, ref)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize(("name", "value"), [("softcap", 0.0), ("softcap", -1.0), ("logit_scale", math.inf)])
def test_option_validation(name, value):
    with pytest.raises(ValueError, match=name):
        linear_token_logprobs(
            torch.randn(2, 8), torch.randn(16, 8), torch.zeros(2, dtype=torch.long), **{name: value}
        )
