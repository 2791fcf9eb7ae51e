"""The fastrlhf side of a run: a ``PPOConfig`` from the spec, then ``train_ppo`` (or its loop without the
final save), recording each step from the metrics fastrlhf logs."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from e2e.probes import OptimizerStepCounter, rss_gib
from e2e.spec import RunSpec

TIMED_PHASES = ("generate", "score", "evaluate", "advantages", "update", "step")


def fastrlhf_config(spec: RunSpec) -> Any:
    from fastrlhf.config import ModelConfig, OptimConfig, PPOConfig

    optim = OptimConfig(lr=spec.lr, warmup_steps=0, max_grad_norm=0.0)  # TRL's PPO loop does not clip
    return PPOConfig(
        policy=spec.policy_dir,
        reward_model=spec.reward_dir,
        critic="reward_model",
        out=str(Path(spec.work_dir) / "fastrlhf-out"),
        steps=spec.steps,
        rollout_batch_size=spec.rollout_batch_size,
        ppo_epochs=spec.ppo_epochs,
        num_minibatches=spec.num_minibatches,
        micro_batch_size=spec.micro_batch_size,
        max_prompt_len=spec.prompt_len,
        max_new_tokens=spec.response_len,
        min_new_tokens=spec.response_len,
        temperature=spec.temperature,
        top_p=1.0,
        missing_eos_penalty=None,
        kl_coef=spec.kl_coef,
        kl_estimator="k1",
        policy_optim=optim,
        critic_optim=dataclasses.replace(optim),
        model_config=ModelConfig(
            dtype=spec.dtype,
            attn_implementation=spec.attn_implementation,
            gradient_checkpointing=spec.gradient_checkpointing,
            lora_rank=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            load_in_4bit=spec.load_in_4bit,
            optimizer=spec.optimizer,
        ),
        seed=spec.seed,
    )


class StepRecorder:
    """Benchmark step records from fastrlhf's per-step metrics: wall time between step ends, the phase split
    (score = reward model + evaluate pass: old log-probs, reference, values), optimizer steps."""

    def __init__(self) -> None:
        self.counter = OptimizerStepCounter()
        self.records: list[dict[str, Any]] = []
        self._opt_before: dict[int, int] = {}
        self.restart()

    def restart(self) -> None:
        self._last = time.perf_counter()

    def __call__(self, stats: dict[str, float]) -> None:
        now, counts = time.perf_counter(), self.counter.snapshot()
        rec: dict[str, Any] = {f"{k}_s": stats.get(f"time/{k}") for k in TIMED_PHASES}
        rec["score_s"] = (stats.get("time/score") or 0.0) + (stats.get("time/evaluate") or 0.0)
        rec["reward_model_s"] = stats.get("time/score")
        rec["phases_s"] = stats.get("time/step")
        rec["wall_s"] = now - self._last
        rec["other_s"] = rec["wall_s"] - rec["phases_s"] if rec["phases_s"] is not None else None
        rec["response_length"] = stats.get("response_length")
        rec["eos_rate"] = stats.get("eos_rate")
        rec["phase_memory_gib"] = {
            k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("memory_gib/")
        }
        rec["optimizer_steps"] = self.counter.per_optimizer(counts, self._opt_before)
        rec["optimizers"] = len(counts)
        self._last, self._opt_before = now, counts
        self.records.append(rec)

    def peak_gpu_gib(self) -> float | None:
        """The largest ``memory_gib/step`` (fastrlhf's whole-step peak) of the recorded steps."""
        peaks = [r["phase_memory_gib"]["step"] for r in self.records if "step" in r["phase_memory_gib"]]
        return max(peaks, default=None)


def _train_ppo(cfg: Any, prompts: list[str], record: StepRecorder) -> None:
    from fastrlhf.metrics import MetricsLogger
    from fastrlhf.ppo_trainer import train_ppo

    class RecordingLogger(MetricsLogger):
        def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:  # type: ignore[override]
            super().log(phase, step, metrics)
            if phase == "ppo":
                record(dict(metrics))

    with RecordingLogger(cfg.out, tensorboard=False) as logger:
        # train_ppo builds its models before the first step, so the first step's wall time includes model
        # loading; it is the warm-up step and excluded
        record.restart()
        train_ppo(cfg, prompts=prompts, logger=logger)


def _ppo_step_loop(cfg: Any, prompts: list[str], record: StepRecorder) -> None:
    """``train_ppo``'s loop over fastrlhf's public pieces, without checkpoints and the final save (the merged
    8B policy and critic would not fit the disk; the fit table's cells need no saved models)."""
    from fastrlhf.data import encode_prompt
    from fastrlhf.models import default_device
    from fastrlhf.ppo import KLController, ppo_step
    from fastrlhf.ppo_trainer import build_models, build_trainables
    from fastrlhf.training import seed_everything, shuffled_batches

    seed_everything(cfg.seed)
    device = default_device()
    models = build_models(cfg, None, device)
    opt = build_trainables(models, cfg, device)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    data = [(p, encode_prompt(models.tokenizer, p)) for p in prompts]
    record.restart()
    for step in range(cfg.steps):
        # one rollout batch of prompts: the batch of step s is train_ppo's (epoch s, index 0)
        batch = shuffled_batches(data, cfg.rollout_batch_size, seed=cfg.seed, epoch=step)[0]
        stats, _ = ppo_step(models, [p for p, _ in batch], [ids for _, ids in batch], opt, kl, cfg, step)
        record(stats)


def run_fastrlhf(spec: RunSpec, info: dict[str, Any]) -> dict[str, Any]:
    import fastrlhf.ppo_trainer  # noqa: F401  (imported before measuring the RSS the libraries take)

    info["rss_after_imports_gib"] = rss_gib()
    cfg = fastrlhf_config(spec)
    record = StepRecorder()
    drive = _train_ppo if spec.fastrlhf_driver == "train_ppo" else _ppo_step_loop
    t0 = time.perf_counter()
    drive(cfg, list(spec.prompts), record)
    info["total_s"] = time.perf_counter() - t0
    info["driver"] = spec.fastrlhf_driver
    return {"steps": record.records, "peak_gpu_allocated_of_steps_gib": record.peak_gpu_gib()}
