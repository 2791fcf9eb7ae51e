"""What each provider runs for a case: fastrlhf's op, its reference (eager or torch.compile'd), the peers,
and the baselines of the linear op (the full-logits path and its bare GEMMs)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .cases import ALL_OPS, RL_OPS, Case
from .ops import OpFns, resolve_op, rl_arguments
from .peers import Peers

PROVIDERS: dict[str, tuple[str, ...]] = {
    "token_logprobs": ("fastrlhf", "eager", "compile", "trl", "liger_selective", "liger_ce"),
    "linear_token_logprobs": (
        "fastrlhf",
        "fastrlhf_filtered",
        "eager",
        "compile",
        "full_logits",
        "trl",
        "liger_flce",
        "cce",
        "cce_exact",
        "bare_gemm",
    ),
    **{op: ("fastrlhf", "eager", "compile") for op in RL_OPS},
}
PROVIDER_DOCS: dict[str, str] = {
    "fastrlhf": "fastrlhf.kernels public op (Triton on CUDA tensors; the backend used is recorded per row)",
    "fastrlhf_filtered": "fastrlhf's linear_token_logprobs with grad_filter_eps=2**-12, Cut Cross-Entropy's "
    "default threshold (its like-for-like peer is cce); fwd+bwd only. The inputs' logits have std ~2, so "
    "few tiles fall under it",
    "eager": "the op's PyTorch reference (<op>_reference), run eagerly; for gae and ppo_advantages this is "
    "the Python loop over T vectorized over B, as TRL, verl and OpenRLHF compute GAE",
    "compile": "torch.compile of the reference (default options: dynamic=None, so shapes go dynamic after "
    "the first recompile); compile time is excluded from the timing, failures are recorded",
    "trl": "TRL: trl.kernels.selective_log_softmax_and_entropy (token_logprobs; always computes entropy "
    "too) / trl.kernels.ChunkedLogProbFunction with outputs=() or ('entropy',) (linear_token_logprobs)",
    "liger_selective": "Liger-Kernel liger_kernel.ops.grpo_loss.fused_selective_log_softmax: forward only "
    "(torch.no_grad), scores N-1 rows by design (drops the last position of the [1, N, V] view)",
    "liger_ce": "Liger-Kernel liger_kernel.transformers.functional.liger_cross_entropy(reduction='none'), "
    "logp = -loss; when logits require grad it computes the gradient in the forward, in place into the "
    "logits",
    "liger_flce": "Liger-Kernel liger_kernel.transformers.functional.liger_fused_linear_cross_entropy"
    "(reduction='none'), logp = -loss; a temperature is folded into the hidden states (hidden / T); no "
    "entropy",
    "cce": "Apple's Cut Cross-Entropy cut_cross_entropy.linear_cross_entropy(reduction='none') with its "
    "default gradient filtering (filter_eps='high'), logp = -loss; a temperature is folded into the hidden "
    "states (hidden / T); no entropy",
    "cce_exact": "Cut Cross-Entropy as cce with filter_eps=None: the exact gradient, as fastrlhf computes it",
    "full_logits": "the full-logits path as Hugging Face models and TRL run it: logits = hidden @ weight.T "
    "in the inputs' dtype (bf16), then token_logprobs_reference (float32 log_softmax + gather)",
    "bare_gemm": "the GEMMs the fused linear op cannot avoid, torch.matmul in the inputs' dtype: fwd = the "
    "logits GEMM; fwd+bwd = logits GEMM + recompute GEMM + dhidden GEMM + dweight GEMM",
}
FORWARD_ONLY = "forward only (runs under torch.no_grad)"
GRAD_FILTER_EPS = 2**-12  # Cut Cross-Entropy's filter_eps="high": bf16's eps / 32


class Unavailable(Exception):
    """The provider cannot run this case (not installed, unsupported mode...)."""


@dataclass
class Forward:
    """A provider's forward for one case: ``fn()`` returns a tensor or a tuple of tensors."""

    fn: Callable[[], Any]
    wrt: tuple[torch.Tensor, ...] = ()  # what the backward differentiates with respect to
    grad: torch.Tensor | None = None  # upstream gradient for every output
    ref_view: Callable[[torch.Tensor], torch.Tensor] | None = None  # reference rows this provider scores
    raw: bool = False  # fn already does all the work of the mode (bare GEMMs)
    note: str | None = None


