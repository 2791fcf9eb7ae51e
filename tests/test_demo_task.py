"""The self-contained demo task: gold reward, noisy demonstrator, rankings, records, tokenizer, tiny Llama."""

import random

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from fastrlhf.demo_task import DemoTask, build_tokenizer, tiny_llama_config

PROMPT = "sort : 7 3 9 1 ="


@pytest.fixture(scope="module")
def task() -> DemoTask:
    return DemoTask(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("1 3 7 9", 1.0),
        ("1379", 1.0),  # digits split like the tokenizer splits them
        ("3 1 7 9", 0.75),  # one adjacent swap costs one edit
        ("1 3 7", 0.75),  # dropped item
        ("1 3 7 9 9", 0.8),  # duplicated item: one edit over the longer length
        ("1 3 8 9", 0.75),  # substituted item
        ("1 3 sort 9", 0.75),  # foreign token
        ("9 7 3 1", 0.25),  # reversed: only one item in place
        ("hello world !", 0.0),
        ("", 0.0),
        ("5 5 5 5 5 5 5 5 5 5 5", 0.0),  # long garbage clips at 0
    ],
)
def test_gold_reward_by_hand(task, response, expected):
    assert task.gold_reward(PROMPT, response) == pytest.approx(expected)


def test_gold_reward_is_bounded_on_random_text(task):
    rng = random.Random(0)
    alphabet = "0123456789 sort:=<>abc!\n\t"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        assert 0.0 <= task.gold_reward(PROMPT, text) <= 1.0


def test_answer_and_items(task):
    assert task.items(PROMPT) == ["7", "3", "9", "1"]
    assert task.answer(PROMPT) == "1 3 7 9"


def test_prompts_are_deterministic_and_seeds_differ(task):
    a = task.prompts(500, seed=1)
    assert a == task.prompts(500, seed=1)
    b = task.prompts(500, seed=2)
    assert len(set(a) & set(b)) < 10
    assert DemoTask(seed=1).prompts(500, seed=1) != a
    for p in a:
        items = task.items(p)
        assert p == f"sort : {' '.join(items)} ="
        assert task.min_items <= len(items) <= task.max_items
        assert len(set(items)) == len(items)


@pytest.mark.parametrize("noise", [0.0, 0.3, 0.7])
def test_demonstrator_noise_rate(noise):
    task = DemoTask(demo_noise=noise)
    rng = random.Random(0)
    prompts = task.prompts(3000, seed=3)
    demos = [task.demonstration(p, rng) for p in prompts]
    imperfect = sum(d != task.answer(p) for p, d in zip(prompts, demos, strict=True)) / len(demos)
    assert imperfect == pytest.approx(noise, abs=0.03)
    assert all(d and set(d.split()) <= set("0123456789") for d in demos)


def test_rank_sorts_by_gold_with_stable_ties(task):
    responses = ["3 1 7 9", "1 3 7 9", "", "1 3 7", "1 3 7 9"]
    assert task.rank(PROMPT, responses) == [1, 4, 0, 3, 2]


def test_candidates_vary_in_quality(task):
    rng = random.Random(0)
    for p in task.prompts(50, seed=4):
        cands = task.candidate_responses(p, 4, rng)
        golds = [task.gold_reward(p, c) for c in cands]
        assert len(cands) == 4
        assert len(set(cands)) == 4
        assert len(set(golds)) >= 3


def test_records(task):
    sft = task.sft_records(20, seed=5)
    assert sft == task.sft_records(20, seed=5)
    assert all(set(r) == {"prompt", "completion"} for r in sft)
    assert all(isinstance(r["prompt"], str) and isinstance(r["completion"], str) for r in sft)

    ranked = task.ranking_records(20, 4, seed=6)
    for r in ranked:
        assert set(r) == {"prompt", "responses", "ranking"}
        assert len(r["responses"]) == 4
        assert sorted(r["ranking"]) == [0, 1, 2, 3]
        assert r["ranking"] == task.rank(r["prompt"], r["responses"])
        golds = [task.gold_reward(r["prompt"], r["responses"][i]) for i in r["ranking"]]
        assert golds == sorted(golds, reverse=True)

    prompts = task.prompt_records(20, seed=7)
    assert prompts == [{"prompt": p} for p in task.prompts(20, seed=7)]


def test_bad_arguments():
    with pytest.raises(ValueError):
        DemoTask(min_items=5, max_items=4)
    with pytest.raises(ValueError):
        DemoTask(max_items=10)
    with pytest.raises(ValueError):
        DemoTask(demo_noise=1.0)


def test_tokenizer_round_trips_task_text(task, tokenizer):
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert len(ids) == 4 and None not in ids
    assert not tokenizer.chat_template
    for rec in task.sft_records(50, seed=8):
        for text in (rec["prompt"], rec["completion"]):
            enc = tokenizer(text)["input_ids"]
            assert enc[0] == tokenizer.bos_token_id
            assert tokenizer.unk_token_id not in enc
            assert tokenizer.decode(enc, skip_special_tokens=True) == text
        bare = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
        assert len(bare) == len(rec["completion"].split())
    assert tokenizer("sort : 1 2 = hello")["input_ids"][-1] == tokenizer.unk_token_id


def test_tokenizer_survives_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(loaded, attr) == getattr(tokenizer, attr)
        assert getattr(loaded, f"{attr}_id") == getattr(tokenizer, f"{attr}_id")
    assert loaded(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert not loaded.chat_template


def test_tiny_llama_forward(tokenizer):
    config = tiny_llama_config(tokenizer, hidden_size=32, layers=1, heads=2, intermediate=64)
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(
        [tokenizer(PROMPT)["input_ids"] + tokenizer("1 3 7 9", add_special_tokens=False)["input_ids"]]
    )
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)
