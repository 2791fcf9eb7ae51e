"""Per-token log-probabilities (and entropies) from the last hidden states and the output layer, chunked.

``logits = hidden @ weight.T (+ bias)`` is never materialized for all N tokens: the forward walks token
chunks, computes each chunk's logits in fp32, runs the ``token_logprobs`` machinery on them and keeps only 2-3
floats per token. The backward recomputes each chunk's logits, forms d(loss)/d(logits) for the chunk and
feeds it straight into the hidden/weight/bias GEMMs. Peak extra memory is O(chunk_size x V).

Why fp32 logits matter: a bf16 GEMM *output* rounds every logit to 8 bits of mantissa (an absolute error of
|logit| * 2^-9), which after the softmax is a 4-23% gradient error. Here the logits GEMM always accumulates
and *outputs* fp32: on CUDA with torch >= 2.8 via ``torch.mm(..., out_dtype=torch.float32)`` on the bf16/fp16
operands (tensor-core speed, no weight copy); elsewhere (CPU, older torch) the operands are upcast to fp32,
the weight once per pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ._backend import check_float, check_same_device, check_temperature, use_triton
from .token_logprobs import (
    _backward,
    _forward,
    check_ids,
    token_logprobs_reference,
)

# The default chunk keeps one chunk's fp32 logits at or under this many bytes.
_CHUNK_LOGITS_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class _Config:
    inv_temp: float
    with_entropy: bool
    chunk: int
    triton: bool


@functools.cache
def _fp32_out_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.mm turns `dtype` operands into an fp32 result on this device (CUDA, torch >= 2.8)."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def _fp32_accumulate_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether addmm adds `dtype` products into an fp32 tensor in place (newer torch; checked by value)."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _gemm_dtype(weight: torch.Tensor) -> torch.dtype:
    """dtype the GEMM operands run in: the weight's own when fp32 results are native, else float32."""
    if weight.dtype == torch.float32 or _fp32_out_supported(weight.device.type, weight.dtype):
        return weight.dtype
    return torch.float32


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (operands share a dtype that _gemm_dtype chose)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    return torch.mm(a, b, out_dtype=torch.float32)


def _addmm32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32; in place when the GEMM can write fp32 itself."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _fp32_accumulate_supported(a.device.type, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += _mm32(a, b)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = _mm32(h, w.t())
    if bias is not None:
        logits += bias
    return logits


