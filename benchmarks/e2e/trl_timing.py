"""Phase timing of TRL 1.12's ``PPOTrainer.train()`` from outside: timestamps from wrapped module-level
functions and trainer callbacks, turned into per-step phase times. Nothing TRL computes is changed."""

from __future__ import annotations

import time
import types
from collections.abc import Sequence
from typing import Any

from e2e.probes import OptimizerStepCounter


class PhaseClock:
    """Timestamps of TRL's train-loop events; the CUDA stream is synchronized before each one."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.events: list[tuple[str, float]] = []
        self.training = False  # inside the update of the current step (after its first grad-enabled forward)
        self.housekeeping: list[tuple[str, float, float]] = []  # (gc | empty_cache, end time, seconds)

    def mark(self, name: str) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.events.append((name, time.perf_counter()))


def trl_phases(
    events: Sequence[tuple[str, float]], housekeeping: Sequence[tuple[str, float, float]] = ()
) -> list[dict[str, float]]:
    """Per-step phase times from the event list (see :func:`instrument_trl`).

    A step runs from the previous ``step_end`` (or ``train_begin``) to its ``step_end``: generate = the sum
    of its generation calls, score = end of the last generation to the last no-grad forward before the
    update, advantages = to the first grad-enabled forward, update = to the ``log`` callback.
    ``gc_s`` / ``empty_cache_s``: time in TRL's ``gc.collect()`` / ``empty_cache()`` calls inside the step
    window (already part of the phases).
    """
    steps: list[dict[str, float]] = []
    start: float | None = None
    seg: list[tuple[str, float]] = []
    for name, t in events:
        if name == "train_begin":
            start, seg = t, []
            continue
        seg.append((name, t))
        if name != "step_end" or start is None:
            continue
        gen = 0.0
        gen_start = gen_end = score_end = train_start = log_t = None
        for n, tt in seg:
            if n == "gen_start":
                gen_start = tt
            elif n == "gen_end" and gen_start is not None:
                gen += tt - gen_start
                gen_end = tt
            elif n == "score_call_end" and train_start is None:
                score_end = tt
            elif n == "train_start" and train_start is None:
                train_start = tt
            elif n == "log":
                log_t = tt
        wall = t - start
        rec = {"wall_s": wall, "generate_s": gen}
        for kind in ("gc", "empty_cache"):
            rec[f"{kind}_s"] = sum(d for k, te, d in housekeeping if k == kind and start < te <= t)
        if None not in (gen_end, score_end, train_start, log_t):
            rec["score_s"] = score_end - gen_end
            rec["advantages_s"] = train_start - score_end
            rec["update_s"] = log_t - train_start
            rec["other_s"] = wall - gen - rec["score_s"] - rec["advantages_s"] - rec["update_s"]
        steps.append(rec)
        start, seg = t, []
    return steps


def _timed(fn: Any, on_done: Any) -> Any:
    """``fn`` wrapped to call ``on_done(end time, seconds)`` after each call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        t1 = time.perf_counter()
        on_done(t1, t1 - t0)
        return out

    return wrapper


def instrument_trl(
    clock: PhaseClock, response_checks: list[dict[str, int]], pad_id: int, eos_id: int
) -> None:
    """Wrap the module-level functions TRL's ``PPOTrainer.train`` calls by name, to time its phases.

    ``batch_generation`` is the rollout (each one's responses are checked: length, EOS and pad counts);
    ``forward`` (reference log-probs without grad, policy + value in the update with grad) and ``get_reward``
    (values and reward without grad) mark the scoring and the update.
    """
    import torch
    import trl.experimental.ppo.ppo_trainer as M

    batch_generation, forward, get_reward = M.batch_generation, M.forward, M.get_reward

    def timed_batch_generation(model: Any, queries: Any, *args: Any, **kwargs: Any) -> Any:
        clock.training = False
        clock.mark("gen_start")
        query_responses, logits = batch_generation(model, queries, *args, **kwargs)
        clock.mark("gen_end")
        response = query_responses[:, queries.shape[1] :]
        response_checks.append(
            {
                "response_len": int(response.shape[1]),
                "eos_tokens": int((response == eos_id).sum()),
                "pad_tokens": int((response == pad_id).sum()),
            }
        )
        return query_responses, logits

    def timed_forward(model: Any, query_responses: Any, pad_token_id: int) -> Any:
        if torch.is_grad_enabled():
            if not clock.training:
                clock.training = True
                clock.mark("train_start")
            return forward(model, query_responses, pad_token_id)
        out = forward(model, query_responses, pad_token_id)
        clock.mark("score_call_end")
        return out

    def timed_get_reward(*args: Any, **kwargs: Any) -> Any:
        out = get_reward(*args, **kwargs)
        clock.mark("score_call_end")
        return out

    M.batch_generation, M.forward, M.get_reward = timed_batch_generation, timed_forward, timed_get_reward
    # gc.collect() and empty_cache() run several times per step; timed to report TRL's housekeeping
    M.gc = types.SimpleNamespace(
        collect=_timed(M.gc.collect, lambda end, s: clock.housekeeping.append(("gc", end, s)))
    )
    M.empty_cache = _timed(M.empty_cache, lambda end, s: clock.housekeeping.append(("empty_cache", end, s)))


def phase_callback(clock: PhaseClock, counter: OptimizerStepCounter, opt_marks: list[dict[int, int]]) -> Any:
    """A ``TrainerCallback`` marking train begin, logs and step ends (with an optimizer-step snapshot)."""
    from transformers import TrainerCallback

    class PhaseCallback(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            clock.mark("train_begin")

        def on_log(self, *a: Any, **k: Any) -> None:
            clock.mark("log")

        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.mark("step_end")
            opt_marks.append(counter.snapshot())

    return PhaseCallback()
