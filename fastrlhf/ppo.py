"""PPO with a critic and a per-token KL penalty to the SFT model (InstructGPT), one step top to bottom.

    rollout -> score -> evaluate (logp, ref_logp, values) -> advantages -> minibatch updates

Each phase is one function below with its formula in the docstring; ``ppo_step`` chains them and ``train_ppo``
(in ``fastrlhf.ppo_trainer``) sets up the models and loops. The numbered details refer to
"The N Implementation Details of RLHF with PPO" (Huang et al.).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastrlhf import distributed
from fastrlhf.checkpoint import check_finite
from fastrlhf.config import CRITIC_FREE, PPOConfig
from fastrlhf.data import pad_left
from fastrlhf.kernels import (
    gae,
    group_advantages,
    kl_penalty,
    ppo_advantages,
    shape_rewards,
)
from fastrlhf.models import (
    PhaseMemory,
    ValueHead,
    adapters_disabled,
    hidden_states,
    on_device,
    response_logprobs,
    sequence_scores,
    token_values,
)
from fastrlhf.rollout import SamplingParams, engine_for
from fastrlhf.training import optimizer_step

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
"""A rule-based or verifiable reward: (prompts, completions) -> one score per completion."""


def suppressed_ids(tok) -> tuple[int, ...]:
    """Ids the rollout never samples: an added pad token's embedding row is untrained. Every log-prob of a
    response (old, reference, updated) is taken over the same renormalized distribution (detail 4's rule
    for the temperature, applied to the suppressed ids): ``models.response_logprobs(suppress_ids=...)``."""
    return (tok.pad_token_id,)


@dataclass
class PPOModels:
    """Everything a PPO step touches. ``reference`` is None for a LoRA policy (adapters disabled instead);
    ``critic`` is None when ``value_head`` sits on the policy's trunk."""

    policy: nn.Module
    tokenizer: object
    reward: nn.Module | RewardFn
    reference: nn.Module | None = None
    critic: nn.Module | None = None
    value_head: ValueHead | None = None


@dataclass
class Rollout:
    """A batch of sampled responses. Sequences are [left-padded prompt | right-padded response]."""

    prompts: list[str]
    completions: list[str]
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    response_start: int  # P
    response_mask: torch.Tensor  # [B, R]: response tokens up to and including EOS
    has_eos: torch.Tensor  # [B]
    scores: torch.Tensor | None = None  # [B]
    logp: torch.Tensor | None = None  # [B, R] policy log-probs at sampling time (the "old" log-probs)
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    generation_stats: dict[str, float] = field(default_factory=dict)  # the rollout engine's throughput, cache


