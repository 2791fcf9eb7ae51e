"""Stage 1: supervised fine-tuning on demonstrations, with the loss on completion tokens only.

loss = -sum_{t in completion} log pi(y_t | x, y_<t) / (number of completion tokens in the batch)

Log-probs come from the last hidden states through ``linear_token_logprobs``: full logits never exist.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastrlhf.checkpoint import check_finite, load_checkpoint, save_checkpoint
from fastrlhf.config import SFTConfig
from fastrlhf.data import SFTExample, encode_prompt, encode_response, filter_long_prompts, load_sft, sft_batch
from fastrlhf.metrics import MetricsLogger
from fastrlhf.models import (
    default_device,
    load_causal_lm,
    load_tokenizer,
    make_optimizer,
    response_logprobs,
    trainable_parameters,
    warmup_schedule,
)
from fastrlhf.training import (
    check_batch_sizes,
    finish_run,
    log,
    micro_batches,
    save_model,
    seed_everything,
    shuffled_batches,
)


def encode_sft(
    tokenizer, examples: list[SFTExample], max_len: int, source: str
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per example; over-long examples are reported and dropped."""
    encoded = [
        (encode_prompt(tokenizer, ex.prompt), encode_response(tokenizer, ex.completion)) for ex in examples
    ]
    kept, report = filter_long_prompts(
        [p + c for p, c in encoded], max_len, source, lines=[ex.line for ex in examples], what="example"
    )
    if report:
        log.warning("%s; they are skipped", report)
    return [encoded[i] for i in kept]


def sft_loss(model, batch: dict[str, torch.Tensor], n_tokens: int) -> torch.Tensor:
    """Summed completion-token NLL of a micro-batch divided by the whole batch's completion-token count."""
    logp = response_logprobs(model, batch["input_ids"], batch["attention_mask"], 1)
    return -(logp * batch["loss_mask"][:, 1:]).sum() / n_tokens


def train_sft(
    cfg: SFTConfig, *, examples: list[SFTExample] | None = None, logger: MetricsLogger | None = None
):
    """Run SFT; returns the trained model (merged if LoRA), its tokenizer and the output directory.

    ``examples`` replaces ``cfg.data`` for callers that build demonstrations in memory.
    """
    seed_everything(cfg.seed)
    device = default_device()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model, cfg.model_config)
    model = load_causal_lm(cfg.model, cfg.model_config, device, tokenizer)
    if examples is None:
        examples = load_sft(cfg.data)
    data = encode_sft(tokenizer, examples, cfg.max_len, cfg.data or "demonstrations")
    check_batch_sizes(cfg.batch_size, cfg.micro_batch_size, len(data), "demonstrations")
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, cfg.optim, cfg.model_config, device)
    scheduler = warmup_schedule(optimizer, cfg.optim.warmup_steps)
    steps_per_epoch = len(data) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    ckpt_dir = out / "checkpoints"
    state = load_checkpoint(ckpt_dir, modules={"model": model}, optimizers={"optimizer": optimizer})
    step = 0
    if state is not None:
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        log.info("resumed SFT from step %d", step)
    own_logger = logger is None
    logger = logger or MetricsLogger(out)
    model.train()
    bar = tqdm(total=total, initial=step, desc="sft", disable=None)
    loss_value = float("nan")
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        batch = shuffled_batches(data, cfg.batch_size, seed=cfg.seed, epoch=epoch)[index]
        t0 = time.perf_counter()
        n_tokens = sum(len(c) for _, c in batch)
        loss_sum = 0.0
        for micro in micro_batches(batch, cfg.micro_batch_size):
            tensors = {k: v.to(device) for k, v in sft_batch(micro, tokenizer.pad_token_id).items()}
            loss = sft_loss(model, tensors, n_tokens)
            check_finite("sft loss", loss, step)
            loss.backward()
            loss_sum += float(loss.detach())
        if cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss_sum
        elapsed = time.perf_counter() - t0
        logger.log(
            "sft",
            step,
            {"loss": loss_sum, "lr": scheduler.get_last_lr()[0], "tokens_per_second": n_tokens / elapsed},
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_checkpoint(
                ckpt_dir,
                step,
                modules={"model": model},
                optimizers={"optimizer": optimizer},
                state={"step": step, "scheduler": scheduler.state_dict()},
            )
    bar.close()
    model = save_model(model, tokenizer, out / "model")
    if own_logger:
        logger.close()
        finish_run(out, {"stage": "sft", "steps": step, "final_loss": loss_value})
    return model, tokenizer, out / "model"
