"""The comparison's scales: model shape and PPO workload of each ``--scale``, with what each one changes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Preset:
    shape: str  # a key of e2e.models.SHAPES
    steps: int
    rollout_batch_size: int
    micro_batch_size: int
    ppo_epochs: int
    num_minibatches: int
    prompt_len: int
    response_len: int
    dtype: str
    gradient_checkpointing: bool
    lora_rank: int = 0
    fastrlhf_driver: str = "train_ppo"
    notes: list[str] = field(default_factory=list)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 8, 8, 4, 2, 2, 16, 12, "float32", False),
    "0.5b": Preset("0.5b", 5, 64, 16, 2, 4, 128, 128, "bfloat16", True),
    "1.5b": Preset("1.5b", 5, 64, 16, 2, 4, 128, 128, "bfloat16", True),
    "8b": Preset(
        "8b",
        4,
        16,
        8,
        1,
        2,
        128,
        128,
        "bfloat16",
        True,
        lora_rank=16,
        fastrlhf_driver="ppo_step",
        notes=[
            "8b: fastrlhf runs its ppo_step loop (build_models, build_trainables, ppo_step) instead of "
            "train_ppo, whose final save of the merged policy and critic (~31 GB) would not fit the disk.",
            "8b: full fine-tuning of policy and critic with AdamW does not fit one 80 GB GPU for either "
            "system, so both train LoRA adapters (rank 16, alpha 32, all linear layers) on policy and "
            "critic; the reference is the adapter-disabled policy on both sides (TRL: peft_config and "
            "ref_model=None; its value model gets LoRA injected in place plus a trainable score head).",
        ],
    ),
}
