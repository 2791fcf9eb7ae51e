"""`fastrlhf rm` input: ties, status, judge probabilities, and the public preference formats read natively."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from fastrlhf.data import DataError, Ranking, load_rankings, load_samples

CHAT = [{"role": "user", "content": "hi"}]


def write(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_shared_schema_with_ties_status_and_probs(tmp_path):
    probs = [[0.5, 0.9, 0.7], [0.1, 0.5, 0.4], [0.3, 0.6, 0.5]]
    path = write(
        tmp_path / "r.jsonl",
        [
            {
                "prompt": "p",
                "responses": ["a", "b", "c"],
                "ranking": [0, 2, 1],
                "ties": [[2, 1]],
                "labeler": "x",
            },
            {"prompt": "p", "responses": ["a", "b"], "ranking": [], "ties": [], "status": "cannot_rank"},
            {"prompt": "p", "responses": ["a", "b"], "ranking": [], "status": "skipped"},
            {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 2, 1], "pairwise_probs": probs},
        ],
    )
    first, second = load_rankings(path)
    assert first == Ranking("p", ["a", "b", "c"], [0, 2, 1], ties=[[2, 1]])
    assert (first.line, second.line) == (1, 4)
    assert second.pairwise_probs == probs and second.ties == []


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"ranking": [0, 1, 2], "ties": [[0]]}, ":1: field 'ties[0]': expected a list of at least 2"),
        ({"ranking": [0, 1, 2], "ties": [[0, 3]]}, "field 'ties[0]': expected indices in 0..2, got 3"),
        (
            {"ranking": [0, 1, 2], "ties": [[0, 1], [1, 2]]},
            "field 'ties[1]': response 1 is in two tie groups",
        ),
        ({"ranking": [0, 1, 2], "ties": "0,1"}, "field 'ties': expected a list of groups"),
        ({"ranking": [0, 1, 2], "status": "done"}, "field 'status': expected one of ranked, cannot_rank"),
        ({"ranking": [0, 1, 2], "pairwise_probs": [[0.5, 1.0]]}, "field 'pairwise_probs': expected a 3 x 3"),
        (
            {"ranking": [0, 1, 2], "pairwise_probs": [[0.5, 0.9, 0.5], [0.9, 0.5, 0.5], [0.5, 0.5, 0.5]]},
            "field 'pairwise_probs[0][1]': p[i][j] + p[j][i] must be 1",
        ),
        (
            {"ranking": [0, 1, 2], "pairwise_probs": [[0.5, 1.5, 0.5], [-0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]},
            "field 'pairwise_probs[0][1]': expected a probability in [0, 1], got 1.5",
        ),
    ],
)
def test_bad_tie_status_and_prob_fields_name_the_field(tmp_path, record, expected):
    path = write(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"], **record}])
    with pytest.raises(DataError, match=re.escape(expected)) as err:
        load_rankings(path)
    assert str(err.value).startswith(str(path))


def test_trl_explicit_and_implicit_prompt_pairs(tmp_path):
    answer = lambda text: [{"role": "assistant", "content": text}]
    path = write(
        tmp_path / "trl.jsonl",
        [
            {"prompt": "p", "chosen": "good", "rejected": "bad"},
            {"prompt": CHAT, "chosen": answer("good"), "rejected": answer("bad")},
            {"chosen": [*CHAT, *answer("good")], "rejected": [*CHAT, *answer("bad")]},
        ],
    )
    assert load_rankings(path) == [
        Ranking("p", ["good", "bad"], [0, 1]),
        Ranking(CHAT, ["good", "bad"], [0, 1]),
        Ranking(CHAT, ["good", "bad"], [0, 1]),
    ]
    bad = write(tmp_path / "bad.jsonl", [{"chosen": [*CHAT, *answer("a")], "rejected": answer("b")}])
    with pytest.raises(DataError, match=":1: field 'chosen': with no 'prompt'"):
        load_rankings(bad)


def test_hh_rlhf_transcripts_split_at_the_last_shared_assistant_turn(tmp_path):
    shared = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    replies = [" The answer is 6.", " The answer is 7."]
    path = write(tmp_path / "hh.jsonl", [{"chosen": shared + replies[0], "rejected": shared + replies[1]}])
    (ranking,) = load_rankings(path)
    # The replies share " The answer is ": the split is at the last shared turn, not the longest prefix.
    assert ranking == Ranking(shared, replies, [0, 1])
    bad = write(tmp_path / "bad.jsonl", [{"chosen": "yes", "rejected": "no"}])
    with pytest.raises(DataError, match=":1: field 'chosen': no prompt"):
        load_rankings(bad)


def test_ultrafeedback_ranks_by_fine_grained_score_with_ties_and_drops_unrated(tmp_path):
    rating = lambda r: {"Rating": r, "Rationale": "..."}
    completions = [
        {"model": "m0", "response": "c0", "fine-grained_score": 3.5},
        {
            "model": "m1",
            "response": "c1",
            "fine-grained_score": "nan",
            "annotations": {"honesty": rating("N/A")},
        },
        {
            "model": "m2",
            "response": "c2",
            "annotations": {"honesty": rating("5"), "helpfulness": rating("4")},
        },
        {"model": "m3", "response": "c3", "fine-grained_score": 3.5},
        {"model": "m4", "response": "c4", "fine-grained_score": 1.25, "overall_score": 10},
    ]
    path = write(
        tmp_path / "uf.jsonl",
        [
            {"source": "x", "instruction": "Write.", "completions": completions},
            {"instruction": "Alone.", "completions": completions[:2]},  # one rated completion: not a ranking
        ],
    )
    (ranking,) = load_rankings(path)
    # Scores: c0 3.5, c2 4.5 (mean of its ratings), c3 3.5, c4 1.25; c1 has none and is dropped.
    assert ranking == Ranking("Write.", ["c0", "c2", "c3", "c4"], [1, 0, 2, 3], ties=[[0, 2]])
    bad = write(tmp_path / "bad.jsonl", [{"instruction": "x", "completions": [{"model": "m"}]}])
    with pytest.raises(DataError, match=re.escape(":1: field 'completions[0].response': missing")):
        load_rankings(bad)


def _oasst(mid, parent, role, text, rank=None, **kw):
    return {
        "message_id": mid,
        "parent_id": parent,
        "role": role,
        "text": text,
        "rank": rank,
        "lang": "en",
        **kw,
    }


def test_oasst_flat_rows_group_ranked_siblings_under_their_chat(tmp_path):
    rows = [
        _oasst("p", None, "prompter", "Hi?"),
        _oasst("a1", "p", "assistant", "Hello.", 1),
        _oasst("a0", "p", "assistant", "Hello!", 0),
        _oasst("a2", "p", "assistant", "Go away.", 2),
        _oasst("ax", "p", "assistant", "Unranked.", None),
        _oasst("f", "a0", "prompter", "How are you?"),
        _oasst("b0", "f", "assistant", "Fine.", 0),
        _oasst("b1", "f", "assistant", "Bad.", 1),
        _oasst("b2", "f", "assistant", "Deleted.", 2, deleted=True),
    ]
    first, second = load_rankings(write(tmp_path / "oa.jsonl", rows))
    assert first == Ranking([{"role": "user", "content": "Hi?"}], ["Hello.", "Hello!", "Go away."], [1, 0, 2])
    chat = [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert second == Ranking(chat, ["Fine.", "Bad."], [0, 1])
    orphan = write(
        tmp_path / "orphan.jsonl",
        [_oasst("a", "gone", "assistant", "x", 0), _oasst("b", "gone", "assistant", "y", 1)],
    )
    with pytest.raises(DataError, match=":1: field 'parent_id': message 'gone' is not in the data"):
        load_rankings(orphan)


def test_oasst_trees(tmp_path):
    tree = {
        "message_tree_id": "t",
        "prompt": {
            "message_id": "p",
            "role": "prompter",
            "text": "Hi?",
            "replies": [
                {"message_id": "a", "role": "assistant", "text": "Yo.", "rank": 1, "replies": []},
                {"message_id": "b", "role": "assistant", "text": "Hello.", "rank": 0, "replies": []},
            ],
        },
    }
    assert load_rankings(write(tmp_path / "trees.jsonl", [tree])) == [
        Ranking([{"role": "user", "content": "Hi?"}], ["Yo.", "Hello."], [1, 0])
    ]


def test_unrecognized_records_and_samples(tmp_path):
    with pytest.raises(DataError, match=":1: unrecognized record"):
        load_rankings(write(tmp_path / "x.jsonl", [{"text": "hello"}]))
    path = write(
        tmp_path / "s.jsonl",
        [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p", "responses": ["a", "b"]}],
    )
    first, second = load_samples(path)
    assert second.item_id == first.item_id + "-2" and len(first.item_id) == 12
    with pytest.raises(DataError, match=":2: field 'id': 'x' was already used"):
        load_samples(write(tmp_path / "d.jsonl", [{"prompt": "p", "responses": ["a", "b"], "id": "x"}] * 2))
    with pytest.raises(DataError, match=":1: field 'responses': expected a list of at least 2"):
        load_samples(write(tmp_path / "e.jsonl", [{"prompt": "p", "responses": ["a"]}]))


def test_parquet_files_go_through_datasets(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, data_files=None, split=None):
        calls.append((name, data_files, split))
        return [{"prompt": "p", "chosen": "good", "rejected": "bad"}]

    path = tmp_path / "prefs.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_rankings(path) == [Ranking("p", ["good", "bad"], [0, 1])]
    assert calls == [("parquet", {"train": str(path)}, "train")]
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"prefs\.parquet: reading \.parquet files needs the `datasets`"):
        load_rankings(path)
