"""``fastrlhf rank`` to ``fastrlhf rm``: a reward model trains on what the ranking page wrote."""

from __future__ import annotations

from pathlib import Path

from rank_support import ThreadServer, read_out, write_jsonl
from transformers import LlamaForCausalLM

from fastrlhf.config import ModelConfig, RMConfig
from fastrlhf.demo_task import DemoTask, build_tokenizer, tiny_llama_config
from fastrlhf.rank.task import RankConfig, load_task, shown_order
from fastrlhf.rm import train_rm


def test_reward_model_trains_on_the_collected_rankings(tmp_path, torch_backend):
    """The issue's last step: ``fastrlhf rm --data rankings.jsonl`` on what the page wrote."""
    demo = DemoTask(seed=0)
    samples = [
        {"prompt": r["prompt"], "responses": r["responses"]} for r in demo.ranking_records(13, 3, seed=2)
    ]
    data = write_jsonl(tmp_path / "to_rank.jsonl", samples)
    cfg = RankConfig(data=str(data), out=str(tmp_path / "rankings.jsonl"))
    task = load_task(cfg)
    with ThreadServer(cfg) as client:
        n = 0
        while (nxt := client.next("oracle")["item"]) is not None:
            item = task.by_id[nxt["item_id"]]
            shown = shown_order(cfg.seed, "oracle", item.item_id, 3)
            gold = demo.rank(item.prompt, item.responses)  # response indices, best first
            tiers = [[shown.index(i)] for i in gold]
            if n == 0:
                tiers = [tiers[0] + tiers[1], tiers[2]]  # one tie
            status = "cannot_rank" if n == 1 else "ranked"
            sent = {"status": status, "tiers": tiers, "unchanged_order_confirmed": True}
            assert client.submit("oracle", item.item_id, **sent)[0] == 200
            n += 1
    written = read_out(Path(cfg.out))
    assert len(written) == 13
    for r in written[2:]:  # the page stored the gold order, mapped back through the shown order
        assert r["ranking"] == demo.rank(r["prompt"], r["responses"])
    tok_dir = tmp_path / "base"
    tok = build_tokenizer()
    LlamaForCausalLM(tiny_llama_config(tok, hidden_size=32, layers=1, intermediate=64)).save_pretrained(
        tok_dir
    )
    tok.save_pretrained(tok_dir)
    rm_cfg = RMConfig(
        model=str(tok_dir), data=cfg.out, out=str(tmp_path / "rm"), batch_size=4, micro_batch_size=4,
        eval_fraction=0.25, model_config=ModelConfig(dtype="float32"),
    )  # fmt: skip
    _, _, rm_dir, accuracy = train_rm(rm_cfg)
    assert (rm_dir / "model.safetensors").exists() and 0.0 <= accuracy <= 1.0
