"""The LLM judge: verdicts from controlled answer-token logits, both orders, unshuffling, batching, the CLI.

A stub causal LM reads the two responses it is shown and puts planted logits on the label tokens, so every
probability the judge reports has a closed form. A tiny random Llama checks that the shared-prefix KV-cache
batching and the left-padded batching give the numbers of one plain forward per row.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from fastrlhf.cli import main
from fastrlhf.config import JudgeConfig
from fastrlhf.data import Sample, load_rankings
from fastrlhf.demo_task import tiny_llama_config
from fastrlhf.judge import LMJudge, judge_records
from fastrlhf.judge.verdicts import DEFAULT_TEMPLATE

RESPONSES = [f"r{d}" for d in range(10)]
WORDS = ["A", "B", "Response", ":", "Prompt", "better", "is", "q", "say", "user", "assistant", "{", "}"]
TEMPLATE = "Prompt : {prompt} Response A : {response_a} Response B : {response_b}{answer}better is"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS, *RESPONSES])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


class StubCache:
    """What the judge needs of a KV cache: the prefix it holds, repeatable along the batch."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def batch_repeat_interleave(self, n: int) -> None:
        self.ids = self.ids.repeat_interleave(n, dim=0)


class PlantedJudgeLM(torch.nn.Module):
    """Next-token logits: quality[first shown] + bias on "A", quality[second shown] on "B", else ``other``.

    The responses are the words r0..r9; the first one in the sequence is response A, the second response B.
    """

    def __init__(self, tokenizer, quality: list[float], bias: float = 0.0, other: float = -30.0) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab = len(tokenizer)
        self.a, self.b = tokenizer.convert_tokens_to_ids(["A", "B"])
        self.response_ids = tokenizer.convert_tokens_to_ids(RESPONSES)
        self.quality, self.bias, self.other = quality, bias, other
        self.calls: list[tuple[int, int]] = []  # (batch, new tokens) of every forward

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, logits_to_keep=0
    ):
        self.calls.append(tuple(input_ids.shape))
        full = input_ids if cache is None else torch.cat([cache.ids, input_ids], dim=1)
        mask = torch.ones_like(full) if attention_mask is None else attention_mask
        logits = torch.full((len(full), 1, self.vocab), self.other)
        for row in range(len(full)):
            seen = [int(t) for t in full[row][mask[row].bool()] if int(t) in self.response_ids]
            if len(seen) >= 2:
                first, second = (self.response_ids.index(t) for t in seen[:2])
                logits[row, 0, self.a] = self.quality[first] + self.bias
                logits[row, 0, self.b] = self.quality[second]
        return {"logits": logits, "cache": StubCache(full) if use_cache else None}


def samples(orders: list[list[int]]) -> list[Sample]:
    return [Sample("say q", [RESPONSES[i] for i in order], f"item{n}") for n, order in enumerate(orders)]


def cfg(**kw) -> JudgeConfig:
    return JudgeConfig(model="stub", template=str(kw.pop("template_path")), **kw)


@pytest.fixture
def template_path(tmp_path):
    path = tmp_path / "template.txt"
    path.write_text(TEMPLATE)
    return path


# -------------------------------------------------------------------------------- planted preferences


def test_a_judge_that_always_answers_first_yields_only_ties(template_path):
    tok = make_tokenizer()
    always_first = PlantedJudgeLM(tok, quality=[0.0] * 10, bias=4.0)
    judge = LMJudge(always_first, tok, cfg(template_path=template_path))
    records, report = judge_records(judge, samples([[3, 1, 4, 0, 2], [7, 5]]), judge.cfg)
    for record in records:
        k = len(record["responses"])
        assert record["ties"] == [record["ranking"]] and sorted(record["ranking"]) == list(range(k))
        assert torch.tensor(record["pairwise_probs"]) == pytest.approx(torch.full((k, k), 0.5), abs=1e-6)
    assert report["first_position_win_rate"] == 1.0 and report["order_consistency"] == 0.0
    assert report["tie_share"] == 1.0
    assert any("position bias" in w for w in report["warnings"])


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_planted_preference_is_recovered_with_its_closed_form(template_path, share_prefix):
    tok = make_tokenizer()
    gen = torch.Generator().manual_seed(3)
    quality = (torch.randn(10, generator=gen) * 2).tolist()
    lm = PlantedJudgeLM(tok, quality)
    judge = LMJudge(lm, tok, cfg(template_path=template_path, share_prefix=share_prefix, batch_size=7))
    orders = [[6, 2, 9, 0, 4], [1, 8, 5], [3, 7, 0, 2, 9, 5, 6]]  # the best response sits anywhere
    records, report = judge_records(judge, samples(orders), judge.cfg)
    for order, record in zip(orders, records, strict=True):
        q = [quality[i] for i in order]
        assert record["ranking"] == sorted(range(len(q)), key=lambda i: -q[i])  # no off-by-one, no swap
        assert record["ties"] == []
        expected = [
            [0.5 if i == j else 1 / (1 + math.exp(q[j] - q[i])) for j in range(len(q))] for i in range(len(q))
        ]
        assert torch.tensor(record["pairwise_probs"]) == pytest.approx(torch.tensor(expected), abs=2e-6)
    assert report["order_consistency"] == 1.0 and report["tie_share"] == 0.0
    assert report["label_mass_mean"] == pytest.approx(1.0, abs=1e-6)
    if share_prefix:  # one prefix forward, then ceil(K(K-1) / 7) suffix batches per prompt
        assert [b for b, _ in lm.calls] == [1, 7, 7, 6, 1, 6, 1, 7, 7, 7, 7, 7, 7]