@dataclass
class KLController:
    """Fixed beta, or the adaptive controller of Ziegler et al. (2019) when ``target`` is set:

    e = clip((KL - target) / target, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon)
    with KL the mean per-sequence KL of the batch and n its number of episodes.
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_episodes: int) -> None:
        if self.target is None:
            return
        error = min(max((kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon


@torch.no_grad()
def rollout(
    policy: nn.Module, tok, prompts: list[str], prompt_ids: list[list[int]], cfg: PPOConfig
) -> Rollout:
    """Sample one response per prompt at ``temperature`` / ``top_p`` (detail 3: prompts left-padded) with the
    engine ``cfg.rollout`` selects (``fastrlhf.rollout``: hf generate, or a static KV cache + CUDA graphs).

    Responses are truncated after their first EOS (detail 5): later tokens become padding and leave the mask.
    """
    device = next(policy.parameters()).device
    ids, mask = (t.to(device) for t in pad_left(prompt_ids, tok.pad_token_id))
    policy.eval()
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        suppress_ids=suppressed_ids(tok),
    )
    with distributed.gathered(policy):  # under FSDP2: weights gathered once for the whole decode
        engine = engine_for(policy, distributed.rollout_config(cfg.rollout))
        generation = engine.generate(policy, ids, mask, params)
    response = generation.tokens
    is_eos = response == tok.eos_token_id
    has_eos = is_eos.any(-1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(-1), response.shape[1])
    positions = torch.arange(response.shape[1], device=device)
    response_mask = positions[None, :] <= first_eos[:, None]
    response = response.masked_fill(~response_mask, tok.pad_token_id)
    completions = tok.batch_decode(response, skip_special_tokens=True)
    n_tokens = float(response_mask.sum())
    return Rollout(
        prompts=prompts,
        completions=completions,
        input_ids=torch.cat([ids, response], 1),
        attention_mask=torch.cat([mask, response_mask.long()], 1),
        response_start=ids.shape[1],
        response_mask=response_mask,
        has_eos=has_eos,
        generation_stats={
            "rollout/tokens_per_second": n_tokens / max(generation.seconds, 1e-9),
            "rollout/kv_cache_gib": generation.kv_cache_bytes / 2**30,
            **generation.stats,
        },
    )


@torch.no_grad()
def score(models: PPOModels, batch: Rollout, cfg: PPOConfig) -> torch.Tensor:
    """Sequence scores [B]: the reward model read at the last real token of the truncated response (detail 6),
    or the reward function on the decoded texts; minus ``missing_eos_penalty`` where no EOS was produced."""
    device = batch.input_ids.device
    if isinstance(models.reward, nn.Module):
        with on_device(models.reward, device, cfg.offload_frozen) as rm:
            chunks = [
                sequence_scores(rm, batch.input_ids[rows], batch.attention_mask[rows])
                for rows in torch.arange(len(batch.prompts), device=device).split(cfg.micro_batch_size)
            ]
        distributed.reshard(models.reward)  # a sharded frozen model frees its gathered root after use
        scores = torch.cat(chunks)
    else:
        scores = torch.tensor(
            [float(s) for s in models.reward(batch.prompts, batch.completions)], device=device
        )
        if scores.shape != (len(batch.prompts),):
            raise ValueError(
                f"reward function returned {scores.numel()} scores for {len(batch.prompts)} texts"
            )
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~batch.has_eos).float()
    return scores


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass; ``scale`` times the incoming gradient in the backward pass."""
    if scale == 1.0:
        return x
    return x.detach() if scale == 0.0 else x * scale + x.detach() * (1.0 - scale)


def policy_forward(
    models: PPOModels,
    ids: torch.Tensor,
    mask: torch.Tensor,
    start: int,
    temperature: float,
    *,
    entropy=False,
    trunk_grad_scale: float = 1.0,
):
    """Log-probs [b, R] (and entropy) of the response tokens, and values [b, R] when the value head shares
    the policy's trunk (one trunk pass for both). Log-probs divide the logits by the sampling temperature
    (detail 4) and leave out the ids the sampler suppresses. ``trunk_grad_scale`` scales the value gradient
    flowing from the head into the trunk."""
    hidden = hidden_states(models.policy, ids, mask)
    out = response_logprobs(
        models.policy, ids, mask, start, temperature=temperature, return_entropy=entropy, hidden=hidden,
        suppress_ids=suppressed_ids(models.tokenizer),
    )  # fmt: skip
    values = None
    if models.value_head is not None:
        values = models.value_head(scale_gradient(hidden[:, start - 1 : -1], trunk_grad_scale))
    return out, values


