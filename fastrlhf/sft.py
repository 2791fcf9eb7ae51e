"""Stage 1: supervised fine-tuning on demonstrations, with the loss on completion tokens only.

loss = -sum_{t in completion} log pi(y_t | x, y_<t) / (number of completion tokens in the batch)

Log-probs come from the last hidden states through ``linear_token_logprobs``: full logits never exist.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastrlhf import distributed
from fastrlhf.config import SFTConfig
from fastrlhf.data import SFTExample, encode_prompt, encode_response, filter_long_prompts, load_sft, sft_batch
from fastrlhf.metrics import MetricsLogger
from fastrlhf.models import default_device, load_causal_lm, load_tokenizer, response_logprobs
from fastrlhf.training import finish_run, log, save_model, seed_everything, supervised_loop


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
    cfg.validate(provided=("data",) if examples is not None else ())  # before anything loads
    distributed.init()  # under torchrun: join the job (a no-op in one process)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if examples is None:  # bad data fails before a large model is loaded
        examples = load_sft(cfg.data)
    tokenizer = load_tokenizer(cfg.model, cfg.model_config)
    data = encode_sft(tokenizer, examples, cfg.max_len, cfg.data or "demonstrations")
    model = load_causal_lm(cfg.model, cfg.model_config, default_device(), tokenizer)

    def micro_loss(micro, batch):
        tensors = {k: v.to(model.device) for k, v in sft_batch(micro, tokenizer.pad_token_id).items()}
        loss = sft_loss(model, tensors, n_tokens=sum(len(completion) for _, completion in batch))
        return loss, {"loss": float(loss.detach())}

    own_logger = logger is None
    logger = logger or MetricsLogger(out, run_name="sft", wandb=cfg.wandb)
    steps = supervised_loop(
        "sft", model, data, micro_loss, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
        epochs=cfg.epochs, optim=cfg.optim, model_config=cfg.model_config, out=out, logger=logger,
        save_every=cfg.save_every, seed=cfg.seed,
    )  # fmt: skip
    model = save_model(model, tokenizer, out / "model")
    if own_logger:
        logger.close()
        finish_run(out, {"stage": "sft", "steps": steps})
    return model, tokenizer, out / "model"