def default_chunk_size(vocab_size: int) -> int:
    """Largest power of two whose [chunk, V] fp32 logits fit in 256 MiB (256 at V=152k, 2048 at V=32k)."""
    rows = max(1, _CHUNK_LOGITS_BYTES // (4 * vocab_size))
    return 1 << (rows.bit_length() - 1)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, cfg: _Config):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        ids1 = ids.reshape(-1).to(torch.int64).contiguous()
        N = ids1.numel()
        gemm_dtype = _gemm_dtype(weight)
        w = weight.to(gemm_dtype)
        dev = hidden.device
        logp = torch.empty(N, dtype=torch.float32, device=dev)
        ent = torch.empty(N, dtype=torch.float32, device=dev) if cfg.with_entropy else None
        stats = torch.empty(3 if cfg.with_entropy else 2, N, dtype=torch.float32, device=dev)
        for r0 in range(0, N, cfg.chunk):
            r1 = min(N, r0 + cfg.chunk)
            logits = _chunk_logits(h2[r0:r1].to(gemm_dtype), w, bias)
            lp, en, st = _forward(logits[None], ids1[r0:r1], cfg.inv_temp, cfg.with_entropy, cfg.triton)
            logp[r0:r1], stats[:, r0:r1] = lp, st
            if cfg.with_entropy:
                ent[r0:r1] = en
        ctx.save_for_backward(hidden, weight, bias, ids1, stats)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        if cfg.with_entropy:
            return logp.view(ids.shape), ent.view(ids.shape)
        return logp.view(ids.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None = None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (g_lp is None and g_ent is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None
        hidden, weight, bias, ids1, stats = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        H, (V, _), N = hidden.shape[-1], weight.shape, ids1.numel()
        dev = hidden.device
        h2 = hidden.reshape(-1, H)
        g_lp = torch.zeros(N, device=dev) if g_lp is None else g_lp.reshape(N).float().contiguous()
        g_ent = None if g_ent is None else g_ent.reshape(N).float().contiguous()
        gemm_dtype = _gemm_dtype(weight)
        w = weight.to(gemm_dtype)
        grad_h = torch.empty_like(h2) if need_h else None
        # Summed over chunks in fp32: a low-precision running sum would round once per chunk.
        acc_w = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_w else None
        acc_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
        for r0 in range(0, N, cfg.chunk):
            r1 = min(N, r0 + cfg.chunk)
            h = h2[r0:r1].to(gemm_dtype)
            logits = _chunk_logits(h, w, bias)
            # d(loss)/d(logits) goes straight into GEMMs that take operands of one dtype, so write it in that
            # dtype: in place over the fp32 logits, or (bf16/fp16 weights) into a half-size buffer. That
            # rounding is relative per element, not the |logit|-scaled error of bf16 logits.
            g = logits if gemm_dtype == torch.float32 else torch.empty_like(logits, dtype=gemm_dtype)
            ge = None if g_ent is None else g_ent[r0:r1]
            _backward(
                logits[None], ids1[r0:r1], stats[:, r0:r1].contiguous(), g_lp[r0:r1], ge,
                cfg.inv_temp, g[None], cfg.triton,
            )  # fmt: skip
            if need_h:
                grad_h[r0:r1] = _mm32(g, w)
            if need_w:
                _addmm32_(acc_w, g.t(), h)
            if need_b:
                acc_b += g.sum(0, dtype=torch.float32)
        return (
            grad_h.view(hidden.shape) if need_h else None,
            acc_w.to(weight.dtype) if need_w else None,
            acc_b.to(bias.dtype) if need_b else None,
            None,
            None,
        )


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(hidden @ weight.T + bias, ids)`` without ever holding the [N, V] logits.

    Args:
        hidden: ``[..., H]`` last hidden states, float32, bfloat16 or float16.
        weight: ``[V, H]`` output-layer (lm_head) weight, same dtype as ``hidden``.
        ids: integer tensor of shape ``hidden.shape[:-1]``.
        bias: optional ``[V]`` float bias.
        temperature: > 0; logits are divided by it before the softmax (reaches the kernel as fp32
            1/temperature).
        return_entropy: also return the per-position entropy of ``softmax(logits / temperature)``.
        chunk_size: tokens per chunk. Default: the largest power of two whose fp32 ``[chunk, V]`` logits take
            at most 256 MiB (see ``default_chunk_size``), capped at N.

    Returns:
        ``logp`` (float32, shape of ``ids``), or ``(logp, entropy)``. Differentiable w.r.t. ``hidden``,
        ``weight`` and ``bias``; gradients come back in their dtypes.

    Precision: each chunk's logits are accumulated and kept in fp32 up to the softmax (see the module
    docstring for how). Weight and bias gradients are summed over chunks in an fp32 buffer (V x H x 4 bytes).
    With bf16/fp16 weights the per-chunk d(loss)/d(logits) feeding the backward GEMMs is rounded to that
    dtype (a relative, per-element rounding, as in any bf16 backward).
    fp32 weights follow torch's TF32 setting (``torch.backends.cuda.matmul.allow_tf32``).

    Memory: peak extra is one chunk's fp32 logits (+ a half-size gradient buffer for bf16/fp16 weights in the
    backward); between forward and backward only 2-3 floats per token are kept. The forward runs one GEMM per
    chunk, the backward three (recomputed logits, hidden gradient, weight gradient).

    Out-of-range ids behave as in ``token_logprobs``: NaN logp, no gradient from that logp.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() == 0:
        raise ValueError("hidden must have shape [..., H]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= 1, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_ids(ids, hidden.shape[:-1], "hidden")
    check_same_device(hidden=hidden, weight=weight, ids=ids, bias=bias)
    temperature = check_temperature(temperature)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chunk = max(1, min(chunk_size, ids.numel()))
    tensors = (hidden, weight, ids) if bias is None else (hidden, weight, ids, bias)
    cfg = _Config(1.0 / temperature, bool(return_entropy), chunk, use_triton(*tensors))
    return _LinearTokenLogprobs.apply(hidden, weight, bias, ids, cfg)


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Executable spec: full logits in float32 (float64 for float64 input), then token_logprobs_reference."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_logprobs_reference(logits, ids, temperature=temperature, return_entropy=return_entropy)