def critic_values(models: PPOModels, ids: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    return token_values(models.critic, ids, mask, start)


@torch.no_grad()
def evaluate(models: PPOModels, batch: Rollout, order: torch.Tensor, cfg: PPOConfig) -> None:
    """Fill in logp (old log-probs), ref_logp, values and entropy.

    The micro-batches follow ``order``, the first update epoch's shuffle, so the first minibatch of the update
    recomputes exactly these numbers: its ratio is exactly 1 (detail 12), not 1 up to batch-shape noise.
    """
    n, r = batch.response_mask.shape
    device = batch.input_ids.device
    logp = torch.zeros(n, r, device=device)
    ref_logp, values, entropy = torch.zeros_like(logp), torch.zeros_like(logp), torch.zeros_like(logp)
    start, temp = batch.response_start, cfg.temperature
    suppress = suppressed_ids(models.tokenizer)
    models.policy.eval()
    reference = models.reference
    with on_device(reference, device, cfg.offload_frozen and reference is not None):
        for rows in order.split(cfg.micro_batch_size):
            ids, mask = batch.input_ids[rows], batch.attention_mask[rows]
            (logp[rows], entropy[rows]), head_values = policy_forward(
                models, ids, mask, start, temp, entropy=True
            )
            if reference is None:
                with adapters_disabled(models.policy):
                    ref_logp[rows] = response_logprobs(
                        models.policy, ids, mask, start, temperature=temp, suppress_ids=suppress
                    )
            else:
                ref_logp[rows] = response_logprobs(
                    reference, ids, mask, start, temperature=temp, suppress_ids=suppress
                )
            if head_values is not None:
                values[rows] = head_values
            elif models.critic is not None:
                values[rows] = critic_values(models, ids, mask, start)
    distributed.reshard(reference)
    batch.logp, batch.ref_logp, batch.values, batch.entropy = logp, ref_logp, values, entropy


@torch.no_grad()
def compute_advantages(batch: Rollout, kl: KLController, cfg: PPOConfig) -> None:
    """Advantages by ``cfg.advantage_estimator``: GAE with the critic (below) or a critic-free estimator."""
    if cfg.advantage_estimator in CRITIC_FREE:
        critic_free_advantages(batch, kl, cfg)
    else:
        gae_advantages(batch, kl, cfg)


def critic_free_advantages(batch: Rollout, kl: KLController, cfg: PPOConfig) -> None:
    """No critic (values and returns are 0, so no value loss); per-token KL reward r_t = -beta * kl_t, plus
    the score at the last token:

    reinforce++: A_t = sum_{k >= t} gamma^{k-t} r_k, whitened over the batch's response tokens (Hu 2025);
    grpo / dr_grpo / rloo: the sequence return G = score - beta * sum_t kl_t, turned into one advantage per
    sequence by ``fastrlhf.kernels.group_advantages`` over the group_size samples of its prompt (contiguous
    rows), and given to every token of the response.

    Fixed points. With k1 (kl_t = log pi - log pi_ref of the sampled token) in the reward, each estimator is
    REINFORCE on E[r] - beta * KL(pi || pi_ref) with a baseline, so pi* ~ pi_ref exp(r / beta) is its fixed
    point. At pi* the sequence return r - beta * log(pi / pi_ref) equals beta * log Z for every response:
    GRPO's, Dr. GRPO's and RLOO's advantages are then exactly 0. REINFORCE++'s return-to-go leaves out the
    prefix's log-ratio, so at pi* its advantage at a state is an offset (beta times that prefix log-ratio,
    minus the batch mean): zero-mean under the state's own sampling, hence unbiased, but PPO's clipped
    surrogate, reused over several minibatches and epochs, counts the tokens a batch did not sample as
    advantage 0 and moves mass onto them where the offset is negative. Run the critic-free estimators
    on-policy, as their papers do (ppo_epochs=1, num_minibatches=1): tests/test_closed_form.py measures
    gaps of 0.01-0.5% so (4 seeds each); with 4 x 4 updates per rollout REINFORCE++ missed pi* at 2 of 3
    seeds (13%, 66%) and GRPO at 1 of 3 (8%).

    A KL-as-loss variant is not offered. GRPO's original adds beta * k3(pi_theta, pi_ref) on the sampled
    tokens to the loss, with advantages from the score alone. Its gradient per state is pi - pi_ref in the
    logits, that of KL(pi_ref || pi), so its fixed point is pi(y) = beta * pi_ref(y) / (lambda - r(y)) on one
    token (lambda normalizes), and on longer responses it also ignores the KL of later tokens: 11% below
    the optimum on the closed-form two-token task at beta 0.2 (k2 as the loss: 11% too).
    """
    mask = batch.response_mask
    zeros = torch.zeros_like(batch.logp)
    if cfg.advantage_estimator == "reinforce++":
        out = ppo_advantages(
            batch.scores, batch.logp, batch.ref_logp, zeros, mask, kl_coef=kl.value,
            estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=1.0, whiten=not distributed.active(),
        )  # fmt: skip
        out = distributed.whiten_advantages(out, mask)  # under torchrun: over every rank's tokens
        # out.returns is the return-to-go: a value target, and there is no critic to train on it.
        batch.advantages, batch.returns, batch.rewards, batch.kl = out.advantages, zeros, out.rewards, out.kl
        return
    rewards = shape_rewards(
        batch.scores, batch.logp, batch.ref_logp, mask, kl_coef=kl.value, estimator=cfg.kl_estimator
    )
    sequence_return = (rewards * mask).sum(-1)
    adv = group_advantages(sequence_return, cfg.group_size, estimator=cfg.advantage_estimator)
    batch.advantages = adv[:, None] * mask
    batch.returns, batch.rewards = zeros, rewards
    batch.kl = kl_penalty(batch.logp, batch.ref_logp, estimator=cfg.kl_estimator) * mask


def gae_advantages(batch: Rollout, kl: KLController, cfg: PPOConfig) -> None:
    """Per-token rewards, GAE and whitened advantages, fused in ``fastrlhf.kernels.ppo_advantages``:

    r_t = -beta * kl_t  (+ score at the last response token);   kl_t = estimator(logp_t - ref_logp_t)
    delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1};   R_t = A_t + V_t
    A <- (A - mean(A)) / sqrt(var(A) + 1e-8) over the response tokens of the batch (detail 9).
    With ``whiten_rewards`` the shaped rewards are scaled to unit variance first (mean kept), then GAE runs.
    """
    mask = batch.response_mask
    if cfg.whiten_rewards:
        rewards = shape_rewards(
            batch.scores, batch.logp, batch.ref_logp, mask, kl_coef=kl.value, estimator=cfg.kl_estimator
        )
        rewards = distributed.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, batch.values, mask, gamma=cfg.gamma, lam=cfg.lam)
        batch.advantages = distributed.masked_whiten(advantages, mask)
        batch.returns, batch.rewards = returns, rewards
        batch.kl = kl_penalty(batch.logp, batch.ref_logp, estimator=cfg.kl_estimator) * mask
        return
    out = ppo_advantages(
        batch.scores,
        batch.logp,
        batch.ref_logp,
        batch.values,
        mask,
        kl_coef=kl.value,
        estimator=cfg.kl_estimator,
        gamma=cfg.gamma,
        lam=cfg.lam,
        whiten=not distributed.active(),
    )
    out = distributed.whiten_advantages(out, mask)  # under torchrun: over every rank's tokens
    batch.advantages, batch.returns, batch.rewards, batch.kl = (
        out.advantages,
        out.returns,
        out.rewards,
        out.kl,
    )


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cfg: PPOConfig,
    n_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate and clipped value loss, summed over tokens and divided by the minibatch's token count
    ``n_tokens`` (so micro-batches accumulate to the minibatch's token mean):

    rho = exp(logp - old_logp);   L_pg = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))
    V_clip = V_old + clip(V - V_old, -eps_v, eps_v);   L_v = 0.5 * max((V - R)^2, (V_clip - R)^2)
    """
    m = mask.float()
    # Padding after EOS is never trained, so its log-ratio may drift anywhere; pin it to 0 so exp() cannot
    # overflow into inf * 0 = NaN.
    log_ratio = torch.where(mask.bool(), logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
    v_clipped = old_values + (values - old_values).clamp(-cfg.value_clip_range, cfg.value_clip_range)
    v_losses = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    pg_loss = (pg * m).sum() / n_tokens
    v_loss = 0.5 * (v_losses * m).sum() / n_tokens
    with torch.no_grad():
        stats = {
            "clipfrac": (((ratio - 1).abs() > cfg.clip_range).float() * m).sum(),
            "approx_kl": (((ratio - 1) - log_ratio) * m).sum(),
            "ratio": (ratio * m).sum(),
            "ratio_sq": (ratio**2 * m).sum(),
            "ratio_max_dev": (ratio - 1).abs().max(),
            "value_clipfrac": (((values - returns) ** 2 < (v_clipped - returns) ** 2).float() * m).sum(),
        }
    return pg_loss, v_loss, stats


@dataclass
class Trainables:
    """Optimizers of one PPO run (the critic's is None when the value head shares the policy's)."""

    policy_optimizer: torch.optim.Optimizer
    policy_scheduler: torch.optim.lr_scheduler.LRScheduler
    policy_params: list[nn.Parameter]
    critic_optimizer: torch.optim.Optimizer | None = None
    critic_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    critic_params: list[nn.Parameter] = field(default_factory=list)
    ptx_batches: object | None = None  # iterator of dicts(input_ids, attention_mask, loss_mask)

    def zero_grad(self) -> None:
        """Drop the accumulated gradients without stepping (an early-stopped minibatch)."""
        self.policy_optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)

    def step(self, cfg: PPOConfig, step: int) -> None:
        """One optimizer step of the policy (with its value head) and of the separate critic, if any."""
        policy_clip, critic_clip = cfg.policy_optim.max_grad_norm, cfg.critic_optim.max_grad_norm
        optimizer_step(self.policy_optimizer, self.policy_scheduler, self.policy_params, policy_clip, step)
        if self.critic_optimizer is not None:
            optimizer_step(
                self.critic_optimizer, self.critic_scheduler, self.critic_params, critic_clip, step
            )


def ptx_loss(models: PPOModels, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """PPO-ptx: the mean negative log-likelihood of the scored tokens of a pretraining/SFT batch."""
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    logp = response_logprobs(models.policy, ids, mask, 1)
    target_mask = loss_mask[:, 1:].float()
    return -(logp * target_mask).sum() / target_mask.sum().clamp(min=1)


def update(
    models: PPOModels, batch: Rollout, order: torch.Tensor, opt: Trainables, cfg: PPOConfig, step: int
) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollout in ``num_minibatches`` shuffled minibatches, each split into
    micro-batches whose gradients accumulate. Epoch 0 uses ``order`` (the order ``evaluate`` used).

    Early stop (``target_kl``): approx_kl = mean((rho - 1) - log rho) of a minibatch, measured in its forward
    before its optimizer step; above the target, that gradient is dropped and the step's remaining updates
    are skipped (as Stable-Baselines3 does), so one bad update cannot carry the policy far from the rollout.
    The first minibatch has rho = 1 exactly, so at least one update always runs.

    A NaN or inf loss or gradient stops the run before any optimizer step can write it into the weights.
    """
    n = len(batch.prompts)
    device = batch.input_ids.device
    start, temp = batch.response_start, cfg.temperature
    sums: dict[str, torch.Tensor] = {}
    total_tokens = 0
    first_minibatch_dev = 0.0
    updates_done, early_stopped = 0, False
    models.policy.train()
    if models.critic is not None:
        models.critic.train()
    for epoch in range(cfg.ppo_epochs):
        if early_stopped:
            break
        perm = order if epoch == 0 else torch.randperm(n, device=device)
        for mb_index, minibatch in enumerate(perm.chunk(cfg.num_minibatches)):
            # The minibatch's token count over all ranks: each rank's loss is its share of the global one.
            n_tokens = max(int(distributed.sum(batch.response_mask[minibatch].sum())), 1)
            max_dev = torch.zeros((), device=device)
            minibatch_kl = torch.zeros((), device=device)
            for rows in minibatch.split(cfg.micro_batch_size):
                ids, mask = batch.input_ids[rows], batch.attention_mask[rows]
                logp, head_values = policy_forward(
                    models, ids, mask, start, temp, trunk_grad_scale=cfg.value_trunk_grad_scale
                )
                if head_values is not None:
                    values = head_values
                elif models.critic is not None:
                    values = critic_values(models, ids, mask, start)
                else:  # critic-free: no value loss to train
                    values = batch.values[rows]
                pg_loss, v_loss, stats = ppo_loss(
                    logp, batch.logp[rows], batch.advantages[rows], values, batch.values[rows],
                    batch.returns[rows], batch.response_mask[rows], cfg, n_tokens,
                )  # fmt: skip
                (pg_loss + cfg.vf_coef * v_loss).backward()
                max_dev = torch.maximum(max_dev, stats.pop("ratio_max_dev"))
                minibatch_kl = minibatch_kl + stats["approx_kl"]
                stats["pg_loss"] = pg_loss.detach() * n_tokens
                stats["value_loss"] = v_loss.detach() * n_tokens
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0) + v
            if cfg.target_kl is not None and float(distributed.sum(minibatch_kl)) / n_tokens > cfg.target_kl:
                early_stopped = True
                opt.zero_grad()
                total_tokens += n_tokens  # its statistics stay in the logged means
                break
            if opt.ptx_batches is not None and cfg.ptx_coef > 0:
                ptx = ptx_loss(models, {k: v.to(device) for k, v in next(opt.ptx_batches).items()})
                share = 1.0 / distributed.world().size  # the ranks' ptx batches average (gradients sum)
                (cfg.ptx_coef * share * ptx).backward()
                sums["ptx_loss"] = sums.get("ptx_loss", 0) + share * ptx.detach() * n_tokens
            loss_sum = sums["pg_loss"] + sums["value_loss"] + sums.get("ptx_loss", 0)
            check_finite("ppo loss", distributed.sum(loss_sum), step)  # every rank stops together
            opt.step(cfg, step)
            if epoch == 0 and mb_index == 0:
                first_minibatch_dev = float(distributed.max(max_dev))
            total_tokens += n_tokens
            updates_done += 1
    if distributed.active():
        sums = distributed.metrics_sum(sums)
    out = {k: float(v) / total_tokens for k, v in sums.items()}
    out["ratio_var"] = out.pop("ratio_sq") - out["ratio"] ** 2
    out["ratio_first_minibatch_max_dev"] = first_minibatch_dev
    out["early_stopped"] = float(early_stopped)
    out["update_fraction"] = updates_done / (cfg.ppo_epochs * cfg.num_minibatches)
    return out


