"""fastrlhf: InstructGPT-style RLHF on one GPU.

The stages are importable from here (``from fastrlhf import PPOConfig, train_ppo``). They load lazily, so
``import fastrlhf.kernels`` stays free of transformers and the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "fastrlhf.config",
    "OptimConfig": "fastrlhf.config",
    "SFTConfig": "fastrlhf.config",
    "RMConfig": "fastrlhf.config",
    "PPOConfig": "fastrlhf.config",
    "RolloutConfig": "fastrlhf.config",
    "JudgeConfig": "fastrlhf.config",
    "PipelineConfig": "fastrlhf.pipeline",
    "train_sft": "fastrlhf.sft",
    "train_rm": "fastrlhf.rm",
    "train_ppo": "fastrlhf.ppo_trainer",
    "run_pipeline": "fastrlhf.pipeline",
    "sample_for_labeling": "fastrlhf.pipeline",
    "judge_file": "fastrlhf.judge",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastrlhf' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return [*globals(), *__all__]
