"""The loop closed: `fastrlhf pipeline` judging N rounds, or stopping after sample for people and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from fastrlhf.cli import main
from fastrlhf.data import load_rankings
from fastrlhf.demo_task import DemoTask, build_tokenizer, tiny_llama_config

FLOAT32 = [f"--{stage}.model_config.dtype=float32" for stage in ("sft", "rm", "ppo", "judge")]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("loop")
    tok = build_tokenizer()
    LlamaForCausalLM(tiny_llama_config(tok, hidden_size=32, layers=1, intermediate=64)).save_pretrained(
        root / "base"
    )
    tok.save_pretrained(root / "base")
    # The judge is another model with its own vocabulary (the labels A and B are words of it).
    vocab = {
        t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", "A", "B", "Response", *"0123456789"])
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    judge_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = tiny_llama_config(judge_tok, hidden_size=32, layers=1, intermediate=64, max_positions=256)
    LlamaForCausalLM(config).save_pretrained(root / "judge")
    judge_tok.save_pretrained(root / "judge")
    task = DemoTask(seed=0)
    for name, records in [
        ("ranks", task.ranking_records(12, 3, seed=2)),
        ("prompts", task.prompt_records(8, seed=3)),
        ("fresh", task.prompt_records(6, seed=4)),
    ]:
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "base": root / "base", "judge": root / "judge"}


def _config(dirs, tmp_path: Path, **top) -> Path:
    root = dirs["root"]
    lines = [
        f"out: {tmp_path / 'run'}",
        "skip_sft: true",
        f"sft: {{model: {dirs['base']}}}",
        "rm: {batch_size: 2, micro_batch_size: 2, eval_fraction: 0.2}",
        f"ppo: {{prompts: {root / 'prompts.jsonl'}, steps: 1, rollout_batch_size: 8, num_minibatches: 2, "
        "micro_batch_size: 4, max_new_tokens: 6}",
        f"sample_prompts: {root / 'fresh.jsonl'}",
        "k: 3",
        *(f"{key}: {value}" for key, value in top.items()),
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pipeline_runs_sample_judge_rm_ppo_for_n_rounds(dirs, tmp_path, torch_backend, capsys):
    config = _config(dirs, tmp_path, labeling="judge", rounds=2, judge=f"{{model: {dirs['judge']}}}")
    # A random judge may tie whole prompts; with soft targets they still train (on p near 0.5).
    assert main(["pipeline", "--config", str(config), *FLOAT32, "--rm.soft_targets", "true"]) == 0
    outputs = json.loads((tmp_path / "run" / "outputs.json").read_text())
    assert set(outputs) == {"sft", "rm-1", "ppo-1", "rm-2", "ppo-2"}
    for r in (1, 2):
        samples = [json.loads(x) for x in (tmp_path / "run" / f"samples-{r}.jsonl").read_text().splitlines()]
        assert len(samples) == 6 and all(len(s["responses"]) == 3 for s in samples)
        rankings = load_rankings(tmp_path / "run" / f"rankings-{r}.jsonl")
        assert [x.responses for x in rankings] == [s["responses"] for s in samples]
        report = json.loads((tmp_path / "run" / f"rankings-{r}.bias.json").read_text())
        assert report["items"] == 6 and report["ordered_pairs"] == 36
    assert capsys.readouterr().out.count("first-position win rate") == 2
    # Round 2 sampled from round 1's policy: PPO updated it, so its samples are its own.
    assert json.loads((tmp_path / "run" / "round_data.json").read_text())["data-2"].endswith(
        "rankings-2.jsonl"
    )


def test_the_policy_may_not_judge_itself(dirs, tmp_path, capsys):
    config = _config(dirs, tmp_path, labeling="judge", rounds=1, judge=f"{{model: {dirs['base']}}}")
    assert main(["pipeline", "--config", str(config), *FLOAT32]) == 2  # refused with the other options
    assert "self-preference" in capsys.readouterr().err


def test_with_people_the_pipeline_stops_after_sample_and_resumes(dirs, tmp_path, torch_backend, capsys):
    root, task = dirs["root"], DemoTask(seed=0)
    config = _config(dirs, tmp_path, labeling="human")
    args = ["pipeline", "--config", str(config), *FLOAT32, "--rm.data", str(root / "ranks.jsonl")]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    samples = tmp_path / "run" / "samples-2.jsonl"
    rankings = tmp_path / "run" / "rankings-2.jsonl"
    assert f"fastrlhf rank --data {samples} --out {rankings}" in printed["next"]
    assert f"--resume true --more-rankings {rankings}" in printed["next"]
    assert set(printed) == {"sft", "rm-1", "ppo-1", "next"}
    # People rank the samples (here: by the gold reward, with the page's optional fields), then continue.
    records = [json.loads(x) for x in samples.read_text().splitlines()]
    ranked = [
        r | {"ranking": task.rank(r["prompt"], r["responses"]), "ties": [], "labeler": "ann"} for r in records
    ]
    ranked.append(records[0] | {"ranking": [], "status": "skipped", "labeler": "bob"})
    rankings.write_text("".join(json.dumps(r) + "\n" for r in ranked))
    round1 = Path(printed["rm-1"]) / "config.json"
    before = round1.stat().st_mtime_ns
    assert main([*args, "--resume", "true", "--more-rankings", str(rankings)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert round1.stat().st_mtime_ns == before  # round 1 was not trained again
    assert {"rm-2", "ppo-2"} <= set(printed) and "samples-3.jsonl" in printed["next"]
    assert (tmp_path / "run" / "samples-3.jsonl").exists()
