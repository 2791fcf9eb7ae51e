"""Stage 2: a reward model from rankings of K responses (InstructGPT).

A ranking of K responses to one prompt trains as all C(K, 2) pairs inside ONE batch element:

    loss = -1 / C(K, 2) * sum_{(w, l)} log sigmoid(r(x, y_w) - r(x, y_l))

averaged over the rankings of a batch. Pairs inside a tie group are dropped (InstructGPT's "ties were
dropped"). With ``soft_targets`` a judge's ``pairwise_probs`` p become the targets, over all pairs:

    loss = -1 / C(K, 2) * sum_{(i, j)} [p log sigmoid(r_i - r_j) + (1 - p) log sigmoid(r_j - r_i)]

The loss cannot see a per-prompt offset, so after training a bias is set so that demonstrations score 0 on
average; it is stored as ``config.reward_bias``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from fastrlhf import distributed
from fastrlhf.config import RMConfig
from fastrlhf.data import (
    Ranking,
    SFTExample,
    encode_prompt,
    encode_response,
    filter_long_prompts,
    load_rankings,
    load_sft,
    pad_right,
    ranked_pairs,
    ranking_batch,
)
from fastrlhf.metrics import MetricsLogger
from fastrlhf.models import (
    default_device,
    load_scalar_model,
    load_tokenizer,
    sequence_scores,
    unwrap,
)
from fastrlhf.training import finish_run, log, micro_batches, save_model, seed_everything, supervised_loop

EncodedRanking = tuple[list[int], list[list[int]], list[int], list[list[int]], list[list[float]] | None]
"""(prompt ids, [response ids + EOS], ranking, ties, pairwise_probs or None): an item of ``ranking_batch``."""


def encode_rankings(
    tokenizer, rankings: list[Ranking], max_len: int, source: str, *, soft_targets: bool = False
) -> list[EncodedRanking]:
    """Encoded rankings; those with an over-long row, or with no pair left to train on (every response in
    one tie group), are dropped with a warning."""
    encoded: list[EncodedRanking] = []
    for r in rankings:
        prompt = encode_prompt(tokenizer, r.prompt)
        responses = [encode_response(tokenizer, text) for text in r.responses]
        encoded.append((prompt, responses, list(r.ranking), r.ties, r.pairwise_probs))
    longest = [item[0] + max(item[1], key=len) for item in encoded]
    kept, report = filter_long_prompts(
        longest, max_len, source, lines=[r.line for r in rankings], what="ranking"
    )
    if report:
        log.warning("%s; they are skipped", report)
    trainable = [i for i in kept if n_pairs(encoded[i], soft_targets)]
    if len(trainable) < len(kept):
        log.warning(
            "%s: %d rankings tie all their responses and are skipped", source, len(kept) - len(trainable)
        )
    return [encoded[i] for i in trainable]


def n_pairs(item: EncodedRanking, soft_targets: bool = False) -> int:
    """Pairs ``ranking_batch`` trains on for ``item``: all C(K, 2) with soft targets, else the untied ones."""
    _, responses, ranking, ties, probs = item
    if soft_targets and probs is not None:
        return len(responses) * (len(responses) - 1) // 2
    return len(ranked_pairs(ranking, ties))


def ranking_loss(scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's loss for the rankings of ``batch`` (mean over each ranking's pairs, then over rankings),
    with targets p = ``pair_target`` (1 for hard labels), and the number of correctly ordered pairs."""
    winners, losers = scores[batch["pairs"][:, 0]], scores[batch["pairs"][:, 1]]
    margin = winners - losers
    target = batch.get("pair_target", torch.ones_like(margin)).to(margin.dtype)
    nll = target * F.logsigmoid(margin) + (1 - target) * F.logsigmoid(-margin)
    loss = -(batch["pair_weight"].to(margin.dtype) * nll).sum()
    return loss, (winners > losers).float().sum() + 0.5 * (winners == losers).float().sum()


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, data: list[EncodedRanking], micro_batch_size: int) -> float:
    """Share of held-out untied pairs the model orders like the labelers (equal scores count one half)."""
    model.eval()
    device = next(model.parameters()).device
    correct, pairs = 0.0, 0
    for micro in micro_batches(data, micro_batch_size):
        batch = {k: v.to(device) for k, v in ranking_batch(micro, tokenizer.pad_token_id).items()}
        _, n_correct = ranking_loss(
            sequence_scores(model, batch["input_ids"], batch["attention_mask"]), batch
        )
        correct += float(n_correct)
        pairs += len(batch["pairs"])
    model.train()
    return correct / max(pairs, 1)


