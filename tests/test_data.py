"""Dataset loading/validation, tokenization and batch building (tiny local tokenizer, no downloads)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastrlhf.data import (
    DataError,
    Ranking,
    SFTExample,
    encode_prompt,
    encode_response,
    ensure_pad_token,
    filter_long_prompts,
    load_prompts,
    load_rankings,
    load_sft,
    pad_left,
    pad_right,
    ranking_batch,
    read_jsonl,
    sft_batch,
)

WORDS = ["user", "assistant", "system", ":", "hello", "world", "how", "are", "you", "fine", "thanks"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that adds BOS like Llama's, built in memory."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def ids(*words: str) -> list[int]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    return [vocab[w] for w in words]


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ loading


def test_load_sft_plain_and_conversational(tmp_path):
    chat = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    path = write_lines(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "hello", "completion": " world"},
            "",  # blank lines are skipped but still counted
            {"prompt": chat, "completion": [{"role": "assistant", "content": "hello"}]},
        ],
    )
    examples = load_sft(path)
    assert examples == [SFTExample("hello", " world"), SFTExample(chat, "hello")]
    assert [e.line for e in examples] == [1, 3]
    assert read_jsonl(path) == [
        (1, {"prompt": "hello", "completion": " world"}),
        (3, json.loads(path.read_text().splitlines()[2])),
    ]


def test_load_rankings_pairs_and_k_way_mixed(tmp_path):
    path = write_lines(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "p1", "chosen": "good", "rejected": "bad"},
            {"prompt": "p2", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
            {
                "prompt": [{"role": "user", "content": "p3"}],
                "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            },
        ],
    )
    assert load_rankings(path) == [
        Ranking("p1", ["good", "bad"], [0, 1]),
        Ranking("p2", ["a", "b", "c"], [2, 0, 1]),
        Ranking([{"role": "user", "content": "p3"}], ["yes", "no"], [0, 1]),
    ]


def test_load_prompts_jsonl_and_txt(tmp_path):
    jsonl = write_lines(
        tmp_path / "p.jsonl", [{"prompt": "one"}, {"prompt": [{"role": "user", "content": "two"}]}]
    )
    assert load_prompts(jsonl) == ["one", [{"role": "user", "content": "two"}]]
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  \nsecond: with  spaces\r\n")
    assert load_prompts(txt) == ["first prompt", "second: with  spaces"]


@pytest.mark.parametrize(
    ("lines", "loader", "expected"),
    [
        (
            [{"prompt": "a", "completion": "b"}, '{"prompt": "a" "completion": "b"}'],
            load_sft,
            ":2: invalid JSON (Expecting ','",
        ),
        ([{"prompt": "a", "completion": "b"}, "[1, 2]"], load_sft, ":2: expected a JSON object, got list"),
        ([{"prompt": "a", "completion": 3}], load_sft, ":1: field 'completion': expected a string, got int"),
        ([{"completion": "b"}], load_sft, ":1: field 'prompt': missing"),
        ([{"prompt": "a", "completion": [{"role": "user", "content": "x"}]}], load_sft, "field 'completion'"),
        ([{"prompt": "  ", "completion": "b"}], load_sft, "field 'prompt': empty prompt"),
        (
            [{"prompt": [{"role": 1, "content": "x"}], "completion": "b"}],
            load_sft,
            "field 'prompt[0].role': expected a string, got int",
        ),
        ([{"prompt": [{"role": "user"}], "completion": "b"}], load_sft, "field 'prompt[0].content': missing"),
        ([{"prompt": [], "completion": "b"}], load_sft, "field 'prompt': empty list"),
        (
            [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "a", "rejected": "y"}],
            load_rankings,
            ":2: field 'chosen': missing",
        ),
        ([{"prompt": "a", "chosen": "x"}], load_rankings, ":1: field 'rejected': missing"),
        (
            [{"prompt": "a", "chosen": None, "rejected": "y"}],
            load_rankings,
            "field 'chosen': expected a string, got null",
        ),
        (
            [{"prompt": "a", "responses": ["x", "y", "z"], "ranking": [0, 0, 1]}],
            load_rankings,
            "field 'ranking': expected a permutation of 0..2",
        ),
        ([{"prompt": "a", "responses": ["x", "y"], "ranking": [0, 1, 2]}], load_rankings, "field 'ranking'"),
        (
            [{"prompt": "a", "responses": ["x", "y"], "ranking": [True, False]}],
            load_rankings,
            "field 'ranking': expected a list of integers",
        ),
        ([{"prompt": "a", "responses": ["x", "y"]}], load_rankings, "field 'ranking': missing"),
        (
            [{"prompt": "a", "responses": ["x"], "ranking": [0]}],
            load_rankings,
            "field 'responses': expected a list of at least 2",
        ),
        (
            [{"prompt": "a", "responses": ["x", 5], "ranking": [0, 1]}],
            load_rankings,
            "field 'responses[1]': expected a string, got int",
        ),
        ([{"text": "a"}], load_prompts, ":1: field 'prompt': missing"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, lines, loader, expected):
    path = write_lines(tmp_path / "prefs.jsonl", lines)
    with pytest.raises(DataError) as err:
        loader(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert expected in message, message


def test_missing_path_without_datasets_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*datasets"):
        load_sft(missing)


def test_hub_dataset_rows_are_validated(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "x"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"^org/prefs \(test\) row 1: field 'rejected': missing$"):
        load_rankings("org/prefs", split="test")
    assert calls == [("org/prefs", "test")]


# ------------------------------------------------------------------------------------------- tokenization


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def test_ensure_pad_token_adds_distinct_pad_and_resizes_model():
    tok = make_tokenizer()
    assert tok.pad_token is None
    model = tiny_llama(len(tok))
    assert ensure_pad_token(tok, model) is True
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id not in (None, tok.eos_token_id)
    assert model.get_input_embeddings().num_embeddings == len(tok) > tok.pad_token_id
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert ensure_pad_token(tok, model) is False  # idempotent


def test_ensure_pad_token_keeps_already_padded_embeddings():
    tok = make_tokenizer()
    model = tiny_llama(len(tok) + 8)  # checkpoints often round their vocabulary up
    assert ensure_pad_token(tok, model) is True
    assert model.get_input_embeddings().num_embeddings == len(tok) + 7


def test_ensure_pad_token_replaces_pad_equal_to_eos():
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    assert ensure_pad_token(tok) is True
    assert tok.pad_token_id != tok.eos_token_id


def test_encode_prompt_plain_adds_bos():
    tok = make_tokenizer()
    assert encode_prompt(tok, "hello world") == [1, *ids("hello", "world")]
    with pytest.raises(ValueError, match="chat_template"):
        encode_prompt(tok, [{"role": "user", "content": "hello"}])


def test_encode_prompt_with_chat_template():
    tok = make_tokenizer(CHAT_TEMPLATE)
    expected = [*ids("user", ":", "hello"), 2, *ids("assistant", ":")]
    assert encode_prompt(tok, "hello") == expected  # a string becomes one user message
    chat = [{"role": "system", "content": "fine"}, {"role": "user", "content": "hello"}]
    assert encode_prompt(tok, chat) == [*ids("system", ":", "fine"), 2, *expected]


def test_encode_response_ends_with_eos_without_bos():
    tok = make_tokenizer()
    assert encode_response(tok, "fine thanks") == [*ids("fine", "thanks"), tok.eos_token_id]
    assert encode_response(tok, "") == [tok.eos_token_id]


def test_filter_long_prompts_reports_instead_of_cutting():
    prompt_ids = [[1] * 3, [1] * 9, [1] * 5, [1] * 12]
    kept, report = filter_long_prompts(prompt_ids, 8, "prompts.jsonl")
    assert kept == [0, 2]
    assert (
        report == "prompts.jsonl: 2 of 4 prompts exceed the limit of 8 tokens: #1 (9 tokens), #3 (12 tokens)"
    )
    _, report = filter_long_prompts(prompt_ids, 8, "prompts.jsonl", lines=[1, 2, 4, 7])
    assert "line 2 (9 tokens), line 7 (12 tokens)" in report
    assert filter_long_prompts(prompt_ids, 12, "x") == ([0, 1, 2, 3], None)
    _, report = filter_long_prompts([[0] * 5] * 13, 4, "x")
    assert report.startswith("x: 13 of 13 prompts") and report.endswith("#9 (5 tokens), and 3 more")


# --------------------------------------------------------------------------------------------- batching


def test_pad_left_and_right():
    ids_l, mask_l = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids_l.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask_l.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids_r, mask_r = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids_r.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask_r.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids_r.dtype == mask_r.dtype == torch.long
    with pytest.raises(ValueError):
        pad_right([[1], []], pad_id=0)


def test_sft_batch_masks_completion_tokens_only():
    batch = sft_batch([([1, 10, 11], [20, 2]), ([1, 12], [21, 22, 23, 2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, 2, 0], [1, 12, 21, 22, 23, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # Masked tokens are exactly the completion (EOS included), never the prompt or padding.
    ids0, m0 = batch["input_ids"][0], batch["loss_mask"][0].bool()
    assert ids0[m0].tolist() == [20, 2]


def test_ranking_batch_k3_pairs_and_groups():
    items = [
        ([1, 10], [[30, 2], [31, 32, 2], [33, 2]], [2, 0, 1]),  # best: response 2, then 0, then 1
        ([1], [[40, 2], [41, 2]], [0, 1]),
    ]
    batch = ranking_batch(items, pad_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 10, 30, 2, 0],
        [1, 10, 31, 32, 2],
        [1, 10, 33, 2, 0],
        [1, 40, 2, 0, 0],
        [1, 41, 2, 0, 0],
    ]
    assert batch["last_index"].tolist() == [3, 4, 3, 2, 2]
    assert batch["pairs"].tolist() == [[2, 0], [2, 1], [0, 1], [3, 4]]
    assert batch["group"].tolist() == [0, 0, 0, 1]
    assert batch["pairs"].dtype == batch["group"].dtype == torch.long
    weight = batch["pair_weight"]
    assert weight.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    # Each ranking counts once whatever its K: the weights of each group sum to 1 / n_items.
    assert torch.zeros(2).index_add_(0, batch["group"], weight).tolist() == pytest.approx([0.5, 0.5])


def test_ranking_batch_rejects_bad_ranking():
    with pytest.raises(ValueError, match="permutation"):
        ranking_batch([([1], [[2], [3]], [0, 0])], pad_id=0)
    with pytest.raises(ValueError, match="permutation"):
        ranking_batch([([1], [[2]], [0])], pad_id=0)
