"""Checking at load time that fastrlhf reads a model the way the model's own forward does (``verify``).

fastrlhf never calls a causal LM's forward for log-probs: it runs the trunk and multiplies its last hidden
states with the output-layer weight in a fused kernel, applying the logit processing it knows about
(``models.logit_processing``). That is right only if nothing else happens between the trunk and the logits,
so each loaded model is checked on one small batch of the tokenizer's own tokens (4 rows x 12 tokens: plain,
left-padded, right-padded, and with its last two tokens changed):

1. trunk: the model's own output layer on fastrlhf's hidden states = the model's own forward.
2. output layer: the fused kernel = the model's own output layer on the same hidden states. If not, the model
   is switched to ``architectures.model_head_logprobs`` (its own output layer, [chunk, V] at a time) and a
   line says so.
3. padding: a left- or right-padded row = the same tokens unpadded.
4. causality: the log-prob of token t does not depend on the tokens after t.

5. training mode: the same outputs as evaluation mode (no dropout, layer drop or router noise left on).

A reward model or critic is checked the same way on its scores. A failed 1, 3, 4 or 5 raises
:class:`UnsupportedModel`; in half precision 3-5 only warn (other shapes run other kernels). Tolerances are
relative to the precision and the largest logit: 64 fp32 roundings in float32; in bf16/fp16, 4 roundings of
the model's own logits (their error bound) for 1 and 2, and a loose 0.1 + 16 roundings for 3-5.
``ModelConfig.verify_fast_path=false`` skips the check.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fastrlhf.architectures import LOGITS_PATH, has_scalar_head_added, model_head_logprobs, trunk_of
from fastrlhf.models import (
    head_scores,
    hidden_states,
    position_ids,
    response_logprobs,
    scalar_head,
    sequence_scores,
    takes_position_ids,
    unwrap,
)

log = logging.getLogger("fastrlhf")

TOKENS, PADS = 12, 3
PROBE_TEXT = (
    "fastrlhf reads log-probs from the hidden states of the trunk and the output layer, so it checks them "
    "against the model's own forward: the quick brown fox jumps over the lazy dog, 1 2 3."
)


class UnsupportedModel(ValueError):
    """The model's own forward does something fastrlhf cannot reproduce (the message says what)."""


@dataclass
class Probe:
    """The check's batch: rows 0 plain, 1 left-padded, 2 with its last two tokens changed, 3 right-padded."""

    input_ids: torch.Tensor  # [4, TOKENS]
    attention_mask: torch.Tensor


def probe_batch(tokens: list[int], pad_id: int, device: torch.device) -> Probe:
    """The 4-row batch from ``TOKENS + 2`` distinct-enough token ids (pad excluded)."""
    x, alt = tokens[:TOKENS], tokens[TOKENS : TOKENS + 2]
    rows = [x, [pad_id] * PADS + x[: TOKENS - PADS], x[:-2] + alt, x[: TOKENS - PADS] + [pad_id] * PADS]
    mask = [
        [1] * TOKENS,
        [0] * PADS + [1] * (TOKENS - PADS),
        [1] * TOKENS,
        [1] * (TOKENS - PADS) + [0] * PADS,
    ]
    return Probe(torch.tensor(rows, device=device), torch.tensor(mask, device=device))