@torch.no_grad()
def set_reward_bias(
    model, tokenizer, demonstrations: list[tuple[list[int], list[int]]], micro_batch_size: int
) -> float:
    """Shift ``config.reward_bias`` so that the demonstrations' mean score becomes 0; returns the new bias."""
    model.eval()
    device = next(model.parameters()).device
    config = unwrap(model).config
    config.reward_bias = 0.0
    scores = []
    for micro in micro_batches(demonstrations, micro_batch_size):
        ids, mask = pad_right([p + c for p, c in micro], tokenizer.pad_token_id)
        scores.append(sequence_scores(model, ids.to(device), mask.to(device)))
    config.reward_bias = -float(torch.cat(scores).mean())
    return config.reward_bias


def train_rm(
    cfg: RMConfig,
    *,
    rankings: list[Ranking] | None = None,
    demonstrations: list[SFTExample] | None = None,
    logger: MetricsLogger | None = None,
):
    """Train the reward model; returns (model, tokenizer, output directory, held-out pairwise accuracy).

    ``rankings`` / ``demonstrations`` replace the files named in ``cfg`` for in-memory callers.
    """
    cfg.validate(provided=("data",) if rankings is not None else ())  # before anything loads
    distributed.init()  # under torchrun: join the job (a no-op in one process)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if rankings is None:  # bad data fails before a large model is loaded
        rankings = load_rankings(cfg.data)
    if demonstrations is None and cfg.demonstrations:
        demonstrations = load_sft(cfg.demonstrations)
    tokenizer = load_tokenizer(cfg.model, cfg.model_config)
    model = load_scalar_model(cfg.model, cfg.model_config, default_device(), tokenizer)
    data = encode_rankings(
        tokenizer, rankings, cfg.max_len, cfg.data or "rankings", soft_targets=cfg.soft_targets
    )
    random.Random(cfg.seed).shuffle(data)
    n_eval = round(len(data) * cfg.eval_fraction)
    eval_data, train_data = data[:n_eval], data[n_eval:]

    def micro_loss(micro, batch_items):
        batch = ranking_batch(micro, tokenizer.pad_token_id, soft_targets=cfg.soft_targets)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        loss, n_correct = ranking_loss(scores, batch)
        pairs = sum(n_pairs(item, cfg.soft_targets) for item in batch_items)
        # ranking_batch normalizes its pair weights over the micro-batch; rescale to the whole batch.
        loss = loss * len(micro) / len(batch_items)
        return loss, {"loss": float(loss.detach()), "train_accuracy": float(n_correct) / pairs}

    own_logger = logger is None
    logger = logger or MetricsLogger(out, run_name="rm", wandb=cfg.wandb)
    steps = supervised_loop(
        "rm", model, train_data, micro_loss, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
        epochs=cfg.epochs, optim=cfg.optim, model_config=cfg.model_config, out=out, logger=logger,
        save_every=cfg.save_every, seed=cfg.seed,
    )  # fmt: skip
    accuracy = (
        pairwise_accuracy(model, tokenizer, eval_data, cfg.micro_batch_size) if eval_data else float("nan")
    )
    if demonstrations is not None:
        demos = [
            (encode_prompt(tokenizer, d.prompt), encode_response(tokenizer, d.completion))
            for d in demonstrations
        ]
    else:  # the labelers' favourite response stands in for a demonstration
        demos = [(p, rs[rank[0]]) for p, rs, rank, *_ in data]
    bias = set_reward_bias(model, tokenizer, demos, cfg.micro_batch_size)
    logger.log("rm", steps, {"eval_accuracy": accuracy, "reward_bias": bias})
    log.info("reward model: held-out pairwise accuracy %.3f on %d rankings", accuracy, len(eval_data))
    model = save_model(model, tokenizer, out / "model")
    if own_logger:
        logger.close()
        finish_run(out, {"stage": "rm", "steps": steps, "eval_accuracy": accuracy, "reward_bias": bias})
    return model, tokenizer, out / "model", accuracy
