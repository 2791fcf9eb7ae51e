"""token_logprobs against a float64 reference, on both backends (Triton through the interpreter on CPU)."""

import importlib
import math

import pytest
import torch

from fastrlhf.kernels import token_logprobs

tlp = importlib.import_module("fastrlhf.kernels.token_logprobs")
ref_fn = tlp.token_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One ulp of the gradient's storage dtype: the kernels compute in fp32 and round once on the way out.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Both backends, with small V-blocks / row chunks so several are crossed at test sizes."""
    monkeypatch.setenv("FASTRLHF_KERNELS", request.param)
    monkeypatch.setattr(tlp, "MAX_BLOCK_V", 256)
    monkeypatch.setattr(tlp, "_TORCH_CHUNK_ELEMS", 2500)
    return request.param


def set_backend(monkeypatch, name):
    monkeypatch.setenv("FASTRLHF_KERNELS", name)


def make_logits(shape, dtype, kind, ids):
    """normal: randn*3. large: per-row offsets of +-1e4 (naive exp overflows). neginf: -inf entries."""
    x = torch.randn(shape) * 3
    if kind == "large":
        x = x + torch.empty((*shape[:-1], 1)).uniform_(-1e4, 1e4)
    x = x.to(dtype)
    if kind == "neginf":
        flat, fids = x.view(-1, shape[-1]), ids.reshape(-1)
        hole = torch.rand(flat.shape) < 0.1
        hole[torch.arange(flat.shape[0]), fids] = False  # -inf at non-target positions only
        flat[hole] = -math.inf
        flat[0] = -math.inf  # all but the target -inf: logp 0, entropy 0
        flat[0, fids[0]] = 1.5
        flat[1] = -math.inf  # all but one non-target -inf: logp -inf, gradient at the target only
        flat[1, (fids[1] + 1) % shape[-1]] = 0.25
    return x


def run(logits, ids, **kw):
    """(outputs, grads) of w1*logp + w2*entropy, for the op and the float64 reference on the same inputs."""
    x = logits.detach().clone().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    lp, ent = token_logprobs(x, ids, return_entropy=True, **kw)
    lp64, ent64 = ref_fn(x64, ids, return_entropy=True, **kw)
    w1, w2 = torch.randn(ids.shape), torch.randn(ids.shape)
    torch.autograd.backward([lp, ent], [w1, w2])
    torch.autograd.backward([lp64, ent64], [w1.double(), w2.double()])
    return (lp, ent, x.grad), (lp64, ent64, x64.grad)


def assert_outputs(out, ref, dtype):
    lp, ent, grad = out
    lp64, ent64, grad64 = ref
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(lp.double(), lp64, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(ent.double(), ent64, rtol=1e-5, atol=1e-5, equal_nan=True)
    atol = 1e-6 * grad64.abs().nan_to_num().max().item() + 1e-7 if grad64.numel() else 0.0
    torch.testing.assert_close(grad.double(), grad64, rtol=GRAD_RTOL[dtype], atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "temperature"), [("normal", 0.7), ("large", 1.0), ("neginf", 1.3)])
