"""The peers fastrlhf is compared with (TRL's, Liger-Kernel's and Cut Cross-Entropy's fused kernels), found
at run time.

Each peer is imported once, lazily, and its outcome (source, version, why it is unavailable) is recorded.
Each loader returns a function with the calling convention the providers expect.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .timing import describe

TRL_CHUNK_SIZE = 32768  # TRL's own default, used when its trainer module does not say


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except Exception:
        return None


class NotInstalled(ImportError):
    """None of a peer's candidate import paths worked (its text says which and why)."""


@dataclass
class Peer:
    fn: Callable[..., Any] | None = None
    error: str | None = None
    note: str | None = None
    source: str | None = None


def _import_first(dist: str, candidates: Sequence[tuple[str, str]]) -> tuple[Any, str]:
    """The first importable ``module.attr`` of the candidates and its name."""
    errors = []
    for module, attr in candidates:
        try:
            return getattr(importlib.import_module(module), attr), f"{module}.{attr}"
        except Exception as e:
            errors.append(f"{module}.{attr}: {describe(e, 200)}")
    version = dist_version(dist)
    raise NotInstalled(f"{dist} {version or 'not installed'}: {'; '.join(errors)}")


def _load_trl() -> Peer:
    fn, source = _import_first(
        "trl",
        [
            ("trl.kernels", "selective_log_softmax_and_entropy"),
            ("trl.kernels.logprob_entropy", "selective_log_softmax_and_entropy"),
        ],
    )

    def run(logits: torch.Tensor, ids: torch.Tensor, entropy: bool) -> Any:
        logp, ent = fn(logits, ids, temperature=1.0)
        return (logp, ent) if entropy else logp

    return Peer(run, source=source, note=f"trl {dist_version('trl')}; computes entropy on every call")


def _stub_trl_trainer_utils() -> str | None:
    """TRL's ChunkedLogProbFunction.backward imports ``trl.trainer.utils`` (for a DeepSpeed ZeRO-3 gather),
    which pulls in ``datasets`` and more. Where that import fails, stand in a module whose
    ``maybe_gather_lm_head_ctx`` is a null context: exactly what it is without ZeRO-3 (one GPU)."""
    try:
        importlib.import_module("trl.trainer.utils")
        return None
    except Exception as e:
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()  # type: ignore[attr-defined]
        sys.modules["trl.trainer.utils"] = stub
        return (
            f"trl.trainer.utils not importable ({describe(e, 160)}); its maybe_gather_lm_head_ctx was "
            "replaced by a null context, which is what it is without DeepSpeed ZeRO-3"
        )


def _trl_slot(name: str, position: int) -> str | None:
    """Which value a parameter of TRL's ChunkedLogProbFunction.forward takes (its names vary by version)."""
    n = name.lower()
    if "weight" in n:
        return "weight"
    if position == 0 or "hidden" in n or n in ("input", "x"):
        return "hidden"
    if "bias" in n or "softcap" in n:
        return "none"
    if any(s in n for s in ("target", "label", "index", "ids")):
        return "ids"
    if "temp" in n:
        return "temperature"
    if "scale" in n:
        return "one"
    if "chunk" in n:
        return "chunk"
    if n == "outputs":
        return "outputs"
    return None


