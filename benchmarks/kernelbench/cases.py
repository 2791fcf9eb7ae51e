"""What is measured: the cases (op, mode, shape, dtype), their tiny dry-run versions, the correctness-check
shapes and tolerances, and the byte/FLOP models behind the GB/s and TFLOP/s columns."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
RL_OPS = ("gae", "kl_penalty", "masked_whiten", "shape_rewards", "ppo_advantages")
ALL_OPS = ("token_logprobs", "linear_token_logprobs", *RL_OPS)


def label(shape: dict[str, Any], params: dict[str, Any]) -> str:
    """'N=4096 V=32000 entropy=True': a case's shape and parameters as the logs and the markdown show them."""
    return " ".join([f"{k}={v}" for k, v in shape.items()] + [f"{k}={v}" for k, v in params.items()])


@dataclass(frozen=True)
class Case:
    op: str
    mode: str  # "fwd" | "fwd+bwd"
    shape: tuple[tuple[str, int], ...]
    dtype: str  # "bf16" | "fp32"
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.shape)

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def size(self) -> int:
        return math.prod(self.dims.values())

    @property
    def key(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.shape)
        params = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.op}|{self.mode}|{shape}|{self.dtype}|{params}"

    def with_mode(self, mode: str) -> Case:
        return Case(self.op, mode, self.shape, self.dtype, self.params)


def _tlp(n: int, v: int, dtype: str, mode: str, **params: Any) -> Case:
    return Case("token_logprobs", mode, (("N", n), ("V", v)), dtype, tuple(sorted(params.items())))


def _lin(n: int, h: int, v: int, mode: str, **params: Any) -> Case:
    shape = (("N", n), ("H", h), ("V", v))
    return Case("linear_token_logprobs", mode, shape, "bf16", tuple(sorted(params.items())))


def _rl(op: str, b: int, t: int, **params: Any) -> Case:
    return Case(op, "fwd", (("B", b), ("T", t)), "fp32", tuple(sorted(params.items())))


def full_cases() -> dict[str, list[Case]]:
    """The default run, most important cases first (a run that hits its time budget drops the tail)."""
    tlp_bf16 = [
        (4096, 32000),
        (4096, 151936),
        (16384, 128256),
        (16384, 151936),
        (32768, 32000),
        (32768, 151936),
    ]
    tlp_fp32 = [(4096, 32000), (16384, 151936)]
    token = [
        _tlp(n, v, dtype, mode)
        for shapes, dtype in ((tlp_bf16, "bf16"), (tlp_fp32, "fp32"))
        for mode in ("fwd+bwd", "fwd")
        for n, v in shapes
    ]
    token += [_tlp(16384, 151936, "bf16", m, entropy=True) for m in ("fwd+bwd", "fwd")]
    lin_shapes = [(8192, 896, 151936), (8192, 2048, 151936), (8192, 4096, 128256)]
    linear = [_lin(*s, mode) for mode in ("fwd+bwd", "fwd") for s in lin_shapes]
    linear += [_lin(8192, 896, 151936, m, entropy=True) for m in ("fwd+bwd", "fwd")]
    gae_shapes = [(512, 2048), (64, 512), (256, 1024)]
    return {
        "token_logprobs": token,
        "linear_token_logprobs": linear,
        "gae": [_rl("gae", b, t) for b, t in gae_shapes],
        "kl_penalty": [_rl("kl_penalty", 512, 2048, estimator=e) for e in ("k1", "k2", "k3")],
        "masked_whiten": [_rl("masked_whiten", 512, 2048)],
        "shape_rewards": [_rl("shape_rewards", 512, 2048, estimator="k1")],
        "ppo_advantages": [_rl("ppo_advantages", b, t, estimator="k1") for b, t in gae_shapes],
    }


def quick_cases() -> dict[str, list[Case]]:
    """The GPU suite's subset (``--quick``): every op at the shapes its targets name, most important first
    (a run that hits its time budget drops the tail)."""
    return {
        "token_logprobs": [
            _tlp(16384, 151936, "bf16", "fwd+bwd"),
            _tlp(4096, 32000, "bf16", "fwd+bwd"),
            _tlp(16384, 151936, "bf16", "fwd+bwd", entropy=True),
            _tlp(4096, 32000, "fp32", "fwd+bwd"),
            _tlp(16384, 151936, "bf16", "fwd"),
        ],
        "linear_token_logprobs": [
            _lin(8192, 896, 151936, "fwd+bwd"),
            _lin(8192, 4096, 128256, "fwd+bwd"),
            _lin(8192, 896, 151936, "fwd+bwd", entropy=True),
            _lin(8192, 896, 151936, "fwd"),
        ],
        "gae": [_rl("gae", 512, 2048), _rl("gae", 64, 512)],
        "kl_penalty": [_rl("kl_penalty", 512, 2048, estimator="k3")],
        "masked_whiten": [_rl("masked_whiten", 512, 2048)],
        "shape_rewards": [_rl("shape_rewards", 512, 2048, estimator="k1")],
        "ppo_advantages": [_rl("ppo_advantages", 512, 2048, estimator="k1")],
    }


