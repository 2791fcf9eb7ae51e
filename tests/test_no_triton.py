"""Without triton (macOS, Windows), `import fastrlhf.kernels` works and every op runs its PyTorch path.

Each check runs in a subprocess whose import system refuses `triton`, so this process's triton is untouched.
"""

import os
import subprocess
import sys
import textwrap

import pytest

HIDE_TRITON = """
import importlib.abc
import sys


class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTriton())
"""

EVERY_OP = """
import math

import torch

import fastrlhf.kernels as K
from fastrlhf.kernels._triton import HAS_TRITON
from fastrlhf.kernels.gae import gae_reference
from fastrlhf.kernels.kl_penalty import kl_penalty_reference
from fastrlhf.kernels.linear_token_logprobs import linear_token_logprobs_reference
from fastrlhf.kernels.shape_rewards import ppo_advantages_reference, shape_rewards_reference
from fastrlhf.kernels.token_logprobs import token_logprobs_reference
from fastrlhf.kernels.whiten import masked_mean_reference, masked_var_reference, masked_whiten_reference

assert not HAS_TRITON and "triton" not in sys.modules
torch.manual_seed(0)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    # fp32 results against float64 references: fp32-level tolerances.
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


logits = torch.randn(3, 5, 37, requires_grad=True)
ids = torch.randint(0, 37, (3, 5))
lp, ent = K.token_logprobs(logits, ids, temperature=0.7, return_entropy=True)
x64 = logits.detach().double().requires_grad_()
lp64, ent64 = token_logprobs_reference(x64, ids, temperature=0.7, return_entropy=True)
close(lp.double(), lp64), close(ent.double(), ent64)
(lp.sum() + ent.sum()).backward()
(lp64.sum() + ent64.sum()).backward()
close(logits.grad.double(), x64.grad)

hidden = torch.randn(15, 16, requires_grad=True)
weight = torch.randn(37, 16) / 4
lp = K.linear_token_logprobs(hidden, weight, ids.view(-1), temperature=0.7)
h64 = hidden.detach().double().requires_grad_()
lp64 = linear_token_logprobs_reference(h64, weight.double(), ids.view(-1), temperature=0.7)
close(lp.double(), lp64, rtol=1e-5, atol=1e-5)
lp.sum().backward()
lp64.sum().backward()
close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)

logp, ref = -torch.rand(3, 11) * 5, -torch.rand(3, 11) * 5
logp.requires_grad_()
kl = K.kl_penalty(logp, ref, estimator="k3")
close(kl.double(), kl_penalty_reference(logp.detach().double(), ref.double(), estimator="k3"))
kl.sum().backward()
close(logp.grad, 1 - torch.exp(ref - logp.detach()))

mask = torch.rand(3, 11) < 0.7
values, scores = torch.randn(3, 11), torch.randn(3)
rewards = torch.randn(3, 11)
for got, want in zip(K.gae(rewards, values, mask, gamma=0.9, lam=0.8),
                     gae_reference(rewards.double(), values, mask, gamma=0.9, lam=0.8), strict=True):
    close(got.double(), want)
x = torch.randn(3, 11) * 3 + 2
close(K.masked_mean(x, mask).double(), masked_mean_reference(x.double(), mask))
close(K.masked_var(x, mask).double(), masked_var_reference(x.double(), mask))
close(K.masked_whiten(x, mask).double(), masked_whiten_reference(x.double(), mask))
for coef in (0.05, torch.tensor(0.05)):
    got = K.shape_rewards(scores, logp.detach(), ref, mask, kl_coef=coef, estimator="k2")
    want = shape_rewards_reference(scores.double(), logp.detach().double(), ref.double(), mask, kl_coef=0.05,
                                   estimator="k2")
    close(got.double(), want)
got = K.ppo_advantages(scores, logp.detach(), ref, values, mask, kl_coef=0.05, gamma=0.95, lam=0.9)
want = ppo_advantages_reference(scores.double(), logp.detach().double(), ref.double(), values.double(), mask,
                                kl_coef=0.05, gamma=0.95, lam=0.9)
for g, w in zip(got, want, strict=True):
    close(g.double(), w)
print("every op ok")
"""


def run_hidden(script: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRLHF_KERNELS")}
    code = HIDE_TRITON + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["plain", "interpret_set"])
def test_every_op_runs_without_triton(interpret):
    # TRITON_INTERPRET=1 asks for the interpreter, which needs triton: the ops fall back to PyTorch.
    result = run_hidden(EVERY_OP, TRITON_INTERPRET=interpret)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every op ok" in result.stdout


def test_forcing_triton_without_triton_is_a_clear_error():
    script = """
    import torch
    import fastrlhf.kernels as K

    try:
        K.kl_penalty(torch.zeros(3), torch.zeros(3))
    except ValueError as err:
        print("raised:", err)
    """
    result = run_hidden(script, FASTRLHF_KERNELS="triton")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "raised: FASTRLHF_KERNELS=triton, but triton is not installed" in result.stdout


def test_kernels_cannot_launch_without_triton():
    # The stand-in still decorates (with or without jit options); launching says what is missing.
    script = """
    from fastrlhf.kernels._triton import triton

    @triton.jit(do_not_specialize=["n"])
    def kernel(n):
        pass

    try:
        kernel[(1,)](3)
    except ModuleNotFoundError as err:
        print("raised:", err)
    """
    result = run_hidden(script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "raised: triton is not installed" in result.stdout