def _load_trl_linear() -> Peer:
    cls, source = _import_first(
        "trl",
        [
            ("trl.kernels", "ChunkedLogProbFunction"),
            ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction"),
            ("trl.trainer.utils", "_ChunkedLogProbFunction"),
        ],
    )
    notes = [f"trl {dist_version('trl')}"]
    stub_note = _stub_trl_trainer_utils()
    if stub_note:
        notes.append(stub_note)
    chunk = TRL_CHUNK_SIZE
    with contextlib.suppress(Exception):
        chunk = int(importlib.import_module("trl.trainer.utils")._CHUNKED_LOGPROB_CHUNK_SIZE)
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop ctx
    notes.append(f"apply({', '.join(p.name for p in params)}), chunk_size={chunk}")
    slots: list[str] = []  # what to pass for each leading parameter; the rest keep their defaults
    for i, p in enumerate(params):
        slot = _trl_slot(p.name, i)
        if slot is None:
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"unsupported ChunkedLogProbFunction signature: {notes[-1]}")
            break
        slots.append(slot)

    def run(
        hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, temperature: float, entropy: bool
    ) -> Any:
        if entropy and "outputs" not in slots:
            raise ValueError("this TRL version's ChunkedLogProbFunction has no entropy output")
        values = {"hidden": hidden, "weight": weight, "ids": ids, "none": None, "one": 1.0}
        values.update(chunk=chunk, temperature=temperature, outputs=("entropy",) if entropy else ())
        out = cls.apply(*[values[s] for s in slots])
        if not isinstance(out, (tuple, list)):
            return out
        return (out[0], out[1]) if entropy else out[0]

    return Peer(run, source=source, note="; ".join(notes))


def _load_liger_selective() -> Peer:
    fn, source = _import_first(
        "liger-kernel", [("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax")]
    )

    def run(logits: torch.Tensor, shifted_ids: torch.Tensor) -> torch.Tensor:
        # [1, N, V] -> log-probs of rows 0..N-2 with ids shifted_ids[1:] (= ids[:-1]).
        return fn(logits.unsqueeze(0), shifted_ids.unsqueeze(0), temperature=1.0).squeeze(0)

    return Peer(run, source=source, note=f"liger-kernel {dist_version('liger-kernel')}")


def _load_liger_ce() -> Peer:
    fn, source = _import_first(
        "liger-kernel", [("liger_kernel.transformers.functional", "liger_cross_entropy")]
    )

    def run(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return -fn(logits, ids, reduction="none")

    return Peer(run, source=source, note=f"liger-kernel {dist_version('liger-kernel')}")


def _load_liger_flce() -> Peer:
    fn, source = _import_first(
        "liger-kernel", [("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy")]
    )

    def run(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return -fn(hidden, weight, ids, reduction="none")

    return Peer(run, source=source, note=f"liger-kernel {dist_version('liger-kernel')}")


def _load_cce(filter_eps: str | None) -> Peer:
    """Apple's Cut Cross-Entropy: ``linear_cross_entropy(e, c, targets, reduction="none", filter_eps=...)``
    is the per-token cross-entropy of ``e @ c.T`` (never written to memory), i.e. minus the token log-prob.
    ``filter_eps="high"`` is its default (skips vocabulary blocks whose softmax is below bf16 eps / 32 in the
    backward); ``None`` computes the exact gradient, as fastrlhf does."""
    fn, source = _import_first("cut-cross-entropy", [("cut_cross_entropy", "linear_cross_entropy")])

    def run(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return -fn(hidden, weight, ids, reduction="none", filter_eps=filter_eps)

    version = dist_version("cut-cross-entropy")
    return Peer(run, source=source, note=f"cut-cross-entropy {version}; filter_eps={filter_eps!r}")


LOADERS: dict[str, Callable[[], Peer]] = {
    "trl": _load_trl,
    "trl_linear": _load_trl_linear,
    "liger_selective": _load_liger_selective,
    "liger_ce": _load_liger_ce,
    "liger_flce": _load_liger_flce,
    "cce": lambda: _load_cce("high"),
    "cce_exact": lambda: _load_cce(None),
}


class Peers:
    """Lazily imported peers; each import is attempted once and its outcome passed to ``on_load``."""

    def __init__(self, on_load: Callable[[str, dict[str, Any]], None]) -> None:
        self._cache: dict[str, Peer] = {}
        self._on_load = on_load

    def get(self, name: str) -> Peer:
        if name not in self._cache:
            try:
                peer = LOADERS[name]()
            except NotInstalled as e:
                peer = Peer(error=str(e))
            except Exception as e:
                peer = Peer(error=describe(e))
            self._cache[name] = peer
            info = {"available": peer.fn is not None, "source": peer.source, "error": peer.error}
            self._on_load(name, {**info, "note": peer.note})
        return self._cache[name]
