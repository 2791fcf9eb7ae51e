"""The trainer: losses against hand computations, PPO invariants, every stage end to end, resume, NaN stop.

Tiny random Llamas built from a config; nothing is downloaded. Most tests run the PyTorch kernels (the
kernels have their own tests); one PPO step runs the Triton kernels through the interpreter.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from fastrlhf.checkpoint import NonFiniteLossError, latest_checkpoint
from fastrlhf.config import ModelConfig, OptimConfig, PPOConfig, RMConfig, SFTConfig, load_config
from fastrlhf.data import Ranking, SFTExample, ranking_batch
from fastrlhf.demo_task import DemoTask
from fastrlhf.ppo import KLController, ppo_loss
from fastrlhf.ppo_trainer import build_models, build_trainables, train_ppo, trainable_footprint
from fastrlhf.rm import ranking_loss, train_rm
from fastrlhf.sft import train_sft

CPU = ModelConfig(dtype="float32")


@pytest.fixture(scope="module")
def task() -> DemoTask:
    return DemoTask(seed=0)


@pytest.fixture(scope="module")
def reward(task):
    """The demo task's gold reward as a PPO reward function (no reward model needed)."""
    return lambda prompts, completions: [
        task.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)
    ]


def _ppo_cfg(base: Path, out: Path, **kw) -> PPOConfig:
    defaults = dict(
        policy=str(base), reward_model=str(base), out=str(out), steps=2, rollout_batch_size=8, ppo_epochs=2,
        num_minibatches=2, micro_batch_size=2, max_new_tokens=6, model_config=CPU,
        policy_optim=OptimConfig(lr=1e-3), critic_optim=OptimConfig(lr=1e-3),
    )  # fmt: skip
    defaults.update(kw)
    return PPOConfig(**defaults)


# ----------------------------------------------------------------------------------------- hand computations


def test_ranking_loss_matches_hand_computation():
    # Two rankings: K=3 best-first [2, 0, 1], and a pair. Scores per row (ranking 1: rows 0-2, pair: 3-4).
    items = [([1], [[5], [6], [7]], [2, 0, 1]), ([1], [[5], [6]], [0, 1])]
    batch = ranking_batch(items, pad_id=0)
    s = [0.3, -1.2, 2.0, 0.7, 0.9]
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))
    first = -(ls(s[2] - s[0]) + ls(s[2] - s[1]) + ls(s[0] - s[1])) / 3
    second = -ls(s[3] - s[4])
    loss, correct = ranking_loss(torch.tensor(s, dtype=torch.float64), batch)
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-7)  # pair weights are float32
    assert float(correct) == 3  # all three pairs of the K=3 ranking ordered right, the pair wrong


