"""Scenarios for tests/test_distributed.py: run under ``torchrun --nproc_per_node 2`` (gloo, CPU) or in one
process (the reference). Each writes what it measured under ``out`` (rank 0 only when distributed).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_support.py SCENARIO JSON
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import LlamaForCausalLM

from fastrlhf import distributed
from fastrlhf.config import ModelConfig, OptimConfig, PPOConfig, RMConfig, SFTConfig
from fastrlhf.data import SFTExample
from fastrlhf.demo_task import DemoTask, build_tokenizer, tiny_llama_config
from fastrlhf.ppo import KLController, Rollout, compute_advantages, evaluate, rollout_stats, score, update
from fastrlhf.ppo_trainer import build_models, build_trainables

CPU = ModelConfig(dtype="float32", optimizer="adamw")


def make_base(path: Path, *, tied: bool = False, layers: int = 2) -> Path:
    torch.manual_seed(0)
    tok = build_tokenizer()
    config = tiny_llama_config(tok, hidden_size=32, layers=layers, intermediate=64)
    config.tie_word_embeddings = tied
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def optim(args: dict) -> OptimConfig:
    # eps 1e-4: a parameter whose gradient is rounding noise (the suppressed pad row, ~1e-8) must not get a
    # full Adam step from it; real gradients here are ~1e-2.
    return OptimConfig(lr=1e-2, max_grad_norm=args.get("max_grad_norm", 1.0), adam_eps=1e-4)


class GradRecorder:
    """Every optimizer step's gradients (gathered to full tensors), recorded before the step: a global
    optimizer hook, so it also sees the optimizers the stages build internally."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []
        self.handle = register_optimizer_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        grads = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if hasattr(g, "full_tensor"):
                    g = g.full_tensor()
                grads.append(g.detach().double().cpu().clone())
        self.steps.append(grads)

    def close(self) -> None:
        self.handle.remove()