def tiny(case: Case) -> Case:
    """The dry-run version of a case: same structure, sizes small enough for a CPU (distinct per case)."""
    d = case.dims
    if case.op == "token_logprobs":
        shape = (("N", max(4, d["N"] // 512)), ("V", max(17, d["V"] // 256)))
    elif case.op == "linear_token_logprobs":
        shape = (("N", max(4, d["N"] // 512)), ("H", max(8, d["H"] // 64)), ("V", max(17, d["V"] // 256)))
    else:
        shape = (("B", max(2, d["B"] // 16)), ("T", max(4, d["T"] // 64)))
    return Case(case.op, case.mode, shape, case.dtype, case.params)


def case_order() -> dict[str, int]:
    """Report order of every case key (full, quick and their tiny versions): the order they are defined in."""
    order: dict[str, int] = {}
    for cases in (full_cases(), quick_cases()):
        for case in (c for op_cases in cases.values() for c in op_cases):
            order.setdefault(case.key, len(order))
            order.setdefault(tiny(case).key, len(order))
    return order


# ------------------------------------------------------------------------------------------ correctness


def check_cases(op: str, dry: bool) -> list[Case]:
    """Moderate shapes for the correctness check that runs before an op is timed."""
    if op == "token_logprobs":
        n, v = (8, 301) if dry else (2048, 32000)
        return [_tlp(n, v, dtype, "fwd+bwd", **ent) for ent in ({"entropy": True}, {}) for dtype in DTYPES]
    if op == "linear_token_logprobs":  # a temperature checks the peers' folding of it into the hidden states
        shape = (8, 16, 301) if dry else (1024, 896, 32000)
        return [_lin(*shape, "fwd+bwd", temperature=0.7), _lin(*shape, "fwd+bwd", entropy=True)]
    b, t = (3, 37) if dry else (64, 512)
    if op == "kl_penalty":
        return [_rl(op, b, t, estimator=e) for e in ("k1", "k2", "k3")]
    if op in ("shape_rewards", "ppo_advantages"):
        return [_rl(op, b, t, estimator="k3")]
    return [_rl(op, b, t)]


def tolerance(case: Case) -> dict[str, float]:
    """rel-L2 tolerances of the correctness check (against a float64 reference)."""
    if case.op == "token_logprobs":
        return {"out": 1e-5, "grad": 1e-5} if case.dtype == "fp32" else {"out": 1e-4, "grad": 1e-2}
    if case.op == "linear_token_logprobs":
        return {"out": 2e-2, "grad": 5e-2}
    return {"out": 1e-5, "grad": 1e-5}


# ------------------------------------------------------------------------------------ byte/FLOP models

# Bytes per [B, T] element that the RL ops must read and write (fp32 tensors, bool masks of 1 byte).
RL_BYTES_PER_TOKEN = {
    "kl_penalty": 12,
    "gae": 17,
    "masked_whiten": 9,
    "shape_rewards": 13,
    "ppo_advantages": 29,
}

BYTE_MODELS: dict[str, str] = {
    "token_logprobs": (
        "fwd: read logits N*V*s + ids N*8, write logp N*4 (+ entropy N*4); "
        "fwd+bwd: fwd + read logits again N*V*s + read grad N*4 + write dlogits N*V*s "
        "(= 3*N*V*s dominant; s = logits dtype size)"
    ),
    "linear_token_logprobs": (
        "GEMM-bound: bytes not modelled. FLOPs: fwd 2*N*H*V (logits GEMM); fwd+bwd 8*N*H*V "
        "(forward GEMM + recompute GEMM + dhidden GEMM + dweight GEMM), the same count for every provider "
        "so TFLOP/s ranks like time"
    ),
    "kl_penalty": "read logp, ref_logp (fp32), write kl (fp32): 12*B*T",
    "gae": "read rewards, values (fp32) and mask (bool, 1 B), write advantages, returns (fp32): 17*B*T",
    "masked_whiten": "read x (fp32) and mask (1 B) once, write out (fp32) once: 9*B*T",
    "shape_rewards": "read logp, ref_logp (fp32), mask (1 B), scores B*4, write rewards (fp32): 13*B*T + 4*B",
    "ppo_advantages": (
        "read logp, ref_logp, values (fp32), mask (1 B), scores B*4, write advantages, returns, rewards, kl "
        "(fp32): 29*B*T + 4*B"
    ),
}


def bytes_moved(case: Case) -> int | None:
    """The fewest bytes the case must move through device memory (None: GEMM-bound, see flops)."""
    d = case.dims
    if case.op == "token_logprobs":
        n, logits = d["N"], d["N"] * d["V"] * DTYPES[case.dtype].itemsize
        fwd = logits + n * 8 + n * 4 + (n * 4 if case.opts.get("entropy") else 0)
        return fwd if case.mode == "fwd" else fwd + logits + n * 4 + logits
    if case.op == "linear_token_logprobs":
        return None
    scores = 4 * d["B"] if case.op in ("shape_rewards", "ppo_advantages") else 0
    return RL_BYTES_PER_TOKEN[case.op] * d["B"] * d["T"] + scores


def flops(case: Case) -> int | None:
    if case.op != "linear_token_logprobs":
        return None
    d = case.dims
    return (2 if case.mode == "fwd" else 8) * d["N"] * d["H"] * d["V"]


def output_bytes(case: Case) -> int | None:
    """Bytes of the outputs every method must return (excluded from 'extra memory excl. outputs')."""
    d = case.dims
    elem = DTYPES[case.dtype].itemsize
    if case.op == "token_logprobs":
        out = d["N"] * 4 * (2 if case.opts.get("entropy") else 1)
        return out + (d["N"] * d["V"] * elem if case.mode == "fwd+bwd" else 0)
    if case.op == "linear_token_logprobs":
        out = d["N"] * 4
        return out + ((d["N"] + d["V"]) * d["H"] * elem if case.mode == "fwd+bwd" else 0)
    return None
