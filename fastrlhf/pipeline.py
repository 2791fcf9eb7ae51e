"""SFT -> RM -> PPO end to end, then further rounds of RM and PPO on fresh comparisons (stage 4).

The comparisons of a round come from a file (``rm.data``, then each ``--more-rankings`` file), from a local
LLM judge (``labeling: judge``: sample K responses from the current policy, judge them, train), or from
people (``labeling: human``: the pipeline samples for them and stops, saying what to run next).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from fastrlhf.config import (
    ConfigError,
    JudgeConfig,
    OptionChecker,
    PPOConfig,
    RMConfig,
    SFTConfig,
    check_data_path,
    check_model_path,
)
from fastrlhf.data import Prompt, load_prompts
from fastrlhf.models import default_device, load_causal_lm, load_tokenizer
from fastrlhf.ppo_trainer import sample_completions, train_ppo
from fastrlhf.rank.task import MAX_RESPONSES
from fastrlhf.rm import train_rm
from fastrlhf.sft import train_sft
from fastrlhf.training import log

LABELING = ("rankings", "judge", "human")


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
    labeling: str = "rankings"
    """Where a round's comparisons come from once rm.data and the --more-rankings files are used up:
    "rankings" (nowhere: the pipeline stops), "judge" (sample K responses per prompt from the current
    policy into samples-R.jsonl and rank them with `judge` into rankings-R.jsonl, until `rounds` rounds
    ran) or "human" (write samples-R.jsonl for `fastrlhf rank` and stop, printing the next commands)."""
    rounds: int = 1
    """labeling "judge": RM + PPO rounds in all (round 1 is judged too when rm.data is empty)."""
    sample_prompts: str = ""
    """Prompts to sample the comparisons of new rounds for (JSONL or .txt); empty: ppo.prompts. Fresh
    prompts, not PPO's, keep the reward model from only seeing what PPO already optimized."""
    k: int = 4
    """Responses sampled per prompt for a new round."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The judge for labeling "judge" (its data and out are filled in per round). Never the policy."""
    resume: bool = False
    """Skip SFT and the rounds that outputs.json and round_data.json record as finished on the same data
    (to continue after people ranked a round's samples, say) instead of training them again."""

    def validate(self, prefix: str = "", *, provided: Collection[str] = ()) -> PipelineConfig:
        """Raise :class:`ConfigError` for a value that cannot work, in any stage, before anything runs.
        The paths between stages (``rm.model``, ``ppo.policy``, ...) are filled in here, so not required."""
        c = OptionChecker(self, prefix, provided)
        c.out_dir("out")
        c.choice("labeling", LABELING)
        c.integer("rounds", 1)
        if self.labeling == "human":  # the ranking page shows at most MAX_RESPONSES
            c.integer("k", 2, MAX_RESPONSES)
        c.integer("k", 2)
        c.data_path("sample_prompts", required=False)
        sft_given = {"out", "data"} if self.skip_sft else {"out"}
        self.sft.validate(f"{prefix}sft.", provided=sft_given | c.sub("sft"))
        self.rm.validate(f"{prefix}rm.", provided={"model", "data", "out"} | c.sub("rm"))
        ppo_given = {"policy", "reference", "reward_model", "out"}
        self.ppo.validate(f"{prefix}ppo.", provided=ppo_given | c.sub("ppo"))
        judge_given = {"data", "out"} | c.sub("judge") | (set() if self.labeling == "judge" else {"model"})
        self.judge.validate(f"{prefix}judge.", provided=judge_given)
        if self.labeling == "judge" and self.judge.model:
            judge = Path(self.judge.model).resolve()
            policies = {Path(p).resolve() for p in (self.sft.model, Path(self.out) / "sft" / "model") if p}
            if judge in policies:
                c.fail("judge.model", "a model other than the one being trained (a policy judging its own "
                       "samples prefers itself: self-preference)", self.judge.model)  # fmt: skip
        return self


