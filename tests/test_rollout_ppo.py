"""The rollout engines inside PPO and `fastrlhf sample`: the option reaches them, the first-minibatch ratio
stays exactly 1 (old log-probs are recomputed by the training kernels) with LoRA and gradient checkpointing
too, each step logs the rollout's tokens/s, peak memory and KV cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fastrlhf.config import ModelConfig, OptimConfig, PPOConfig, RolloutConfig
from fastrlhf.demo_task import DemoTask
from fastrlhf.ppo_trainer import sample_completions, train_ppo
from fastrlhf.rollout import engine_for
from fastrlhf.rollout.hf import HFEngine
from fastrlhf.rollout.static import StaticEngine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task() -> DemoTask:
    return DemoTask(seed=0)


@pytest.mark.parametrize(
    "backend,lora", [("static", False), ("static", True), ("paged", False)],
    ids=["static", "static-lora-checkpointing", "paged"],
)  # fmt: skip
def test_ppo_with_each_backend_keeps_the_first_minibatch_ratio_at_one(
    backend, lora, base_model, task, tmp_path, torch_backend
):
    mc = ModelConfig(dtype="float32", lora_rank=4 if lora else 0, gradient_checkpointing=lora)
    cfg = PPOConfig(
        policy=str(base_model), out=str(tmp_path), steps=2, rollout_batch_size=8, ppo_epochs=2,
        num_minibatches=2, micro_batch_size=4, max_new_tokens=6, critic="policy_head",
        model_config=mc, policy_optim=OptimConfig(lr=1e-3),
        rollout=RolloutConfig(backend=backend, prompt_bucket=8),
    )  # fmt: skip

    def reward(prompts, completions):
        return [task.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]

    models, _ = train_ppo(cfg, reward=reward, prompts=task.prompts(16, seed=0))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "ratio_first_minibatch_max_dev" in r]
    assert len(steps) == 2
    for record in steps:
        assert record["ratio_first_minibatch_max_dev"] == 0.0
        # Throughput and the rollout phase's peak device memory (0 on the CPU) are logged every step.
        assert record["rollout/tokens_per_second"] > 0 and "memory_gib/generate" in record
    if backend == "static":
        assert all(r["rollout/kv_cache_gib"] > 0 for r in steps)
        # The second step reused the first step's cache (same prompt bucket, same batch bucket).
        assert steps[-1]["rollout/cache_allocations"] == 1
    if lora:
        assert models.reference is None  # the reference is the policy with its adapters disabled


def test_sample_completions_use_the_configured_backend(base_model, task, torch_backend):
    from fastrlhf.models import load_causal_lm, load_tokenizer

    mc = ModelConfig(dtype="float32")
    tok = load_tokenizer(str(base_model), mc)
    policy = load_causal_lm(str(base_model), mc, torch.device("cpu"), tok, trainable=False)
    prompts = task.prompts(5, seed=3)
    cfg = PPOConfig(max_new_tokens=5, rollout=RolloutConfig(backend="static", prompt_bucket=8))
    torch.manual_seed(0)
    texts = sample_completions(policy, tok, prompts, cfg, batch_size=3)
    assert len(texts) == 5 and isinstance(engine_for(policy, cfg.rollout), StaticEngine)
    cfg.rollout.backend = "hf"
    assert len(sample_completions(policy, tok, prompts, cfg)) == 5
    assert isinstance(engine_for(policy, cfg.rollout), HFEngine)


def test_fastrlhf_sample_takes_the_rollout_backend_option(base_model, task, tmp_path, caplog, monkeypatch):
    """`fastrlhf sample --rollout.backend static` (the command labelers' samples come from)."""
    from fastrlhf.cli import main

    monkeypatch.setenv("FASTRLHF_KERNELS", "torch")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(task.prompts(3, seed=1)) + "\n")
    out = tmp_path / "samples.jsonl"
    argv = ["sample", "--model", str(base_model), "--prompts", str(prompts), "--out", str(out), "--k", "2",
            "--max_new_tokens", "4", "--rollout.backend", "static", "--rollout.prompt_bucket", "8",
            "--model_config.dtype", "float32"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fastrlhf"):
        assert main(argv) == 0
    assert "rollout backend: static (rollout.backend=static)" in caplog.text
    assert "falling back" not in caplog.text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["responses"]) == 2 for r in rows)