def as_list(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def backward(f: Forward, outs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """torch.autograd.grad, not .backward(): nothing accumulates, so repeated calls do the same work."""
    assert f.grad is not None
    grads = [f.grad if f.grad.dtype == o.dtype else f.grad.to(o.dtype) for o in outs]
    return torch.autograd.grad(outs, f.wrt, grads)


def _raise_recompile_limits() -> None:
    """Every (shape, dtype, mode) of a reference is a recompile; past dynamo's default limit (8) it would
    silently run eager and the 'compile' numbers would be eager ones."""
    with contextlib.suppress(Exception):
        import torch._dynamo.config as dynamo_config

        for name, value in (
            ("cache_size_limit", 64),
            ("recompile_limit", 64),
            ("accumulated_cache_size_limit", 1024),
        ):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), value))


class Providers:
    """Builds each provider's forward, and the callable that is timed, for every op."""

    def __init__(self, peers: Peers, compile_backend: str) -> None:
        self.peers = peers
        self.compile_backend = compile_backend
        self.fns: dict[str, OpFns] = {op: resolve_op(op) for op in ALL_OPS}
        self._compiled: dict[str, Callable[..., Any]] = {}

    def problem(self, op: str) -> str | None:
        """Why the fastrlhf op cannot run at all, else None."""
        fns = self.fns[op]
        return None if fns.fn is not None else f"import failed: {fns.fn_error}"

    def reset_compiled(self) -> None:
        self._compiled.clear()
        with contextlib.suppress(Exception):
            torch._dynamo.reset()

    def runner(
        self, provider: str, case: Case, inp: dict[str, torch.Tensor]
    ) -> tuple[Callable[[], Any], Forward]:
        """What is timed for (provider, case): the forward, or the forward and its backward."""
        f = self.forward(provider, case, inp)
        if f.raw or case.mode == "fwd":
            return f.fn, f
        return lambda: backward(f, as_list(f.fn())), f

    def forward(self, provider: str, case: Case, inp: dict[str, torch.Tensor]) -> Forward:
        if case.op == "token_logprobs":
            return self._token_forward(provider, case, inp)
        if case.op == "linear_token_logprobs":
            return self._linear_forward(provider, case, inp)
        fn = self._op(case.op, provider)
        args, kwargs = rl_arguments(case.op, inp, case.opts.get("estimator"))
        if case.op == "ppo_advantages":  # a named tuple of tensors
            return Forward(lambda: tuple(fn(*args, **kwargs)))
        return Forward(lambda: fn(*args, **kwargs))

    def _reference(self, op: str) -> Callable[..., Any]:
        ref = self.fns[op].reference
        if ref is None:
            raise Unavailable(f"no reference: {self.fns[op].reference_error}")
        return ref

    def _op(self, op: str, provider: str) -> Callable[..., Any]:
        """fastrlhf's op or its reference, eager or compiled."""
        if provider == "fastrlhf":
            fn = self.fns[op].fn
            if fn is None:
                raise Unavailable(self.problem(op))
            return fn
        if provider == "eager":
            return self._reference(op)
        if provider == "compile":
            if not self._compiled:
                _raise_recompile_limits()
            if op not in self._compiled:
                self._compiled[op] = torch.compile(self._reference(op), backend=self.compile_backend)
            return self._compiled[op]
        raise Unavailable(f"no provider {provider!r} for {op}")

    def _peer(self, name: str) -> Callable[..., Any]:
        peer = self.peers.get(name)
        if peer.fn is None:
            raise Unavailable(peer.error or "unavailable")
        return peer.fn

    def _token_forward(self, provider: str, case: Case, inp: dict[str, torch.Tensor]) -> Forward:
        logits, ids, grad = inp["logits"], inp["ids"], inp["grad"]
        ent = bool(case.opts.get("entropy", False))
        differentiable = {"wrt": (logits,), "grad": grad}
        if provider in ("fastrlhf", "eager", "compile"):
            fn = self._op(case.op, provider)
            return Forward(lambda: fn(logits, ids, return_entropy=ent), **differentiable)
        if provider == "trl":
            trl = self._peer("trl")
            return Forward(lambda: trl(logits, ids, ent), **differentiable)
        if ent:
            raise Unavailable("no entropy output")
        if provider == "liger_selective":
            if case.mode != "fwd":
                raise Unavailable(FORWARD_ONLY)
            sel = self._peer("liger_selective")
            shifted = torch.cat([ids[:1], ids[:-1]])
            return Forward(lambda: sel(logits, shifted), ref_view=lambda t: t[:-1], note="N-1 rows")
        if provider == "liger_ce":
            ce = self._peer("liger_ce")
            note = (
                "gradient computed in the forward, in place into the logits" if case.mode != "fwd" else None
            )
            return Forward(lambda: ce(logits, ids), note=note, **differentiable)
        raise Unavailable(f"no provider {provider!r} for {case.op}")

    def _linear_forward(self, provider: str, case: Case, inp: dict[str, torch.Tensor]) -> Forward:
        hidden, weight, ids, grad = inp["hidden"], inp["weight"], inp["ids"], inp["grad"]
        differentiable = {"wrt": (hidden, weight), "grad": grad}
        temperature = float(case.opts.get("temperature", 1.0))
        ent = bool(case.opts.get("entropy", False))
        if provider in ("fastrlhf", "eager", "compile"):
            fn = self._op(case.op, provider)
            options = {"temperature": temperature, "return_entropy": ent}
            return Forward(lambda: fn(hidden, weight, ids, **options), **differentiable)
        if provider == "fastrlhf_filtered":
            if case.mode == "fwd":
                raise Unavailable("the filter acts in the backward only")
            fn = self._op(case.op, "fastrlhf")
            options = {"temperature": temperature, "return_entropy": ent, "grad_filter_eps": GRAD_FILTER_EPS}
            return Forward(lambda: fn(hidden, weight, ids, **options), **differentiable)
        if provider == "full_logits":
            ref = self._reference("token_logprobs")
            options = {"temperature": temperature, "return_entropy": ent}
            return Forward(lambda: ref(hidden @ weight.t(), ids, **options), **differentiable)
        if provider == "trl":
            trl = self._peer("trl_linear")
            return Forward(lambda: trl(hidden, weight, ids, temperature, ent), **differentiable)
        if provider in ("liger_flce", "cce", "cce_exact"):
            if ent:
                raise Unavailable("no entropy output")
            peer = self._peer(provider)
            if temperature == 1.0:
                return Forward(lambda: peer(hidden, weight, ids), **differentiable)
            # softmax(h @ W.T / T) = softmax((h / T) @ W.T): the peers take no temperature
            return Forward(lambda: peer(hidden / temperature, weight, ids), **differentiable)
        if provider == "bare_gemm":
            h, w = hidden.detach(), weight.detach()
            if case.mode == "fwd":
                return Forward(lambda: h @ w.t(), raw=True)
            # the logits gradient is an input here, so it is not counted as extra memory
            g = torch.randn((h.shape[0], w.shape[0]), device=h.device, dtype=h.dtype)
            inp["_dlogits"] = g

            def four_gemms() -> tuple[torch.Tensor, ...]:
                logits = h @ w.t()  # forward
                logits = h @ w.t()  # recompute in the backward
                return logits, g @ w, g.t() @ h  # dhidden, dweight

            return Forward(four_gemms, raw=True)
        raise Unavailable(f"no provider {provider!r} for {case.op}")