def rollout_stats(batch: Rollout, kl: KLController) -> dict[str, float]:
    """Per-step statistics of a scored and evaluated rollout (detail 14)."""
    mask = batch.response_mask
    m = mask.float()
    seq_kl = (batch.kl * m).sum(-1)
    returns, values = batch.returns, batch.values
    dist = distributed  # every statistic is over all ranks' rollouts (the local one in one process)
    counted = dist.sum(m.sum())
    var_returns = float(dist.masked_var(returns, mask)) if counted > 1 else float("nan")
    residual_var = float(dist.masked_var(returns - values, mask)) if counted > 1 else float("nan")
    return {
        "reward": float(dist.mean(batch.scores)),
        "reward_std": float(dist.std(batch.scores)) if dist.count(len(batch.scores)) > 1 else 0.0,
        "non_score_reward": float(-kl.value * dist.mean(seq_kl)),
        "kl": float(dist.mean(seq_kl)),
        "kl_coef": kl.value,
        "entropy": float(dist.masked_mean(batch.entropy, mask)),
        "explained_variance": 1.0 - residual_var / var_returns if var_returns > 0 else float("nan"),
        "value_mean": float(dist.masked_mean(values, mask)),
        "eos_rate": float(dist.mean(batch.has_eos.float())),
        "response_length": float(dist.mean(m.sum(-1))),
    }


