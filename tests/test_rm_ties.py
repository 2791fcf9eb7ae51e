"""The reward model's pairs: tied pairs dropped, soft judge targets, and a training run on judged rankings."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from fastrlhf.config import ModelConfig, OptimConfig, RMConfig
from fastrlhf.data import Ranking, ranked_pairs, ranking_batch
from fastrlhf.demo_task import DemoTask, build_tokenizer, tiny_llama_config
from fastrlhf.rm import encode_rankings, ranking_loss, train_rm

log_sigmoid = lambda x: -math.log1p(math.exp(-x))


def test_ranked_pairs_leave_out_pairs_inside_a_tie_group():
    assert ranked_pairs([3, 1, 0, 2]) == [(3, 1), (3, 0), (3, 2), (1, 0), (1, 2), (0, 2)]
    assert ranked_pairs([3, 1, 0, 2], [[1, 0]]) == [(3, 1), (3, 0), (3, 2), (1, 2), (0, 2)]
    assert ranked_pairs([3, 1, 0, 2], [[3, 1, 0, 2]]) == []


def test_ranking_batch_drops_ties_and_renormalizes_per_ranking():
    items = [
        ([1], [[5], [6], [7], [8]], [3, 1, 0, 2], [[1, 0]], None),  # 5 untied pairs
        ([1], [[5], [6]], [1, 0], [[0, 1]], None),  # all tied: no pairs, and it does not count as an item
        ([1], [[5], [6]], [0, 1]),  # plain 3-tuple: one pair
    ]
    batch = ranking_batch(items, pad_id=0)
    assert batch["pairs"].tolist() == [[3, 1], [3, 0], [3, 2], [1, 2], [0, 2], [6, 7]]
    assert batch["group"].tolist() == [0, 0, 0, 0, 0, 2]
    assert batch["pair_weight"].tolist() == pytest.approx([0.1] * 5 + [0.5])
    assert batch["pair_target"].tolist() == [1.0] * 6


def test_soft_targets_use_every_pair_and_the_judge_probability():
    probs = [[0.5, 0.8, 0.35], [0.2, 0.5, 0.1], [0.65, 0.9, 0.5]]
    items = [([1], [[5], [6], [7]], [2, 0, 1], [[2, 0]], probs), ([1], [[5], [6]], [1, 0], [], None)]
    batch = ranking_batch(items, pad_id=0, soft_targets=True)
    assert batch["pairs"].tolist() == [[2, 0], [2, 1], [0, 1], [4, 3]]  # the tied (2, 0) is kept
    assert batch["pair_target"].tolist() == pytest.approx([0.65, 0.9, 0.8, 1.0])
    scores = torch.tensor([0.3, -1.2, 2.0, 0.7, 0.9], dtype=torch.float64)
    loss, correct = ranking_loss(scores, batch)
    s = scores.tolist()
    soft = lambda p, d: -(p * log_sigmoid(d) + (1 - p) * log_sigmoid(-d))
    first = (soft(0.65, s[2] - s[0]) + soft(0.9, s[2] - s[1]) + soft(0.8, s[0] - s[1])) / 3
    second = soft(1.0, s[4] - s[3])
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)
    assert float(correct) == 4
    # p = 1 is InstructGPT's hard loss over the same pairs.
    ones = dict(batch, pair_target=torch.ones(len(batch["pairs"])))
    hard = (
        -(log_sigmoid(s[2] - s[0]) + log_sigmoid(s[2] - s[1]) + log_sigmoid(s[0] - s[1])) / 3 + second
    ) / 2
    assert float(ranking_loss(scores, ones)[0]) == pytest.approx(hard, rel=1e-6)


def test_soft_loss_gradient_vanishes_at_the_target_margin():
    p = 0.73
    margin = torch.tensor(math.log(p / (1 - p)), dtype=torch.float64, requires_grad=True)
    scores = torch.stack([margin, torch.zeros((), dtype=torch.float64)])
    batch = {
        "pairs": torch.tensor([[0, 1]]),
        "pair_target": torch.tensor([p], dtype=torch.float64),
        "pair_weight": torch.tensor([1.0]),
    }
    ranking_loss(scores, batch)[0].backward()
    assert abs(float(margin.grad)) < 1e-12


def test_rm_trains_on_judge_records_with_ties_and_soft_targets(tmp_path, torch_backend):
    torch.manual_seed(0)
    tok = build_tokenizer()
    base = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config(tok, hidden_size=32, layers=1, intermediate=64)).save_pretrained(base)
    tok.save_pretrained(base)
    task = DemoTask(seed=0)
    records = []
    for r in task.ranking_records(13, 3, seed=5):
        k = len(r["responses"])
        gold = [task.gold_reward(r["prompt"], x) for x in r["responses"]]
        probs = [[round(1 / (1 + math.exp(-(gold[i] - gold[j]) * 5)), 6) for j in range(k)] for i in range(k)]
        records.append(r | {"ties": [r["ranking"][1:]], "pairwise_probs": probs, "labeler": "judge:gold"})
    records.append(records[0] | {"ties": [records[0]["ranking"]]})  # all tied: skipped
    data = tmp_path / "rankings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = RMConfig(
        model=str(base), data=str(data), out=str(tmp_path / "rm"), batch_size=4, micro_batch_size=2,
        eval_fraction=0.2, max_len=64, optim=OptimConfig(lr=1e-3), model_config=ModelConfig(dtype="float32"),
    )  # fmt: skip
    keys = ("prompt", "responses", "ranking", "ties")
    hard = encode_rankings(tok, [Ranking(**{k: r[k] for k in keys}) for r in records], 64, "x")
    assert len(hard) == 13  # the all-tied one teaches nothing without soft targets
    with_probs = [Ranking(**{k: r[k] for k in (*keys, "pairwise_probs")}) for r in records]
    assert len(encode_rankings(tok, with_probs, 64, "x", soft_targets=True)) == 14  # its p ~ 0.5 still counts
    for soft in (False, True):
        out = tmp_path / f"rm-{soft}"
        _, _, path, accuracy = train_rm(dataclasses.replace(cfg, soft_targets=soft, out=str(out)))
        assert (path / "config.json").exists() and 0.0 <= accuracy <= 1.0
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
