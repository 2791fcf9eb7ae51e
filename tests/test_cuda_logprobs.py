"""The compiled log-prob kernels on a GPU, at sizes where several V-blocks and chunks are crossed.

Run on a CUDA machine with ``TRITON_INTERPRET=0 pytest -m cuda tests``; skipped elsewhere.
"""

import pytest
import torch

from fastrlhf.kernels import linear_token_logprobs, token_logprobs
from fastrlhf.kernels.linear_token_logprobs import linear_token_logprobs_reference
from fastrlhf.kernels.token_logprobs import token_logprobs_reference

pytestmark = pytest.mark.cuda

# Relative-norm tolerances of gradients: the final rounding to the operand dtype, well under the error of a
# GEMM that rounds logits to bf16/fp16 (see test_linear_token_logprobs.py).
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_token_logprobs_on_cuda(dtype):
    torch.manual_seed(0)
    n, h, v = 1000, 256, 50021
    hidden = torch.randn(n + 1, h, device="cuda").to(dtype)[:-1]
    weight = (torch.randn(v, h, device="cuda") * 8 / h**0.5).to(dtype)
    bias = torch.randn(v, device="cuda").to(dtype)
    ids = torch.randint(0, v, (n,), device="cuda")
    params = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    params64 = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logp, ent = linear_token_logprobs(*params[:2], ids, bias=params[2], return_entropy=True, chunk_size=96)
    ref_logp, ref_ent = linear_token_logprobs_reference(
        *params64[:2], ids, bias=params64[2], return_entropy=True
    )
    # The logits GEMM accumulates in fp32 from the low-precision operands, as the reference does in fp64.
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-4, atol=1e-3)
    w1, w2 = torch.randn_like(logp), torch.randn_like(ent)
    torch.autograd.backward([logp, ent], [w1, w2])
    torch.autograd.backward([ref_logp, ref_ent], [w1.double(), w2.double()])
    for p, p64 in zip(params, params64, strict=True):
        assert p.grad.dtype == dtype
        assert rel_norm(p.grad, p64.grad) < GRAD_TOL[dtype] * (10 if dtype == torch.float32 else 1)
