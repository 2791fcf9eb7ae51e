"""Stage 3 driver: build the PPO models from a config, then loop ``ppo_step`` with logging and checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fastrlhf import distributed
from fastrlhf.checkpoint import load_checkpoint, save_checkpoint
from fastrlhf.config import CRITIC_FREE, GROUPED, PPOConfig
from fastrlhf.data import Prompt, encode_prompt, filter_long_prompts, load_prompts, load_sft, sft_batch
from fastrlhf.metrics import MetricsLogger
from fastrlhf.models import (
    ValueHead,
    default_device,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    unwrap,
)
from fastrlhf.optim import make_optimizer, trainable_parameters, warmup_schedule
from fastrlhf.ppo import (
    KLController,
    PPOModels,
    RewardFn,
    Trainables,
    ppo_step,
    rollout,
)
from fastrlhf.sft import encode_sft
from fastrlhf.training import (
    StepBatches,
    finish_run,
    log,
    micro_batches,
    naming_last_checkpoint,
    save_model,
    seed_everything,
    shuffled_batches,
)

ExtraMetrics = Callable[[list[str], list[str]], dict[str, float]]
"""Called with each rollout's prompts and completions; its numbers are logged with the step (e.g. a gold
reward in the demo)."""


def build_models(cfg: PPOConfig, reward: RewardFn | None, device: torch.device) -> PPOModels:
    """Policy (trainable, from the SFT model), reference (frozen SFT, or the LoRA policy's base), critic
    (from the RM, or a value head on the policy's trunk) and reward (the RM, or ``reward``)."""
    mc = cfg.model_config
    frozen_mc = dataclasses.replace(mc, lora_rank=0, gradient_checkpointing=False)
    frozen_device = torch.device("cpu") if cfg.offload_frozen else device
    tokenizer = load_tokenizer(cfg.policy, mc)
    policy = load_causal_lm(cfg.policy, mc, device, tokenizer)
    reference = None
    if mc.lora_rank == 0:
        reference_path = cfg.reference or cfg.policy
        reference = load_causal_lm(reference_path, frozen_mc, frozen_device, tokenizer, trainable=False)
    if reward is None:
        if not cfg.reward_model:
            raise ValueError("reward_model is empty: give a reward model directory or a reward function")
        reward = load_scalar_model(cfg.reward_model, frozen_mc, frozen_device, tokenizer, trainable=False)
    critic = value_head = None
    if cfg.advantage_estimator in CRITIC_FREE:
        pass  # no critic and no value head: a whole model (or head) less in memory
    elif cfg.critic == "reward_model":
        if not cfg.reward_model:
            raise ValueError(
                'critic="reward_model" needs reward_model; with a reward function use "policy_head"'
            )
        critic = load_scalar_model(cfg.reward_model, mc, device, tokenizer)
    elif cfg.critic == "policy_head":
        value_head = ValueHead(unwrap(policy).config.hidden_size).to(device)
    else:
        raise ValueError(f'critic must be "reward_model" or "policy_head", got {cfg.critic!r}')
    return PPOModels(policy, tokenizer, reward, reference, critic, value_head)


def build_trainables(models: PPOModels, cfg: PPOConfig, device: torch.device) -> Trainables:
    mc = cfg.model_config
    policy_modules = [models.policy] + ([models.value_head] if models.value_head is not None else [])
    policy_params = trainable_parameters(*policy_modules)
    policy_opt = make_optimizer(policy_params, cfg.policy_optim, mc, device)
    opt = Trainables(policy_opt, warmup_schedule(policy_opt, cfg.policy_optim.warmup_steps), policy_params)
    if models.critic is not None:
        opt.critic_params = trainable_parameters(models.critic)
        opt.critic_optimizer = make_optimizer(opt.critic_params, cfg.critic_optim, mc, device)
        opt.critic_scheduler = warmup_schedule(opt.critic_optimizer, cfg.critic_optim.warmup_steps)
    if cfg.ptx_coef > 0:  # ptx_data is required then (PPOConfig.validate)
        data = encode_sft(models.tokenizer, load_sft(cfg.ptx_data), 1 << 30, cfg.ptx_data)
        seed = cfg.seed + distributed.world().rank  # each rank its own ptx batches
        opt.ptx_batches = _cycle_batches(data, cfg.micro_batch_size, models.tokenizer.pad_token_id, seed)
    return opt


def _check_split(cfg: PPOConfig, group: int) -> None:
    """Under torchrun every rank gets rollout_batch_size / world rollouts (whole groups) and splits them
    into num_minibatches local minibatches of the same size on every rank."""
    w = distributed.world().size
    if w > 1 and (
        cfg.rollout_batch_size % (w * group) or (cfg.rollout_batch_size // w) % cfg.num_minibatches
    ):
        raise ValueError(
            f"rollout_batch_size ({cfg.rollout_batch_size}) must split over {w} processes into whole groups "
            f"(group_size {group}) and then into num_minibatches ({cfg.num_minibatches}) equal parts"
        )


def trainable_footprint(models: PPOModels, opt: Trainables, *, parameters: bool = True) -> dict[str, float]:
    """What training holds beyond the frozen models: trainable parameter counts (``params/``: policy, value
    head, critic, total) and, with ``parameters=False``, the GiB of the trained weights and of the optimizers'
    state (``memory_gib/trainable_weights``, ``memory_gib/optimizer_state``; the state exists after the first
    update). A critic-free estimator shows 0 for the value head and the critic: one model less to train."""
    if not parameters:
        weights = sum(p.numel() * p.element_size() for p in (*opt.policy_params, *opt.critic_params))
        state = sum(
            t.numel() * t.element_size()
            for o in (opt.policy_optimizer, opt.critic_optimizer)
            if o is not None
            for per_param in o.state.values()
            for t in per_param.values()
            if isinstance(t, torch.Tensor)
        )
        return {"memory_gib/trainable_weights": weights / 2**30, "memory_gib/optimizer_state": state / 2**30}
    head = {id(p) for p in models.value_head.parameters()} if models.value_head is not None else set()
    value_head = sum(p.numel() for p in opt.policy_params if id(p) in head)
    policy = sum(p.numel() for p in opt.policy_params) - value_head
    critic = sum(p.numel() for p in opt.critic_params)
    counts = {"policy": policy, "value_head": value_head, "critic": critic}
    counts["total"] = policy + value_head + critic
    return {f"params/{k}": float(v) for k, v in counts.items()}


def _cycle_batches(data, size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        for batch in shuffled_batches(data, min(size, len(data)), seed=seed, epoch=epoch):
            yield sft_batch(batch, pad_id)
        epoch += 1


def _checkpoint_parts(models: PPOModels, opt: Trainables):
    modules = {"policy": models.policy}
    optimizers = {"policy": opt.policy_optimizer}
    if models.value_head is not None:
        modules["value_head"] = models.value_head
    if models.critic is not None:
        modules["critic"] = models.critic
        optimizers["critic"] = opt.critic_optimizer
    return modules, optimizers


def _scheduler_states(opt: Trainables) -> dict:
    states = {"policy": opt.policy_scheduler.state_dict()}
    if opt.critic_scheduler is not None:
        states["critic"] = opt.critic_scheduler.state_dict()
    return states


def train_ppo(
    cfg: PPOConfig,
    *,
    reward: RewardFn | None = None,
    prompts: list[Prompt] | None = None,
    extra_metrics: ExtraMetrics | None = None,
    logger: MetricsLogger | None = None,
) -> tuple[PPOModels, Path]:
    """Run PPO; returns the models and the output directory (``policy/``, ``critic/``, metrics, curves).

    ``reward`` replaces the reward model with a Python callable; ``prompts`` replaces ``cfg.prompts``.
    An interrupted run resumes from ``out/checkpoints`` when started again with the same config.
    """
    # Every option is checked before anything loads; a reward function or in-memory prompts stand in for
    # reward_model or prompts (the critic still needs reward_model unless it is the policy's own head).
    critic_from_rm = cfg.advantage_estimator not in CRITIC_FREE and cfg.critic == "reward_model"
    given = ("reward_model",) if reward is not None and not critic_from_rm else ()
    cfg.validate(provided=given + (("prompts",) if prompts is not None else ()))
    distributed.init()  # under torchrun: join the job (a no-op in one process)
    seed_everything(cfg.seed)
    group = cfg.group_size if cfg.advantage_estimator in GROUPED else 1
    _check_split(cfg, group)
    if cfg.advantage_estimator == "reinforce++" and cfg.ppo_epochs * cfg.num_minibatches > 1:
        log.warning(
            "reinforce++ with %d updates per rollout: its advantages are not zero-mean per state, and reused "
            "clipped updates then move mass onto unsampled tokens (13-66%% off the optimum at 2 of 3 seeds "
            "in the closed-form tests); ppo_epochs=1 num_minibatches=1 reaches it (fastrlhf.ppo docs)",
            cfg.ppo_epochs * cfg.num_minibatches,
        )
    device = default_device()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if prompts is None:  # bad data fails before the models are loaded
        prompts = load_prompts(cfg.prompts)
    models = build_models(cfg, reward, device)
    models, cfg = distributed.shard_ppo_models(models, cfg)  # FSDP2 under torchrun; as is in one process
    tok = models.tokenizer
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    kept, report = filter_long_prompts(prompt_ids, cfg.max_prompt_len, cfg.prompts or "prompts")
    if report:
        log.warning("%s; they are skipped", report)
    data = [(prompts[i], prompt_ids[i]) for i in kept]
    prompts_per_step = cfg.rollout_batch_size // group
    if len(data) < prompts_per_step:
        raise ValueError(
            f"{len(data)} usable prompts are fewer than the {prompts_per_step} a step needs "
            f"(rollout_batch_size={cfg.rollout_batch_size} / group_size={group})"
        )
    opt = build_trainables(models, cfg, device)
    footprint = trainable_footprint(models, opt)
    log.info(
        "PPO (%s) trains %s parameters: policy %s, value head %s, critic %s; the optimizer state they need "
        "is logged as memory_gib/optimizer_state from the first update on",
        cfg.advantage_estimator,
        *(f"{int(footprint[f'params/{k}']):,}" for k in ("total", "policy", "value_head", "critic")),
    )
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    ckpt_dir = out / "checkpoints"
    modules, optimizers = _checkpoint_parts(models, opt)
    state = load_checkpoint(ckpt_dir, modules=modules, optimizers=optimizers)
    start = 0
    if state is not None:
        start, kl.value = state["step"], state["kl_coef"]
        opt.policy_scheduler.load_state_dict(state["schedulers"]["policy"])
        if opt.critic_scheduler is not None:
            opt.critic_scheduler.load_state_dict(state["schedulers"]["critic"])
        log.info("resumed PPO from step %d", start)
    own_logger = logger is None
    logger = logger or MetricsLogger(out, run_name="ppo", wandb=cfg.wandb)
    batches = StepBatches(data, prompts_per_step, seed=cfg.seed)
    stats: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=start, desc="ppo", disable=None)
    for step in range(start, cfg.steps):
        batch = [item for item in batches[step] for _ in range(group)]  # a group's samples are contiguous
        batch = distributed.local_rows(batch)  # under torchrun: this rank's share of the step's rollouts
        distributed.seed_step(cfg.seed, step)
        texts = [p if isinstance(p, str) else tok.apply_chat_template(p, tokenize=False) for p, _ in batch]
        with naming_last_checkpoint(ckpt_dir):
            stats, rollout = ppo_step(models, texts, [ids for _, ids in batch], opt, kl, cfg, step)
        stats |= footprint | trainable_footprint(models, opt, parameters=False)
        if extra_metrics is not None:
            extra = extra_metrics(rollout.prompts, rollout.completions)
            if distributed.active():  # means of equal shares: the global mean
                extra = {
                    k: float(v) / distributed.world().size for k, v in distributed.metrics_sum(extra).items()
                }
            stats |= extra
        logger.log("ppo", step + 1, stats)
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(
                ckpt_dir,
                step + 1,
                modules=modules,
                optimizers=optimizers,
                state={"step": step + 1, "kl_coef": kl.value, "schedulers": _scheduler_states(opt)},
            )
    bar.close()
    models.policy = save_model(models.policy, tok, out / "policy")
    if models.critic is not None:
        models.critic = save_model(models.critic, tok, out / "critic")
    if own_logger:
        logger.close()
        finish_run(out, {"stage": "ppo", "steps": cfg.steps, "last": stats})
    return models, out


def sample_completions(
    policy: nn.Module, tokenizer, prompts: list[Prompt], cfg: PPOConfig, *, batch_size: int = 64
) -> list[str]:
    """Sample one completion per prompt with the rollout settings of ``cfg`` (for evaluation)."""
    completions: list[str] = []
    for chunk in micro_batches(prompts, batch_size):
        ids = [encode_prompt(tokenizer, p) for p in chunk]
        completions += rollout(policy, tokenizer, list(chunk), ids, cfg).completions
    return completions