def probe_tokens(tokenizer, n_vocab: int, pad_id: int | None) -> list[int]:
    """``TOKENS + 2`` ids: real text under the tokenizer, else (no tokenizer, or one that makes the text
    mostly unknown tokens) seeded random ids. The last two differ from the two they replace in row 2."""
    special = set(getattr(tokenizer, "all_special_ids", None) or []) | {pad_id}
    ids: list[int] = []
    if tokenizer is not None:
        ids = [i for i in tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"] if i not in special]
        ids = [i for i in ids if 0 <= i < n_vocab][: TOKENS + 2]
    if len(set(ids)) < TOKENS // 2 or len(ids) < TOKENS + 2:
        allowed = [i for i in range(n_vocab) if i not in special] or list(range(n_vocab))
        g = torch.Generator().manual_seed(0)
        ids = [allowed[i] for i in torch.randint(len(allowed), (TOKENS + 2,), generator=g).tolist()]
        for j in (TOKENS, TOKENS + 1):
            if ids[j] == ids[j - 2] and len(allowed) > 1:
                ids[j] = allowed[(allowed.index(ids[j]) + 1) % len(allowed)]
    return ids


def _rounding(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def tolerance(dtype: torch.dtype, scale: float, *, across_shapes: bool = False) -> float:
    """Allowed |difference| of log-probs (or scores) with logits up to ``scale``, for weights of ``dtype``."""
    if dtype == torch.float32 or dtype == torch.float64:
        return 64 * _rounding(torch.float32) * (1.0 + scale)
    if across_shapes:
        return 0.1 + 16 * _rounding(dtype) * (1.0 + scale)
    return 4 * _rounding(dtype) * (1.0 + scale)


def _own_forward(model: nn.Module, probe: Probe):
    kwargs = {"position_ids": position_ids(probe.attention_mask)} if takes_position_ids(model) else {}
    return model(input_ids=probe.input_ids, attention_mask=probe.attention_mask, use_cache=False, **kwargs)


def _valid(probe: Probe) -> torch.Tensor:
    """[4, T-1]: the log-prob of target t + 1 is defined (it and its context's last token are real)."""
    mask = probe.attention_mask.bool()
    return mask[:, 1:] & mask[:, :-1]


def _max_diff(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    d = (a.double() - b.double()).abs()
    d = d[where] if where is not None else d.flatten()
    return float(d.max()) if d.numel() else 0.0


def _name(model: nn.Module) -> str:
    base = unwrap(model)
    return f"{type(base).__name__} ({base.config.model_type})"


def consistency(values: torch.Tensor) -> dict[str, float]:
    """Per-position values [4, T'] (log-probs of targets 1.. or per-position scores) of the probe's rows: the
    largest difference of the padded rows and of the changed row's prefix from row 0."""
    n = values.shape[1]
    keep = n - PADS
    return {
        "left-padded": _max_diff(values[1, PADS:], values[0, :keep]),
        "right-padded": _max_diff(values[3, :keep], values[0, :keep]),
        "causality": _max_diff(values[2, : n - 2], values[0, : n - 2]),
    }


SKIP_HINT = "; model_config.verify_fast_path=false skips this check"


def _check_consistency(
    model: nn.Module, values: torch.Tensor, trained: torch.Tensor, dtype: torch.dtype, scale: float
) -> None:
    """``values`` from the eval-mode pass, ``trained`` in training mode (both zero where undefined)."""
    tol = tolerance(dtype, scale, across_shapes=True)
    checks = {**consistency(values), "training mode": _max_diff(trained, values)}
    reasons = []
    for what, err in checks.items():
        if err <= tol:
            continue
        if what == "causality":
            reasons.append(
                f"the output at token t depends on later tokens (by {err:.3g}): it is not a causal model"
            )
        elif what == "training mode":
            reasons.append(
                f"its outputs in training mode differ from evaluation mode by {err:.3g}: something random "
                "(dropout, layer drop, router noise) that fastrlhf did not turn off"
            )
        elif takes_position_ids(unwrap(model)):
            reasons.append(
                f"a {what} row differs from the same tokens unpadded by {err:.3g}: it ignores the mask"
            )
        else:
            reasons.append(
                f"a {what} row differs from the same tokens unpadded by {err:.3g}: its forward takes no "
                "position_ids, so padding shifts its positions (or it ignores the attention mask)"
            )
    if not reasons:
        return
    message = f"{_name(model)}: {'; also '.join(reasons)} (tolerance {tol:.2g})"
    if dtype in (torch.float32, torch.float64):
        raise UnsupportedModel(message + SKIP_HINT)
    log.warning("%s; in %s this may be rounding", message, dtype)


@torch.no_grad()
def verify(model: nn.Module, tokenizer=None) -> str:
    """Check ``model`` (a causal LM, reward model or critic) against its own forward; returns its log-prob
    path ("fused" or "model", set on the model) or "scores". Raises :class:`UnsupportedModel`."""
    base = unwrap(model)
    was_training = base.training
    device = base.get_input_embeddings().weight.device
    # The check leaves the random state as it found it (training-mode forwards may draw random numbers even
    # with dropout at 0), so loading with or without it gives the same run.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        base.eval()
        try:
            if base.get_output_embeddings() is not None and not has_scalar_head_added(base):
                return verify_causal_lm(base, tokenizer)
            verify_scalar_model(base, tokenizer)
            return "scores"
        finally:
            base.train(was_training)


def _probe_for(model: nn.Module, tokenizer, n_vocab: int) -> Probe:
    pad = model.config.pad_token_id
    pad = pad if isinstance(pad, int) and 0 <= pad < n_vocab else 0
    device = model.get_input_embeddings().weight.device
    return probe_batch(probe_tokens(tokenizer, n_vocab, pad), pad, device)


def verify_causal_lm(model: nn.Module, tokenizer=None) -> str:
    weight = getattr(model.get_output_embeddings(), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UnsupportedModel(
            f"{_name(model)}: its output layer ({type(model.get_output_embeddings()).__name__}) is not one "
            "linear map from the last hidden state to the vocabulary"
        )
    probe = _probe_for(model, tokenizer, min(weight.shape[0], model.get_input_embeddings().num_embeddings))
    dtype, valid = weight.dtype, _valid(probe)
    logits = _own_forward(model, probe).logits.float()
    scale = float(logits[:, :-1][valid].abs().max())
    ids = probe.input_ids
    own = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    hidden = hidden_states(model, ids, probe.attention_mask)
    tol = tolerance(dtype, scale)
    try:
        through_head = model_head_logprobs(model, hidden[:, :-1], ids[:, 1:])
        err = _max_diff(through_head, own, valid)
    except Exception as e:  # its forward needs more from its trunk than the last hidden states
        err, through_head = f"{type(e).__name__}: {e}", None
    if isinstance(err, str) or err > tol:
        err = err if isinstance(err, str) else f"log-probs differ by {err:.3g}, tolerance {tol:.2g}"
        raise UnsupportedModel(
            f"{_name(model)}: its output layer does not read the last hidden states of "
            f"{type(trunk_of(model)).__name__} the way its own forward does ({err})" + SKIP_HINT
        )
    setattr(model, LOGITS_PATH, "fused")
    try:
        fused = response_logprobs(model, ids, probe.attention_mask, 1, hidden=hidden)
        err, why = _max_diff(fused, through_head, valid), ""
    except Exception as e:  # the fused kernel cannot take this model's output layer at all
        err, why = math.inf, f" ({type(e).__name__}: {e})"
    if err > tol:
        setattr(model, LOGITS_PATH, "model")
        log.warning(
            "%s: the fused log-probs differ from the model's own output layer by %.3g (tolerance %.2g)%s: "
            "something happens between the output layer and the logits that fastrlhf does not reproduce, "
            "so log-probs go through the model's own output layer, %d tokens at a time (correct, slower)",
            _name(model), err, tol, why, _chunk(weight.shape[0]),
        )  # fmt: skip
        chosen = through_head
    else:
        log.info("%s: fused log-probs match the model's own forward (within %.2g)", _name(model), err)
        chosen = fused
    with _training(model):
        trained = response_logprobs(model, ids, probe.attention_mask, 1)
    _check_consistency(model, chosen.masked_fill(~valid, 0.0), trained.masked_fill(~valid, 0.0), dtype, scale)
    return getattr(model, LOGITS_PATH)


@contextlib.contextmanager
def _training(model: nn.Module) -> Iterator[None]:
    model.train()
    try:
        yield
    finally:
        model.eval()


def own_trunk_output(model: nn.Module, forward) -> torch.Tensor:
    """The last hidden states the trunk returns inside the model's own ``forward()`` call."""
    seen: list[torch.Tensor] = []

    def keep(_module, _args, output):
        seen.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    hook = trunk_of(unwrap(model)).register_forward_hook(keep)
    try:
        forward()
    finally:
        hook.remove()
    return seen[-1]


def _chunk(n_vocab: int) -> int:
    from fastrlhf.kernels.linear_token_logprobs import default_chunk_size

    return default_chunk_size(n_vocab)


def verify_scalar_model(model: nn.Module, tokenizer=None) -> None:
    head = scalar_head(model)
    probe = _probe_for(model, tokenizer, model.get_input_embeddings().num_embeddings)
    ids, mask = probe.input_ids, probe.attention_mask
    bias = float(getattr(model.config, "reward_bias", 0.0))
    ours = sequence_scores(model, ids, mask) - bias
    if has_scalar_head_added(model):  # its own forward gives logits: read its trunk's output in that forward
        trunk_output = own_trunk_output(model, lambda: _own_forward(model, probe))
        last = (mask.bool() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        own = head_scores(model, trunk_output[torch.arange(len(ids), device=ids.device), last])
    else:
        own = _own_forward(model, probe).logits.float().reshape(len(ids), -1)[:, 0]
    dtype = head.weight.dtype
    scale = float(own.abs().max())
    tol = tolerance(dtype, scale)
    err = _max_diff(ours, own)
    if err > tol:
        raise UnsupportedModel(
            f"{_name(model)}: fastrlhf's scores (the {type(head).__name__} head on the last hidden state of "
            f"{type(trunk_of(model)).__name__} at the last real token) differ from the model's own by "
            f"{err:.3g} "
            f"(tolerance {tol:.2g})" + SKIP_HINT
        )
    values = head_scores(model, hidden_states(model, ids, mask)).masked_fill(~mask.bool(), 0.0)
    with _training(model):
        trained = head_scores(model, hidden_states(model, ids, mask)).masked_fill(~mask.bool(), 0.0)
    _check_consistency(model, values, trained, dtype, scale)
    log.info("%s: scores match the model's own forward (within %.2g)", _name(model), err)