def full_weights(module) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().double().cpu().clone()
    return out


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (right-padding the time axis to the longest) in rank order."""
    if not distributed.active():
        return t
    parts = [None] * distributed.world().size
    torch.distributed.all_gather_object(parts, t.cpu())
    width = max(p.shape[-1] for p in parts) if t.dim() > 1 else None
    if width is not None:
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts]
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------ SFT


def sft_examples() -> list[SFTExample]:
    return [SFTExample(r["prompt"], r["completion"]) for r in DemoTask(seed=0).sft_records(16, seed=1)]


def run_sft(args: dict) -> None:
    from fastrlhf.sft import train_sft

    mc = dataclasses.replace(CPU, **args.get("model_config", {}))
    cfg = SFTConfig(
        model=args["base"], out=args["out"], batch_size=8, micro_batch_size=2, epochs=args.get("epochs", 1),
        optim=optim(args), model_config=mc,
        save_every=args.get("save_every", 0),
    )  # fmt: skip
    recorder = GradRecorder()
    model, _, _ = train_sft(cfg, examples=sft_examples())
    recorder.close()
    weights = full_weights(model)
    if distributed.is_main():
        torch.save({"grads": recorder.steps, "weights": weights}, Path(args["out"]) / "result.pt")


def run_rm(args: dict) -> None:
    """The reward model on 20 rankings of 3 (4 held out): 2 steps of 8, micro-batches of 2."""
    from fastrlhf.data import Ranking
    from fastrlhf.models import unwrap
    from fastrlhf.rm import train_rm

    records = DemoTask(seed=0).ranking_records(20, k=3, seed=2)
    rankings = [Ranking(r["prompt"], r["responses"], r["ranking"]) for r in records]
    cfg = RMConfig(
        model=args["base"], out=args["out"], batch_size=8, micro_batch_size=2, eval_fraction=0.2,
        optim=optim(args), model_config=CPU,
    )  # fmt: skip
    recorder = GradRecorder()
    model, _, _, accuracy = train_rm(cfg, rankings=rankings)
    recorder.close()
    weights = full_weights(model)
    bias = unwrap(model).config.reward_bias
    if distributed.is_main():
        result = {"grads": recorder.steps, "weights": weights, "accuracy": accuracy, "bias": bias}
        torch.save(result, Path(args["out"]) / "result.pt")


# ------------------------------------------------------------------------------------ 8-bit AdamW


class EightBitNet(torch.nn.Module):
    """Parameters laid out for 2 ranks' shards. a (64 x 64) and b (128 x 64): each rank holds 32 or 64 rows
    of 64, whole 256-element blocks (aligned). c (50 x 128, 25 rows of 128 per rank) and v (5000, 2500 per
    rank): shards end inside a block (misaligned). All four have >= 4096 elements, so 8-bit states, although
    a's shard has 2048; the biases (< 4096) keep 32-bit states."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(64, 64), torch.nn.Linear(64, 128), torch.nn.Linear(128, 50)
        self.v = torch.nn.Parameter(torch.randn(5000) * 0.1)

    def forward(self, coefficients: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_p <p, coefficients[p]>``: a loss whose gradient is the coefficients."""
        return sum((p * coefficients[k].to(p.dtype)).sum() for k, p in self.named_parameters())


EIGHT_BIT_STEPS, EIGHT_BIT_SAVE, EIGHT_BIT_ROWS = 5, 3, 8


def eight_bit_data(step: int, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Step ``step``'s 8 examples per parameter: small integers, so every sum of them and its division by
    the 8 examples is exact in fp32 and bf16. The reduced gradient is then bit-equal at any world size, and
    a difference in the weights can only come from the optimizer."""
    g = torch.Generator().manual_seed(step)
    return {k: torch.randint(-8, 9, (EIGHT_BIT_ROWS, *s), generator=g).float() for k, s in shapes.items()}


def run_eight_bit(args: dict) -> None:
    """adamw8bit (bitsandbytes, through ``optim.make_optimizer``) for 5 steps of a loss linear in the
    parameters, ``sum_p <p, mean of the examples>`` (each rank sums its rows over the global count); a
    checkpoint after step 3. With ``resume`` it starts from the checkpoint under ``out``; ``dtype`` bfloat16
    runs the weights in bf16 with stochastic rounding; ``lr`` defaults to 1e-2."""
    from fastrlhf import checkpoint
    from fastrlhf.optim import make_optimizer

    distributed.init()
    torch.manual_seed(0)
    net = EightBitNet().to(getattr(torch, args.get("dtype", "float32")))
    shapes = {k: p.shape for k, p in net.named_parameters()}
    net = distributed.shard(net)
    opt = make_optimizer(
        list(net.parameters()), OptimConfig(lr=args.get("lr", 1e-2), weight_decay=0.01),
        ModelConfig(optimizer="adamw8bit"), torch.device("cpu"),
    )  # fmt: skip
    rank, size = distributed.world().rank, distributed.world().size
    rows = slice(rank * EIGHT_BIT_ROWS // size, (rank + 1) * EIGHT_BIT_ROWS // size)
    root = Path(args["out"]) / "checkpoints"
    first = (
        checkpoint.load_checkpoint(root, modules={"net": net}, optimizers={"opt": opt})
        if args.get("resume")
        else None
    )
    weights = {}
    for step in range((first["step"] if first else 0) + 1, EIGHT_BIT_STEPS + 1):
        data = eight_bit_data(step, shapes)
        net({k: x[rows].sum(0) / EIGHT_BIT_ROWS for k, x in data.items()}).backward()
        opt.step()
        opt.zero_grad()
        if step == EIGHT_BIT_SAVE:
            checkpoint.save_checkpoint(
                root, step, modules={"net": net}, optimizers={"opt": opt}, state={"step": step}
            )
        weights[step] = full_weights(net)
    if distributed.is_main():
        torch.save(weights, Path(args["out"]) / "result.pt")


# ------------------------------------------------------------------------------------------------ PPO


def synthetic_rollout(tok, n: int, prompt_len: int = 4, response_len: int = 6, seed: int = 0) -> Rollout:
    """A fixed batch of [left-padded prompt | response] rows with uneven response lengths."""
    g = torch.Generator().manual_seed(seed)
    low = max(tok.pad_token_id, tok.eos_token_id, tok.bos_token_id or 0) + 1
    vocab = len(tok)
    prompt = torch.randint(low, vocab, (n, prompt_len), generator=g)
    prompt_mask = torch.ones(n, prompt_len, dtype=torch.long)
    for i in range(n):
        pad = int(torch.randint(0, prompt_len - 1, (1,), generator=g))
        prompt[i, :pad] = tok.pad_token_id
        prompt_mask[i, :pad] = 0
    response = torch.randint(low, vocab, (n, response_len), generator=g)
    lengths = torch.randint(1, response_len + 1, (n,), generator=g)
    positions = torch.arange(response_len)
    response_mask = positions[None] < lengths[:, None]
    has_eos = lengths < response_len
    for i in range(n):
        if has_eos[i]:
            response[i, lengths[i] - 1] = tok.eos_token_id
    response = response.masked_fill(~response_mask, tok.pad_token_id)
    return Rollout(
        prompts=[f"p{i}" for i in range(n)],
        completions=[f"c{i}" for i in range(n)],
        input_ids=torch.cat([prompt, response], 1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], 1),
        response_start=prompt_len,
        response_mask=response_mask,
        has_eos=has_eos,
    )


def local_batch(batch: Rollout) -> Rollout:
    """This rank's contiguous rows of a global rollout."""
    if not distributed.active():
        return batch
    w, r = distributed.world().size, distributed.world().rank
    k = len(batch.prompts) // w
    rows = slice(r * k, (r + 1) * k)
    return dataclasses.replace(
        batch,
        prompts=batch.prompts[rows],
        completions=batch.completions[rows],
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        response_mask=batch.response_mask[rows],
        has_eos=batch.has_eos[rows],
    )


def global_order(local: torch.Tensor, world: int, num_minibatches: int) -> torch.Tensor:
    """The one-process order whose minibatches are the union of every rank's local minibatches."""
    n = len(local)
    chunks = local.chunk(num_minibatches)
    return torch.cat([torch.cat([r * n + c for r in range(world)]) for c in chunks])


def ppo_cfg(args: dict) -> PPOConfig:
    mc = dataclasses.replace(CPU, **args.get("model_config", {}))
    return PPOConfig(
        policy=args["base"], reward_model=args["base"], out=args["out"], rollout_batch_size=8,
        ppo_epochs=args.get("ppo_epochs", 1), num_minibatches=args.get("num_minibatches", 2),
        micro_batch_size=args.get("micro_batch_size", 1), model_config=mc,
        critic=args.get("critic", "reward_model"), whiten_rewards=args.get("whiten_rewards", False),
        kl_target=args.get("kl_target"),
        policy_optim=optim(args), critic_optim=optim(args),
    )  # fmt: skip


def run_ppo_update(args: dict) -> None:
    """score -> evaluate -> advantages -> stats -> update on a fixed rollout; what one process computes on
    the union batch, each rank on its rows."""
    distributed.init()
    cfg = ppo_cfg(args)
    device = torch.device("cpu")
    torch.manual_seed(0)
    models = build_models(cfg, None, device)
    models, cfg = distributed.shard_ppo_models(models, cfg)
    opt = build_trainables(models, cfg, device)
    world = distributed.world().size
    batch = local_batch(synthetic_rollout(models.tokenizer, 8))
    local_order = torch.tensor([2, 0, 3, 1])  # every rank shuffles its 4 rows the same way
    order = local_order if world == 2 else global_order(local_order, 2, cfg.num_minibatches)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    recorder = GradRecorder()
    batch.scores = score(models, batch, cfg)
    evaluate(models, batch, order, cfg)
    compute_advantages(batch, kl, cfg)
    stats = rollout_stats(batch, kl)
    torch.manual_seed(1)
    stats |= update(models, batch, order, opt, cfg, 0)
    kl.update(stats["kl"], distributed.count(len(batch.prompts)))
    recorder.close()
    result = {
        "stats": stats,
        "kl_coef": kl.value,
        "grads": recorder.steps,
        "policy": full_weights(models.policy),
        "critic": full_weights(models.critic) if models.critic is not None else {},
        "value_head": full_weights(models.value_head) if models.value_head is not None else {},
    }
    for name in ("scores", "logp", "ref_logp", "values", "advantages", "returns", "rewards"):
        result[name] = gather_rows(getattr(batch, name).detach().double())
    if distributed.is_main():
        Path(args["out"]).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(args["out"]) / "result.pt")