def test_position_bias_ties_exactly_the_pairs_it_flips(template_path):
    tok = make_tokenizer()
    quality, bias = [0.0, 0.3, 1.1, 2.5, 0.9], 1.0
    judge = LMJudge(PlantedJudgeLM(tok, quality, bias=bias), tok, cfg(template_path=template_path))
    (record,), report = judge_records(judge, samples([[0, 1, 2, 3, 4]]), judge.cfg)
    sig = lambda x: 1 / (1 + math.exp(-x))
    probs = torch.tensor(record["pairwise_probs"])
    flipped = 0
    for i in range(5):
        for j in range(5):
            if i != j:
                d = quality[i] - quality[j]
                assert float(probs[i, j]) == pytest.approx(0.5 * (sig(d + bias) + sig(d - bias)), abs=2e-6)
                flipped += abs(d) < bias
    # |d| < 1 for (0,1), (0,4), (1,2), (1,4), (2,4): the first-shown always wins those, both orders disagree.
    assert flipped // 2 == 5
    assert report["order_consistency"] == pytest.approx(5 / 10)
    assert record["ranking"] == [3, 2, 4, 1, 0]
    assert record["ties"] == [[2, 4, 1]]  # contiguous and pairwise tied; 0 is decided against 2
    first_wins = sum(sig(quality[i] - quality[j] + bias) > 0.5 for i in range(5) for j in range(5) if i != j)
    assert report["first_position_win_rate"] == pytest.approx(first_wins / 20)


def test_low_label_mass_is_reported_not_hidden(template_path):
    tok = make_tokenizer()
    judge = LMJudge(PlantedJudgeLM(tok, [1.0, 0.0] * 5, other=1.0), tok, cfg(template_path=template_path))
    _, report = judge_records(judge, samples([[0, 1, 2]]), judge.cfg)
    assert report["label_mass_mean"] < 0.2
    assert any("label tokens" in w for w in report["warnings"])


def test_identical_responses_are_tied_and_braces_stay_literal(tmp_path):
    tok = make_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text("{ Prompt : {prompt} } Response A : {response_a} Response B : {response_b} better is")
    judge = LMJudge(PlantedJudgeLM(tok, list(range(10))), tok, JudgeConfig(template=str(path)))
    sample = Sample("say q", ["r5", "r2", "r5"], "x")
    (record,), _ = judge_records(judge, [sample], judge.cfg)
    assert record["ranking"] in ([0, 2, 1], [2, 0, 1]) and record["ties"] == [record["ranking"][:2]]


def test_chat_template_rendering(template_path):
    tok = make_tokenizer(chat=True)
    judge = LMJudge(PlantedJudgeLM(tok, list(range(10))), tok, cfg(template_path=template_path))
    assert judge.chat
    text = judge._render("say q", "r1", "r2")
    assert text.startswith("user : Prompt : say q") and text.endswith("<eos> assistant :better is")
    (record,), _ = judge_records(judge, samples([[1, 4, 2]]), judge.cfg)
    assert record["ranking"] == [1, 2, 0]


# ----------------------------------------------------------------------------------- template and labels


