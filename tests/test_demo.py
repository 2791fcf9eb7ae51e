"""`fastrlhf demo` really learns: the gold reward rises clearly over the SFT policy with a bounded KL.

Run through the CLI at a size that fits CI (about a minute on 2 cores); the default demo is larger.
"""

from __future__ import annotations

import json

import pytest

from fastrlhf.cli import main

CI_SIZE = [
    "--sft_examples", "2048", "--rankings", "1024", "--ppo_steps", "25", "--rollout_batch_size", "32",
    "--eval_prompts", "256",
]  # fmt: skip


def test_demo_learns(tmp_path, torch_backend, capsys):
    assert main(["demo", "--out", str(tmp_path), *CI_SIZE]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert "gold reward of the SFT policy" in printed and "round 2: reward model" in printed
    first, second = summary["rounds"]
    assert first["rm_accuracy"] > 0.75
    assert first["reward_ppo"] > summary["reward_sft"] + 0.05, summary
    assert second["reward_ppo"] > summary["reward_sft"] + 0.05, summary  # the loop repeated keeps the gain
    assert 0.0 < summary["kl"] < 5.0, summary
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    phases = {json.loads(line)["phase"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert phases == {"sft", "rm", "ppo"}


def test_cli_reports_bad_options(capsys):
    assert main(["ppo", "--kl_coeff", "0.1"]) == 2
    assert "unknown option 'kl_coeff'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ppo", "--steps"])


def test_under_torchrun_rank_0_alone_prints_results(capsys, monkeypatch):
    from fastrlhf import cli

    monkeypatch.setenv("RANK", "1")
    cli._say("policy saved to runs/ppo/policy")
    assert main(["ppo", "--kl_coeff", "0.1"]) == 2  # every rank reports an error, naming itself
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error (rank 1): ") and "unknown option 'kl_coeff'" in err
    monkeypatch.setenv("RANK", "0")
    cli._say("policy saved to runs/ppo/policy")
    assert capsys.readouterr().out == "policy saved to runs/ppo/policy\n"


@pytest.mark.parametrize("estimator", ["gae", "grpo", "reinforce++"])
def test_demo_estimator_reaches_ppo(estimator, tmp_path):
    """`--estimator` is PPO's advantage_estimator; the grouped ones get groups that divide the batch."""
    from fastrlhf.config import ModelConfig
    from fastrlhf.demo import DemoConfig, demo_ppo_config

    cfg = DemoConfig(estimator=estimator, rollout_batch_size=32).validate()
    ppo = demo_ppo_config(cfg, ModelConfig(dtype="float32"))
    assert ppo.advantage_estimator == estimator
    assert ppo.rollout_batch_size % ppo.group_size == 0
    ppo.policy, ppo.reward_model, ppo.out = "org/sft", "org/rm", str(tmp_path / "ppo")  # as run_demo sets
    ppo.validate(provided=("prompts",))


def test_demo_rejects_an_unknown_estimator(capsys):
    assert main(["demo", "--estimator", "ppo"]) == 2
    err = capsys.readouterr().err
    assert "estimator" in err and "grpo" in err