def run_whiten(args: dict) -> None:
    """Global masked statistics on uneven masks: rank r holds rows r*4 .. r*4 + 3 of a fixed tensor."""
    distributed.init()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 7, generator=g) * 3 + 5
    mask = torch.rand(8, 7, generator=g) < torch.linspace(0.1, 0.9, 8)[:, None]  # uneven counts per rank
    rows = (
        slice(distributed.world().rank * 4, distributed.world().rank * 4 + 4)
        if distributed.active()
        else slice(0, 8)
    )
    xs, ms = x[rows], mask[rows]
    result = {
        "whiten": gather_rows(distributed.masked_whiten(xs, ms)),
        "rescale": gather_rows(distributed.masked_whiten(xs, ms, shift_mean=False)),
        "mean": distributed.masked_mean(xs, ms),
        "var": distributed.masked_var(xs, ms),
        "std": distributed.std(xs[:, 0]),
        "plain_mean": distributed.mean(xs),
        "count": distributed.count(int(ms.sum())),
    }
    if distributed.is_main():
        Path(args["out"]).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(args["out"]) / "whiten.pt")


def run_job_costs(args: dict) -> None:
    """``distributed.job_costs`` of made-up per-rank time, memory and throughput."""
    r = distributed.world().rank
    got = distributed.job_costs(
        {"time/update": 1.0 + r, "memory_gib/step": 5.0 - r, "rollout/tokens_per_second": 10.0 * (r + 1)}
    )
    if distributed.is_main():
        Path(args["out"]).mkdir(parents=True, exist_ok=True)
        torch.save(got, Path(args["out"]) / "job_costs.pt")