def test_ppo_loss_matches_hand_computation():
    cfg = PPOConfig(clip_range=0.2, value_clip_range=0.5)
    logp = torch.tensor([[-1.0, -0.5, -2.0]], dtype=torch.float64)
    old = torch.tensor([[-1.3, -0.5, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    values = torch.tensor([[0.2, 1.5, -0.4]], dtype=torch.float64)
    old_values = torch.tensor([[0.0, 0.5, -0.5]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    pg, vf, stats = ppo_loss(logp, old, adv, values, old_values, returns, mask, cfg, n_tokens=2)
    # token 0: rho = e^0.3 = 1.3499 > 1.2 -> max(-1 * 1.3499, -1 * 1.2) = -1.2; token 1: rho = 1 -> 2.0
    assert float(pg) == pytest.approx((-1.2 + 2.0) / 2, rel=1e-12)
    # token 0: (0.2-1)^2 = 0.64, clipped V = 0.2 -> same; token 1: (1.5-1)^2 = 0.25, V_clip = 1.0 -> 0 -> 0.25
    assert float(vf) == pytest.approx(0.5 * (0.64 + 0.25) / 2, rel=1e-12)
    assert float(stats["clipfrac"]) == 1
    assert float(stats["approx_kl"]) == pytest.approx((math.exp(0.3) - 1) - 0.3, rel=1e-12)


def test_adaptive_kl_controller_follows_its_formula():
    kl = KLController(0.1, target=6.0, horizon=10000)
    kl.update(9.0, 256)  # error = clip(0.5, -0.2, 0.2) = 0.2
    assert kl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    fixed = KLController(0.1)
    fixed.update(100.0, 256)
    assert fixed.value == 0.1


# ----------------------------------------------------------------------------------------- PPO invariants


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce++"])
def test_critic_free_estimators_load_no_critic(base_model, tmp_path, estimator):
    """No critic model, value head or critic optimizer exists for a critic-free estimator, whatever ``critic``
    says; the footprint PPO logs shows the saving against GAE with a critic from the reward model."""
    cpu = torch.device("cpu")
    with_critic = build_models(_ppo_cfg(base_model, tmp_path), None, cpu)
    cfg = _ppo_cfg(base_model, tmp_path, advantage_estimator=estimator, critic="policy_head")
    models = build_models(cfg, None, cpu)
    assert models.critic is None and models.value_head is None
    opt = build_trainables(models, cfg, cpu)
    assert opt.critic_optimizer is None and opt.critic_params == []
    free = trainable_footprint(models, opt)
    full_opt = build_trainables(with_critic, _ppo_cfg(base_model, tmp_path), cpu)
    full = trainable_footprint(with_critic, full_opt)
    assert free["params/value_head"] == free["params/critic"] == 0
    assert free["params/total"] == free["params/policy"] == full["params/policy"]
    assert full["params/critic"] > 0.9 * full["params/policy"]  # the critic is a whole model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_first_minibatch_ratio_is_exactly_one(base_model, task, reward, tmp_path, monkeypatch, backend):
    monkeypatch.setenv("FASTRLHF_KERNELS", backend)
    cfg = _ppo_cfg(base_model, tmp_path, steps=1)
    train_ppo(cfg, reward=reward, prompts=task.prompts(8, seed=0))
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["ratio_first_minibatch_max_dev"] == 0.0
    assert math.isfinite(record["approx_kl"]) and record["approx_kl"] >= 0


def test_micro_batches_accumulate_to_the_minibatch_gradient(
    base_model, task, reward, tmp_path, torch_backend
):
    """The same rollout updated with micro-batches of 1 and of 4 gives the same weights (SGD, one epoch)."""
    from fastrlhf.ppo import compute_advantages, evaluate, rollout, score, update

    results = []
    for micro in (1, 4):
        torch.manual_seed(0)
        cfg = _ppo_cfg(base_model, tmp_path, micro_batch_size=micro, ppo_epochs=1, num_minibatches=1,
                       rollout_batch_size=4, critic="policy_head")  # fmt: skip
        models = build_models(cfg, reward, torch.device("cpu"))
        opt = build_trainables(models, cfg, torch.device("cpu"))
        opt.policy_optimizer = torch.optim.SGD(opt.policy_params, lr=0.1)
        opt.policy_scheduler = torch.optim.lr_scheduler.LambdaLR(opt.policy_optimizer, lambda _: 1.0)
        prompts = task.prompts(4, seed=1)
        ids = [models.tokenizer(p)["input_ids"] for p in prompts]
        batch = rollout(models.policy, models.tokenizer, prompts, ids, cfg)
        batch.scores = score(models, batch, cfg)
        order = torch.arange(4)
        evaluate(models, batch, order, cfg)
        compute_advantages(batch, KLController(cfg.kl_coef), cfg)
        update(models, batch, order, opt, cfg, step=0)
        results.append([p.detach().clone() for p in opt.policy_params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_ppo_update_matches_a_step_by_step_reference(base_model, task, reward, tmp_path, torch_backend):
    """One minibatch, one epoch, SGD: the update equals a plain recomputation through full logits."""
    import copy

    from fastrlhf.ppo import compute_advantages, evaluate, rollout, score, update

    cfg = _ppo_cfg(base_model, tmp_path, ppo_epochs=1, num_minibatches=1, micro_batch_size=2,
                   rollout_batch_size=4, critic="policy_head", temperature=0.8, vf_coef=0.3)  # fmt: skip
    cfg.policy_optim.max_grad_norm = 0.0
    models = build_models(cfg, reward, torch.device("cpu"))
    opt = build_trainables(models, cfg, torch.device("cpu"))
    lr = 0.05
    opt.policy_optimizer = torch.optim.SGD(opt.policy_params, lr=lr)
    opt.policy_scheduler = torch.optim.lr_scheduler.LambdaLR(opt.policy_optimizer, lambda _: 1.0)
    prompts = task.prompts(4, seed=7)
    batch = rollout(
        models.policy, models.tokenizer, prompts, [models.tokenizer(p)["input_ids"] for p in prompts], cfg
    )
    batch.scores = score(models, batch, cfg)
    order = torch.arange(4)
    evaluate(models, batch, order, cfg)
    compute_advantages(batch, KLController(cfg.kl_coef), cfg)
    policy, head = copy.deepcopy(models.policy).double(), copy.deepcopy(models.value_head).double()
    update(models, batch, order, opt, cfg, step=0)

    # The reference: full logits, log_softmax over the ids the sampler can draw (the pad token is
    # suppressed), the PPO formulas written out, one SGD step.
    ids, attn, start = batch.input_ids, batch.attention_mask, batch.response_start
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = policy(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
    logits = out.logits[:, start - 1 : -1] / cfg.temperature
    logits[..., models.tokenizer.pad_token_id] = -torch.inf
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, start:, None]).squeeze(-1)
    logp = logp.masked_fill(~batch.response_mask, 0.0)  # padding after EOS holds the (suppressed) pad id
    values = head(out.hidden_states[-1][:, start - 1 : -1])
    m = batch.response_mask.double()
    adv, ret, old_v = batch.advantages.double(), batch.returns.double(), batch.values.double()
    ratio = torch.exp((logp - batch.logp.double()) * m)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    v_clip = old_v + (values - old_v).clamp(-0.2, 0.2)
    vf = 0.5 * torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2)
    loss = ((pg + 0.3 * vf) * m).sum() / m.sum()
    loss.backward()
    expected = [p - lr * p.grad for p in [*policy.parameters(), *head.parameters()] if p.grad is not None]
    actual = opt.policy_params
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------- stages end to end


def test_sft_rm_ppo_end_to_end(base_model, task, tmp_path, torch_backend):
    examples = [SFTExample(r["prompt"], r["completion"]) for r in task.sft_records(64, seed=1)]
    sft_cfg = SFTConfig(model=str(base_model), out=str(tmp_path / "sft"), batch_size=16, micro_batch_size=8,
                        optim=OptimConfig(lr=1e-3), model_config=CPU)  # fmt: skip
    _, _, sft_dir = train_sft(sft_cfg, examples=examples)
    assert (sft_dir / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(sft_dir)  # transformers loads it back

    rankings = [
        Ranking(r["prompt"], r["responses"], r["ranking"]) for r in task.ranking_records(40, 3, seed=2)
    ]
    rm_cfg = RMConfig(model=str(sft_dir), out=str(tmp_path / "rm"), batch_size=8, micro_batch_size=4,
                      eval_fraction=0.2, model_config=CPU)  # fmt: skip
    rm, _, rm_dir, accuracy = train_rm(rm_cfg, rankings=rankings, demonstrations=examples)
    assert 0.0 <= accuracy <= 1.0
    assert json.loads((rm_dir / "config.json").read_text())["reward_bias"] == rm.config.reward_bias

    cfg = _ppo_cfg(sft_dir, tmp_path / "ppo", reward_model=str(rm_dir), steps=2)
    train_ppo(cfg, prompts=task.prompts(16, seed=3))
    records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    logged = ("reward", "kl", "entropy", "approx_kl", "clipfrac", "ratio", "ratio_var", "value_loss")
    logged += ("explained_variance", "eos_rate", "response_length", "time/generate", "time/update")
    for key in logged:
        assert key in records[-1], key
    assert (tmp_path / "ppo" / "policy" / "model.safetensors").exists()
    assert (tmp_path / "ppo" / "critic" / "model.safetensors").exists()
    assert (tmp_path / "ppo" / "curves.png").exists()


def test_lora_policy_uses_disabled_adapters_as_reference(base_model, task, reward, tmp_path, torch_backend):
    lora = dataclasses.replace(CPU, lora_rank=4)
    cfg = _ppo_cfg(base_model, tmp_path, steps=1, critic="policy_head", model_config=lora)
    models, _ = train_ppo(cfg, reward=reward, prompts=task.prompts(8, seed=0))
    assert models.reference is None
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["ratio_first_minibatch_max_dev"] == 0.0
    assert "lora" not in " ".join(LlamaForCausalLM.from_pretrained(tmp_path / "policy").state_dict())


def test_interrupted_run_resumes_to_the_same_state(
    base_model, task, reward, tmp_path, monkeypatch, torch_backend
):
    import fastrlhf.ppo_trainer as trainer

    prompts = task.prompts(16, seed=5)
    full, _ = train_ppo(_ppo_cfg(base_model, tmp_path / "full", steps=4), reward=reward, prompts=prompts)

    real_step = trainer.ppo_step
    calls = {"n": 0}

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "ppo_step", crash_on_fourth)
    cfg = _ppo_cfg(base_model, tmp_path / "resumed", steps=4, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(cfg, reward=reward, prompts=prompts)
    monkeypatch.setattr(trainer, "ppo_step", real_step)
    resumed, _ = train_ppo(cfg, reward=reward, prompts=prompts)
    for (name, a), b in zip(
        full.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_interrupted_sft_resumes_to_the_same_state(base_model, task, tmp_path, monkeypatch, torch_backend):
    import fastrlhf.training as training

    examples = [SFTExample(r["prompt"], r["completion"]) for r in task.sft_records(32, seed=1)]

    def run(out: Path):
        optim = OptimConfig(lr=1e-3, warmup_steps=3)
        cfg = SFTConfig(model=str(base_model), out=str(out), batch_size=8, micro_batch_size=4, epochs=2,
                        optim=optim, model_config=CPU, save_every=3)  # fmt: skip
        return train_sft(cfg, examples=examples)[0]

    full = run(tmp_path / "full")
    real_step, calls = training.optimizer_step, {"n": 0}

    def crash_on_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_step(*args, **kwargs)

    monkeypatch.setattr(training, "optimizer_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(training, "optimizer_step", real_step)
    resumed = run(tmp_path / "resumed")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_nan_loss_stops_with_last_good_checkpoint_intact(
    base_model, task, reward, tmp_path, monkeypatch, torch_backend
):
    import fastrlhf.ppo as ppo

    real_loss = ppo.ppo_loss
    calls = {"n": 0}

    def nan_from_step_three(*args, **kwargs):
        calls["n"] += 1
        pg, vf, stats = real_loss(*args, **kwargs)
        return (pg * float("nan"), vf, stats) if calls["n"] > 2 * 8 else (pg, vf, stats)

    monkeypatch.setattr(ppo, "ppo_loss", nan_from_step_three)
    cfg = _ppo_cfg(base_model, tmp_path, steps=4, save_every=2)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 2; .*step-000002"):
        train_ppo(cfg, reward=reward, prompts=task.prompts(16, seed=5))
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last is not None and last.name == "step-000002"


# ----------------------------------------------------------------------------------------- configuration


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text(
        "kl_coef: 0.1\nkl_target: 6\npolicy_optim:\n  lr: 2.0e-6\nmodel_config:\n  lora_rank: 8\n"
    )
    cfg = load_config(PPOConfig, path, {"steps": "7", "model_config.dtype": "bfloat16", "kl_target": "none"})
    assert (cfg.kl_coef, cfg.kl_target, cfg.steps) == (0.1, None, 7)
    assert (cfg.policy_optim.lr, cfg.model_config.lora_rank, cfg.model_config.dtype) == (2e-6, 8, "bfloat16")
    with pytest.raises(ValueError, match="unknown option 'kl_coeff'"):
        load_config(PPOConfig, None, {"kl_coeff": 1})
    with pytest.raises(ValueError, match="steps: expected int"):
        load_config(PPOConfig, None, {"steps": "many"})


# ------------------------------------------------------------------------------- CLI, pipeline, PPO-ptx


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pipeline_with_a_second_round_and_ptx_through_the_cli(base_model, task, tmp_path, torch_backend):
    """sft -> rm -> ppo (with PPO-ptx) -> sample for labeling -> rm -> ppo, all from YAML + flags."""
    from fastrlhf.cli import main

    demos = _write_jsonl(tmp_path / "demos.jsonl", task.sft_records(32, seed=1))
    ranks = _write_jsonl(tmp_path / "ranks.jsonl", task.ranking_records(20, 3, seed=2))
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", task.prompt_records(16, seed=3))
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"out: {tmp_path / 'run'}\n"
        f"sft: {{model: {base_model}, data: {demos}, batch_size: 8, micro_batch_size: 4}}\n"
        f"rm: {{data: {ranks}, batch_size: 4, micro_batch_size: 2, eval_fraction: 0.2}}\n"
        f"ppo: {{prompts: {prompts}, steps: 1, rollout_batch_size: 8, num_minibatches: 2,\n"
        f"      micro_batch_size: 4,\n"
        f"      max_new_tokens: 6, ptx_coef: 0.5, ptx_data: {demos}}}\n"
    )
    dtype = ["--sft.model_config.dtype", "float32", "--rm.model_config.dtype", "float32"]
    dtype += ["--ppo.model_config.dtype", "float32"]
    assert main(["pipeline", "--config", str(config), *dtype]) == 0
    outputs = json.loads((tmp_path / "run" / "outputs.json").read_text())
    assert set(outputs) == {"sft", "rm-1", "ppo-1"}
    record = json.loads((tmp_path / "run" / "ppo-1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["ptx_loss"]) and record["ptx_loss"] > 0

    to_rank = tmp_path / "to_rank.jsonl"
    assert main(["sample", "--model", outputs["ppo-1"], "--prompts", str(prompts), "--out", str(to_rank),
                 "--k", "3", "--max_new_tokens", "6"]) == 0  # fmt: skip
    labeled = []
    for line in to_rank.read_text().splitlines():
        record = json.loads(line)
        assert len(record["responses"]) == 3
        labeled.append(record | {"ranking": task.rank(record["prompt"], record["responses"])})
    round2 = _write_jsonl(tmp_path / "round2.jsonl", labeled)
    args = ["pipeline", "--config", str(config), *dtype, "--skip_sft", "true", "--sft.model", outputs["sft"]]
    assert main([*args, "--more-rankings", str(round2)]) == 0
    outputs = json.loads((tmp_path / "run" / "outputs.json").read_text())
    assert {"rm-2", "ppo-2"} <= set(outputs)