def test_matches_float64_reference(backend, dtype, kind, temperature):
    shape = (2, 5, 1000)
    ids = torch.randint(0, shape[-1], shape[:-1])
    out, ref = run(make_logits(shape, dtype, kind, ids), ids, temperature=temperature)
    assert_outputs(out, ref, dtype)
    if kind == "neginf":
        assert out[0].view(-1)[0] == 0 and out[0].view(-1)[1] == -math.inf


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1000), (3001,), (3, 3001), (2, 3, 2, 37), (0, 4, 11), (4, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_shapes(backend, shape):
    ids = torch.randint(0, shape[-1], shape[:-1])
    out, ref = run(torch.randn(shape), ids, temperature=1.3)
    assert out[0].shape == ids.shape and out[2].shape == shape
    assert_outputs(out, ref, torch.float32)


def strided_views():
    base = torch.randn(3, 6, 1000)
    yield "shifted", base, lambda b: b[:, :-1]
    yield "transposed", base, lambda b: b.transpose(0, 1)
    yield "three_strides", torch.randn(2, 3, 4, 1000), lambda b: b[:, ::2, :-1]
    yield "strided_vocab", torch.randn(2, 1000, 5), lambda b: b.transpose(1, 2)


@pytest.mark.parametrize("case", list(strided_views()), ids=lambda c: c[0])
def test_non_contiguous_logits(backend, case):
    _, base, view = case
    ids = torch.randint(0, 1000, view(base).shape[:-1])
    b = base.clone().requires_grad_()
    b64 = base.double().requires_grad_()
    lp, ent = token_logprobs(view(b), ids, temperature=0.7, return_entropy=True)
    lp64, ent64 = ref_fn(view(b64), ids, temperature=0.7, return_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    (lp64.sum() + 0.5 * ent64.sum()).backward()
    assert_outputs((lp, ent, b.grad), (lp64, ent64, b64.grad), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends_agree_and_repeat_bit_identically(monkeypatch, dtype):
    # Default block sizes here: V = 3001 is one masked block.
    ids = torch.randint(0, 3001, (3, 4))
    logits = (torch.randn(3, 4, 3001) * 4).to(dtype)
    results = {}
    for name in ("torch", "triton"):
        set_backend(monkeypatch, name)
        first = token_logprobs(logits, ids, temperature=0.7, return_entropy=True)
        again = token_logprobs(logits, ids, temperature=0.7, return_entropy=True)
        for a, b in zip(first, again, strict=True):
            assert ((a - b) == 0).all()
        results[name] = first
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_logp_only_and_entropy_only_gradients(backend):
    ids = torch.randint(0, 1000, (2, 7))
    logits = torch.randn(2, 7, 1000) * 2
    for use in ("logp", "entropy"):
        x = logits.clone().requires_grad_()
        x64 = logits.double().requires_grad_()
        if use == "logp":
            token_logprobs(x, ids, temperature=1.3).sum().backward()
            ref_fn(x64, ids, temperature=1.3).sum().backward()
        else:
            token_logprobs(x, ids, temperature=1.3, return_entropy=True)[1].sum().backward()
            ref_fn(x64, ids, temperature=1.3, return_entropy=True)[1].sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)


def test_out_of_range_ids(monkeypatch):
    V = 1000
    ids = torch.randint(0, V, (3, 4))
    bad = torch.tensor([-1, -100, V, V + 7])
    ids.view(-1)[[0, 5, 6, 11]] = bad
    invalid = (ids < 0) | (ids >= V)
    logits = torch.randn(3, 4, V)
    grads = {}
    for name in ("torch", "triton"):
        set_backend(monkeypatch, name)
        out, ref = run(logits, ids, temperature=0.7)
        assert torch.equal(out[0].isnan(), invalid)  # NaN exactly at the out-of-range ids
        assert out[1].isfinite().all()
        assert_outputs(out, ref, torch.float32)
        # With logp alone, its gradient for those rows is exactly zero whatever flows back.
        x = logits.clone().requires_grad_()
        token_logprobs(x, ids).backward(torch.ones(ids.shape))
        assert (x.grad[invalid] == 0).all() and (x.grad[~invalid] != 0).any()
        grads[name] = x.grad
    torch.testing.assert_close(grads["torch"], grads["triton"], rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter warns on the NaN it is meant to make
def test_all_neginf_row_gives_nan(backend):
    logits = torch.randn(3, 50)
    logits[1] = -math.inf
    lp, ent = token_logprobs(logits, torch.tensor([0, 1, 2]), return_entropy=True)
    assert lp[1].isnan() and ent[1].isnan()
    assert lp[[0, 2]].isfinite().all() and ent[[0, 2]].isfinite().all()


def test_torch_path_works_on_row_chunks(monkeypatch):
    set_backend(monkeypatch, "torch")
    monkeypatch.setattr(tlp, "_TORCH_CHUNK_ELEMS", 3000)
    seen = []
    for name in ("_torch_fwd_rows", "_torch_bwd_rows"):
        real = getattr(tlp, name)

        def spy(x, *args, _real=real):
            seen.append(x.shape[0])
            return _real(x, *args)

        monkeypatch.setattr(tlp, name, spy)
    x = torch.randn(4, 5, 1000, requires_grad=True)
    token_logprobs(x, torch.randint(0, 1000, (4, 5)), return_entropy=True)[1].sum().backward()
    assert seen and max(seen) * 1000 <= 3000


def test_int32_ids_accepted(backend):
    logits = torch.randn(2, 3, 100)
    ids = torch.randint(0, 100, (2, 3))
    torch.testing.assert_close(token_logprobs(logits, ids.int()), token_logprobs(logits, ids))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(logits=torch.randn(2, 3, 5).double()), "logits"),
        (dict(logits=torch.randint(0, 3, (2, 3, 5))), "logits"),
        (dict(logits=torch.tensor(1.0)), "logits"),
        (dict(ids=torch.zeros(2, 3)), "ids"),
        (dict(ids=torch.zeros(2, 3, dtype=torch.bool)), "ids"),
        (dict(ids=torch.zeros(3, 2, dtype=torch.long)), "ids"),
        (dict(ids=torch.zeros(2, 3, 1, dtype=torch.long)), "ids"),
        (dict(ids=torch.zeros(2, 3, dtype=torch.long, device="meta")), "device"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
    ],
)
def test_validation(kwargs, match):
    args = dict(logits=torch.randn(2, 3, 5), ids=torch.zeros(2, 3, dtype=torch.long)) | kwargs
    logits, ids = args.pop("logits"), args.pop("ids")
    with pytest.raises(ValueError, match=match):
        token_logprobs(logits, ids, **args)
