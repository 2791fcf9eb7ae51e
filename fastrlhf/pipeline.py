"""SFT -> RM -> PPO end to end, then optional further rounds of RM and PPO on fresh comparisons (stage 4)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from fastrlhf.config import PPOConfig, RMConfig, SFTConfig
from fastrlhf.data import Prompt, load_prompts
from fastrlhf.models import default_device, load_causal_lm, load_tokenizer
from fastrlhf.ppo_trainer import sample_completions, train_ppo
from fastrlhf.rm import train_rm
from fastrlhf.sft import train_sft
from fastrlhf.training import log


@dataclass
class PipelineConfig:
    """The stages' configs; paths between stages are filled in by the pipeline."""

    out: str = "runs/pipeline"
    """Root output directory; each stage writes to a subdirectory (sft, rm-1, ppo-1, rm-2, ...)."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    skip_sft: bool = False
    """Start from sft.model as the SFT model (already fine-tuned)."""


def run_pipeline(cfg: PipelineConfig, *, more_rankings: list[str] = ()) -> dict[str, str]:
    """Run the stages; returns the output directories.

    Each file in ``more_rankings`` adds a round: the RM continues training on those new comparisons (of the
    current policy's samples, see :func:`sample_for_labeling`), then PPO continues from the last policy with
    the SFT model kept as the KL reference.
    """
    root = Path(cfg.out)
    outputs: dict[str, str] = {}
    if cfg.skip_sft:
        sft_dir = Path(cfg.sft.model)
    else:
        _, _, sft_dir = train_sft(dataclasses.replace(cfg.sft, out=str(root / "sft")))
    outputs["sft"] = str(sft_dir)
    rm_init, policy = str(sft_dir), str(sft_dir)
    for round_index, data in enumerate([cfg.rm.data, *more_rankings], start=1):
        rm_cfg = dataclasses.replace(cfg.rm, model=rm_init, data=data, out=str(root / f"rm-{round_index}"))
        _, _, rm_dir, accuracy = train_rm(rm_cfg)
        log.info("round %d: reward model accuracy %.3f", round_index, accuracy)
        ppo_cfg = dataclasses.replace(
            cfg.ppo,
            policy=policy,
            reference=str(sft_dir),
            reward_model=str(rm_dir),
            out=str(root / f"ppo-{round_index}"),
        )
        _, ppo_dir = train_ppo(ppo_cfg)
        rm_init, policy = str(rm_dir), str(ppo_dir / "policy")
        outputs[f"rm-{round_index}"], outputs[f"ppo-{round_index}"] = str(rm_dir), policy
    (root / "outputs.json").write_text(json.dumps(outputs, indent=2) + "\n")
    return outputs


def sample_for_labeling(
    model: str, prompts_path: str, out: str, *, k: int = 4, ppo: PPOConfig | None = None
) -> Path:
    """Write K samples per prompt from ``model`` as JSONL ``{"prompt", "responses"}``: labelers add a
    ``ranking`` (indices best first) and the file becomes the next round's comparisons."""
    cfg = ppo or PPOConfig()
    device = default_device()
    tokenizer = load_tokenizer(model, cfg.model_config)
    policy = load_causal_lm(model, cfg.model_config, device, tokenizer, trainable=False)
    prompts: list[Prompt] = load_prompts(prompts_path)
    samples = [sample_completions(policy, tokenizer, prompts, cfg) for _ in range(k)]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"prompt": prompt, "responses": [s[i] for s in samples]}) + "\n")
    log.info("wrote %d prompts x %d responses to %s", len(prompts), k, path)
    return path