def ppo_step(
    models: PPOModels,
    prompts: list[str],
    prompt_ids: list[list[int]],
    opt: Trainables,
    kl: KLController,
    cfg: PPOConfig,
    step: int,
) -> tuple[dict[str, float], Rollout]:
    """One PPO iteration: rollout, score, evaluate, advantages, update; returns the metrics and rollout."""
    device = next(models.policy.parameters()).device
    memory = PhaseMemory(device)
    timings: dict[str, float] = {}

    def phase(name: str, fn, *args):
        memory.start()
        t0 = time.perf_counter()
        result = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[f"time/{name}"] = time.perf_counter() - t0
        timings[f"memory_gib/{name}"] = memory.peak_gib()
        return result

    batch = phase("generate", rollout, models.policy, models.tokenizer, prompts, prompt_ids, cfg)
    batch.scores = phase("score", score, models, batch, cfg)
    order = torch.randperm(len(prompts), device=device)
    phase("evaluate", evaluate, models, batch, order, cfg)
    phase("advantages", compute_advantages, batch, kl, cfg)
    stats = rollout_stats(batch, kl)
    stats |= phase("update", update, models, batch, order, opt, cfg, step)
    kl.update(stats["kl"], distributed.count(len(prompts)))  # the global mean KL and episode count
    timings["time/step"] = sum(v for k, v in timings.items() if k.startswith("time/"))
    timings["memory_gib/step"] = max(v for k, v in timings.items() if k.startswith("memory_gib/"))
    stats |= distributed.job_costs(timings | batch.generation_stats)  # over all ranks, under torchrun
    stats["tokens_per_second"] = distributed.count(int(batch.attention_mask.sum())) / stats["time/step"]
    if not math.isfinite(stats["reward"]):
        raise FloatingPointError(f"reward is {stats['reward']} at step {step}")
    return stats, batch
