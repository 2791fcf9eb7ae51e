"""What one benchmark worker runs: a system, its models and prompts, and the PPO workload."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunSpec:
    """Everything one system's worker needs; written as JSON for the subprocess."""

    system: str  # "fastrlhf" or "trl"
    policy_dir: str
    reward_dir: str
    work_dir: str
    prompts: list[str]
    steps: int
    rollout_batch_size: int
    micro_batch_size: int
    rollout_forward_batch_size: int  # TRL's local_rollout_forward_batch_size (generation/scoring chunks)
    ppo_epochs: int
    num_minibatches: int
    prompt_len: int
    response_len: int
    dtype: str  # "float32" or "bfloat16"
    lora_rank: int = 0
    lora_alpha: int = 32
    load_in_4bit: bool = False
    optimizer: str = "adamw"  # fastrlhf's name: adamw, adamw8bit, paged_adamw8bit
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    temperature: float = 1.0
    kl_coef: float = 0.05
    lr: float = 3e-6
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    memory_cap_gib: float | None = None
    # fastrlhf only: train_ppo, or "ppo_step": train_ppo's loop without its final save of the models
    fastrlhf_driver: str = "train_ppo"

    @property
    def tokens_per_step(self) -> int:
        return self.rollout_batch_size * (self.prompt_len + self.response_len)