def run_ppo_train(args: dict) -> None:
    """train_ppo end to end: generation under FSDP2, a reward function, checkpoints, the exported policy."""
    from fastrlhf.ppo_trainer import train_ppo

    task = DemoTask(seed=0)
    cfg = dataclasses.replace(
        ppo_cfg(args), steps=args.get("steps", 2), save_every=args.get("save_every", 1), max_new_tokens=6,
        critic=args.get("critic", "policy_head"),
    )  # fmt: skip
    reward = lambda prompts, completions: [
        task.gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)
    ]
    if "die_saving" in args:
        die_while_saving(args["die_saving"])
    recorder = GradRecorder()
    models, _ = train_ppo(cfg, reward=reward, prompts=task.prompts(16, seed=0))
    recorder.close()
    weights = full_weights(models.policy)
    if distributed.is_main():
        torch.save({"grads": recorder.steps, "weights": weights}, Path(args["out"]) / "result.pt")


def die_while_saving(step: int) -> None:
    """Rank 0, which completes checkpoints, dies by SIGKILL (no handler, no cleanup) right after writing
    its first file of step ``step``'s checkpoint: a half-written checkpoint directory stays behind."""
    import safetensors.torch

    if not distributed.is_main():
        return
    save_file = safetensors.torch.save_file

    def dying(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        if f"step-{step:06d}.tmp-" in str(filename):
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = dying


def copy_checkpoints(args: dict) -> None:
    """Start ``dst`` from ``src``'s checkpoints (what a restarted run finds)."""
    if distributed.is_main():
        Path(args["dst"]).mkdir(parents=True)
        shutil.copytree(Path(args["src"]) / "checkpoints", Path(args["dst"]) / "checkpoints")
    distributed.barrier()


SCENARIOS = {
    "sft": run_sft,
    "rm": run_rm,
    "ppo_update": run_ppo_update,
    "ppo_train": run_ppo_train,
    "whiten": run_whiten,
    "job_costs": run_job_costs,
    "eight_bit": run_eight_bit,
    "copy_checkpoints": copy_checkpoints,
}


def main() -> None:
    name, args = sys.argv[1], json.loads(sys.argv[2])
    for item in args if isinstance(args, list) else [args]:
        SCENARIOS[item.pop("scenario", name)](item)
    distributed.shutdown()


if __name__ == "__main__":
    main()