def run_pipeline(cfg: PipelineConfig, *, more_rankings: list[str] = (), judge=None) -> dict[str, str]:
    """Run the stages; returns the output directories (and, with labeling "human", ``next``: what to run).

    Each ranking file (``rm.data``, then ``more_rankings``) makes a round: the RM continues training on those
    comparisons (of the current policy's samples, see :func:`sample_for_labeling`), then PPO continues from
    the last policy with the SFT model kept as the KL reference. ``judge`` (an object with ``verdicts``, see
    :mod:`fastrlhf.judge`) replaces ``cfg.judge.model`` for in-process callers.
    """
    cfg.validate(provided=("judge.model",) if judge is not None else ())
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    record, data_record = root / "outputs.json", root / "round_data.json"
    done: dict[str, str] = {}
    if cfg.resume and record.exists() and data_record.exists():
        done = json.loads(record.read_text()) | json.loads(data_record.read_text())
    round_data: dict[str, str] = {}
    sources = [d for d in (cfg.rm.data, *more_rankings) if d]
    if cfg.labeling == "rankings" and not sources:
        raise ValueError("rm.data: no rankings to train on (or set labeling to judge or human)")
    n_rounds = max(cfg.rounds, len(sources)) if cfg.labeling == "judge" else len(sources)
    prompts = cfg.sample_prompts or cfg.ppo.prompts

    outputs: dict[str, str] = {}
    if cfg.skip_sft:
        sft_dir = Path(cfg.sft.model)
    elif "sft" in done and Path(done["sft"]).exists():
        sft_dir = Path(done["sft"])
        log.info("resume: SFT model %s", sft_dir)
    else:
        _, _, sft_dir = train_sft(dataclasses.replace(cfg.sft, out=str(root / "sft")))
    outputs["sft"] = str(sft_dir)
    rm_init, policy = str(sft_dir), str(sft_dir)
    for r in range(1, n_rounds + 1):
        judged = r > len(sources)  # labeling "judge": the judge ranks the current policy's samples
        data = str(root / f"rankings-{r}.jsonl") if judged else sources[r - 1]
        keys = (f"data-{r}", f"rm-{r}", f"ppo-{r}")
        if done.get(keys[0]) == data and all(k in done and Path(done[k]).exists() for k in keys[1:]):
            log.info("resume: round %d already trained on %s", r, data)
            rm_dir, policy_dir = Path(done[keys[1]]), done[keys[2]]
        else:
            if judged:
                from fastrlhf.judge import judge_file

                samples = sample_for_labeling(
                    policy, prompts, str(root / f"samples-{r}.jsonl"), k=cfg.k, ppo=cfg.ppo
                )
                judge_file(dataclasses.replace(cfg.judge, data=str(samples), out=data), judge)
            rm_cfg = dataclasses.replace(cfg.rm, model=rm_init, data=data, out=str(root / f"rm-{r}"))
            _, _, rm_dir, accuracy = train_rm(rm_cfg)
            log.info("round %d: reward model accuracy %.3f", r, accuracy)
            ppo_cfg = dataclasses.replace(
                cfg.ppo,
                policy=policy,
                reference=str(sft_dir),
                reward_model=str(rm_dir),
                out=str(root / f"ppo-{r}"),
            )
            _, ppo_dir = train_ppo(ppo_cfg)
            policy_dir = str(ppo_dir / "policy")
        rm_init, policy = str(rm_dir), policy_dir
        round_data[keys[0]], outputs[keys[1]], outputs[keys[2]] = data, str(rm_dir), policy
        record.write_text(json.dumps(outputs, indent=2) + "\n")
        data_record.write_text(json.dumps(round_data, indent=2) + "\n")
    record.write_text(json.dumps(outputs, indent=2) + "\n")
    if cfg.labeling == "human":
        r = n_rounds + 1
        samples = sample_for_labeling(policy, prompts, str(root / f"samples-{r}.jsonl"), k=cfg.k, ppo=cfg.ppo)
        rankings = root / f"rankings-{r}.jsonl"
        files = " ".join([*sources, str(rankings)][1 if cfg.rm.data else 0 :])
        outputs["next"] = (
            f"rank the samples: fastrlhf rank --data {samples} --out {rankings}; then continue with: "
            f"fastrlhf pipeline <the same options> --resume true --more-rankings {files}"
        )
        log.info("round %d needs people's rankings; next: %s", r, outputs["next"])
    return outputs


def check_sample_options(model: str, prompts_path: str, out: str, k: int, ppo: PPOConfig | None) -> PPOConfig:
    """What :func:`sample_for_labeling` (``fastrlhf sample``) needs, checked before anything loads; returns
    the sampling config (``ppo``, or the defaults)."""
    cfg = (ppo or PPOConfig()).validate(provided=("policy", "reward_model", "prompts", "out"))
    check_model_path("model", model)
    check_data_path("prompts", prompts_path)
    if not out or Path(out).is_dir():
        raise ConfigError(f"out: expected an output JSONL file, got {out!r}")
    if k < 2:
        raise ConfigError(f"k: expected an integer >= 2, got {k}")
    return cfg


def sample_for_labeling(
    model: str, prompts_path: str, out: str, *, k: int = 4, ppo: PPOConfig | None = None
) -> Path:
    """Write K samples per prompt from ``model`` as JSONL ``{"prompt", "responses"}``: labelers add a
    ``ranking`` (indices best first) and the file becomes the next round's comparisons."""
    cfg = check_sample_options(model, prompts_path, out, k, ppo)
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