def test_template_and_label_errors_name_the_option(tmp_path, template_path):
    tok = make_tokenizer()
    lm = PlantedJudgeLM(tok, [0.0] * 10)
    bad = tmp_path / "bad.txt"
    for text, message in [
        ("Response A : {response_a} B : {response_b} better is", "{prompt} exactly once"),
        (TEMPLATE + " ", "ends with whitespace"),
        (TEMPLATE.replace("{answer}", "{answer}{answer}"), "{answer} may appear at most once"),
    ]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
            LMJudge(lm, tok, JudgeConfig(template=str(bad)))
    with pytest.raises(ValueError, match="label_a: 'Z'"):
        LMJudge(lm, tok, cfg(template_path=template_path, label_a="Z"))
    with pytest.raises(ValueError, match="label_b: 'A B'"):
        LMJudge(lm, tok, cfg(template_path=template_path, label_b="A B"))
    with pytest.raises(ValueError, match="share token ids"):
        LMJudge(lm, tok, cfg(template_path=template_path, label_b=" A"))
    with pytest.raises(ValueError, match="use_chat_template"):
        LMJudge(lm, tok, cfg(template_path=template_path, use_chat_template=True))
    assert DEFAULT_TEMPLATE.count("{response_a}") == 1


def test_long_responses_keep_both_ends(template_path):
    tok = make_tokenizer()
    judge = LMJudge(
        PlantedJudgeLM(tok, [0.0] * 10), tok, cfg(template_path=template_path, max_response_tokens=3)
    )
    text, cut = judge._truncate("r1 r2 r3 r4 r5")
    assert cut and text == "r1 r2 [...] r5"
    assert judge._truncate("r1 r2 r3") == ("r1 r2 r3", False)
    verdicts = judge.verdicts("say q", ["r1 r2 r3 r4", "r5"])
    assert verdicts.truncated == 1


# ----------------------------------------------------------------------------- a real model, batched


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("judge")
    tok = make_tokenizer()
    config = tiny_llama_config(tok, hidden_size=32, layers=2, intermediate=64, max_positions=128)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_shared_prefix_and_left_padded_batches_match_plain_forwards(tiny_judge_dir, template_path):
    tok = make_tokenizer()
    model = LlamaForCausalLM.from_pretrained(tiny_judge_dir).eval()
    responses = ["r1 r2", "r3", "r4 r5 r6 r7", "r8 r9 r0"]  # rows of different lengths
    results = []
    for share_prefix, batch_size in [(True, 5), (False, 3), (False, 1)]:
        judge = LMJudge(
            model, tok, cfg(template_path=template_path, share_prefix=share_prefix, batch_size=batch_size)
        )
        results.append(judge.verdicts("say q", responses))
    plain = results[-1]  # batch 1 without a cache: one plain forward per ordered pair
    with torch.no_grad():
        ids = judge._encode(judge._render("say q", responses[2], responses[0]))
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        a, b = judge.label_ids
        assert float(plain.first[2, 0]) == pytest.approx(
            float(torch.sigmoid(logp[a].logsumexp(0) - logp[b].logsumexp(0))), abs=1e-6
        )
    for other in results[:-1]:
        assert other.first == pytest.approx(plain.first, abs=2e-6)
        assert other.label_mass == pytest.approx(plain.label_mass, abs=2e-6)


def test_cli_judge_writes_rankings_rm_reads_and_a_bias_report(
    tiny_judge_dir, template_path, tmp_path, capsys
):
    data = tmp_path / "to_rank.jsonl"
    data.write_text(
        json.dumps({"prompt": "say q", "responses": ["r1", "r2 r3", "r4"]}) + "\n"
        + json.dumps({"prompt": "say q q", "responses": ["r5", "r6"], "id": 7}) + "\n"
    )  # fmt: skip
    out = tmp_path / "rankings.jsonl"
    args = ["judge", "--model", str(tiny_judge_dir), "--data", str(data), "--out", str(out)]
    assert main([*args, "--template", str(template_path), "--model_config.dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "first-position win rate" in printed and "label-token mass" in printed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["item_id"] for r in records][1] == "7" and records[0]["labeler"] == f"judge:{tiny_judge_dir}"
    report = json.loads((tmp_path / "rankings.bias.json").read_text())
    assert report["items"] == 2 and report["ordered_pairs"] == 8
    rankings = load_rankings(out)  # the pairwise matrix passes the trainer's checks
    assert [len(r.responses) for r in rankings] == [3, 2] and rankings[0].pairwise_probs is not None
    assert main([*args, "--aggregate", "borda"]) == 2  # a bad option: refused before the judge loads
    assert "aggregate: expected one of bradley_terry, copeland, got 'borda'" in capsys.readouterr().err
