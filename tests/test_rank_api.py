"""``fastrlhf rank`` without a browser: input checks, the record mapping, the store, and the HTTP API."""

from __future__ import annotations

import json
import random
import socket
from collections import Counter
from pathlib import Path

import pytest
from rank_support import ServerProcess, ThreadServer, read_out, sample_records, write_jsonl

from fastrlhf.cli import main as cli_main
from fastrlhf.data import DataError, load_rankings
from fastrlhf.rank.store import RankingStore, SubmissionError, build_record
from fastrlhf.rank.task import Item, RankConfig, load_task, shown_order


def cfg_for(tmp_path: Path, records: list[dict], **options) -> RankConfig:
    data = write_jsonl(tmp_path / "to_rank.jsonl", records)
    return RankConfig(data=str(data), out=str(tmp_path / "rankings.jsonl"), **options)


# ------------------------------------------------------------------------------------------ input checks

GOOD = {"prompt": "p", "responses": ["a", "b"]}


@pytest.mark.parametrize(
    ("bad", "field", "problem"),
    [
        ({"responses": ["a", "b"]}, "prompt", "missing"),
        ({"prompt": "  ", "responses": ["a", "b"]}, "prompt", "empty prompt"),
        ({"prompt": [{"role": "user"}], "responses": ["a", "b"]}, "prompt[0].content", "expected a string"),
        ({"prompt": "p"}, "responses", "missing"),
        ({"prompt": "p", "responses": "ab"}, "responses", "expected a list of 2..16, got str"),
        ({"prompt": "p", "responses": ["only"]}, "responses", "got 1"),
        ({"prompt": "p", "responses": ["a", "b"] * 9}, "responses", "got 18"),
        ({"prompt": "p", "responses": ["a", 3]}, "responses[1]", "expected a string, got int"),
        ({"prompt": "p", "responses": ["a", "b"], "id": ""}, "id", "non-empty"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, bad, field, problem):
    cfg = cfg_for(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(DataError) as e:
        load_task(cfg)
    assert (e.value.source, e.value.line, e.value.field) == (cfg.data, 3, field)
    assert problem in str(e.value)


def test_invalid_json_duplicate_ids_and_options(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        load_task(RankConfig(data=str(path)))
    cfg = cfg_for(tmp_path, [{**GOOD, "id": "x"}, {**GOOD, "id": 7}, {**GOOD, "id": "x"}])
    with pytest.raises(DataError, match=r":3: field 'id': 'x' was already used on line 1"):
        load_task(cfg)
    cfg = cfg_for(tmp_path, [GOOD] * 3, overlap=4)
    with pytest.raises(ValueError, match="overlap: 4 items asked for"):
        load_task(cfg)
    with pytest.raises(ValueError, match="flags: 'Bad Id'"):
        RankConfig(data="x", flags="Bad Id:label").check()
    with pytest.raises(ValueError, match="port"):
        RankConfig(data="x", port=70000).check()
    with pytest.raises(FileNotFoundError, match=r"data: .*missing\.jsonl"):
        load_task(RankConfig(data=str(tmp_path / "missing.jsonl")))


def test_item_ids_are_stable_and_duplicates_stay_distinct(tmp_path):
    records = [GOOD, {"prompt": "q", "responses": ["c", "d", "e"]}, GOOD, {**GOOD, "id": 12}]
    cfg = cfg_for(tmp_path, records, overlap=2, seed=3)
    first, again = load_task(cfg), load_task(cfg)
    ids = [i.item_id for i in first.items]
    assert len(set(ids)) == 4 and ids[2] == ids[0] + "-2" and ids[3] == "12"
    assert ids == [i.item_id for i in again.items] and first.task_id == again.task_id
    assert [i.overlap for i in first.items] == [i.overlap for i in again.items]
    assert sum(i.overlap for i in first.items) == 2
    write_jsonl(Path(cfg.data), [*records, GOOD])
    assert load_task(cfg).task_id != first.task_id  # another file is another task


def test_shown_order_is_a_per_labeler_permutation_without_position_bias():
    k, n = 5, 4000
    at_top = Counter()
    differs = 0
    for i in range(n):
        order = shown_order(0, "alice", f"item{i}", k)
        assert sorted(order) == list(range(k))
        assert order == shown_order(0, "alice", f"item{i}", k)  # survives a restart
        differs += order != shown_order(0, "bob", f"item{i}", k)
        at_top[order[0]] += 1
    assert differs > 0.9 * n  # 1 - 1/120 of orders differ between two labelers
    for index in range(k):  # each response lands on top 1/K of the time: 800 +- 4 sigma (25)
        assert abs(at_top[index] - n / k) < 4 * (n * (1 / k) * (1 - 1 / k)) ** 0.5


# ------------------------------------------------------------------------------------------ records


def test_record_maps_screen_positions_to_response_indices():
    rng = random.Random(7)
    for trial in range(50):
        k = rng.randint(2, 7)
        item = Item(f"i{trial}", "p", [f"text {j}" for j in range(k)], line=1)
        shown = list(range(k))
        rng.shuffle(shown)
        positions = list(range(k))
        rng.shuffle(positions)
        tiers, start = [], 0
        while start < k:  # random tier sizes 1..3
            size = rng.randint(1, 3)
            tiers.append(positions[start : start + size])
            start += size
        ratings = {str(p): rng.randint(1, 7) for p in range(k) if rng.random() < 0.5}
        flags = {p: ["unsafe"] for p in range(k) if rng.random() < 0.3}
        body = {"status": "ranked", "tiers": tiers, "ratings": ratings, "flags": flags}
        body["unchanged_order_confirmed"] = True
        record = build_record(item, "alice", shown, body, {"unsafe", "opinion"})
        # What the labeler saw at screen position p is responses[shown[p]]; compare by text.
        seen = [item.responses[shown[p]] for p in range(k)]
        assert [record["responses"][i] for i in record["ranking"]] == [seen[p] for t in tiers for p in t]
        assert [[record["responses"][i] for i in g] for g in record["ties"]] == [
            [seen[p] for p in t] for t in tiers if len(t) > 1
        ]
        for p, value in ratings.items():
            assert record["ratings"][str(shown[int(p)])] == value
        assert set(record["flags"]) == {str(shown[p]) for p in flags}
        assert record["shown_order"] == shown and record["status"] == "ranked"
        unchanged = all(len(t) == 1 for t in tiers) and [t[0] for t in tiers] == list(range(k))
        assert record["unchanged_order_confirmed"] is unchanged


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "done"}, "status"),
        ({"tiers": [[0, 1]]}, "tiers"),  # position 2 missing
        ({"tiers": [[0, 1], [1, 2]]}, "tiers"),  # duplicate
        ({"tiers": [[0], [1], [3]]}, "tiers"),  # out of range
        ({"tiers": [[0], [], [1, 2]]}, "tiers"),  # empty tier
        ({"tiers": [[0], [True], [2]]}, "tiers"),  # a bool is not a position
        ({"tiers": [[2], [1], [0]], "ratings": {"0": 8}}, "ratings"),
        ({"tiers": [[2], [1], [0]], "ratings": {"0": True}}, "ratings"),
        ({"tiers": [[2], [1], [0]], "ratings": {"5": 3}}, "ratings"),
        ({"tiers": [[2], [1], [0]], "flags": {"0": ["nope"]}}, "flags"),
        ({"tiers": [[2], [1], [0]], "comment": 3}, "comment"),
        ({"tiers": [[0], [1], [2]]}, "unchanged_order_confirmed"),
        ({"tiers": [[2], [1], [0]], "unchanged_order_confirmed": "yes"}, "unchanged_order_confirmed"),
    ],
)
def test_bad_submissions_are_refused_naming_the_field(body, field):
    item = Item("i", "p", ["a", "b", "c"], line=1)
    with pytest.raises(SubmissionError) as e:
        build_record(item, "alice", [1, 2, 0], {"status": "ranked", **body}, {"unsafe"})
    assert e.value.field == field


def test_store_drops_a_torn_last_line_and_rejects_foreign_or_corrupt_files(tmp_path):
    cfg = cfg_for(tmp_path, sample_records(3, 3))
    task = load_task(cfg)
    item = task.items[0]
    record = build_record(item, "al", [0, 1, 2], {"status": "ranked", "tiers": [[2], [0, 1]]}, set())
    store = RankingStore(cfg.out, task)
    store.append(record)
    with pytest.raises(SubmissionError, match="already submitted"):
        store.append(record)
    store.close()
    good = Path(cfg.out).read_bytes()
    Path(cfg.out).write_bytes(good + b'{"prompt": "half a rec')  # a kill in the middle of a write
    store = RankingStore(cfg.out, task)
    assert Path(cfg.out).read_bytes() == good
    assert store.submitted("al", item.item_id) and not store.submitted("bob", item.item_id)
    assert not store.available_to("bob", item)  # ranked by someone: done for everyone (not overlap)
    assert store.progress("al").done == 1 and store.progress("al").remaining == 2
    store.close()
    Path(cfg.out).write_bytes(b"{broken\n" + good)
    with pytest.raises(DataError, match=r"rankings\.jsonl:1: invalid JSON"):
        RankingStore(cfg.out, task)
    Path(cfg.out).write_bytes(good.replace(item.item_id.encode(), b"elsewhere"))
    with pytest.raises(DataError, match=r":1: field 'item_id': 'elsewhere' is not an item"):
        RankingStore(cfg.out, task)


# ------------------------------------------------------------------------------------------ HTTP


def test_guard_refuses_requests_that_do_not_match_the_task(tmp_path):
    with ThreadServer(cfg_for(tmp_path, sample_records(2, 3))) as client:
        status, _, headers = client.call("/api/task")
        assert status == 200
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "unsafe-inline" not in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        cases = [
            ({"X-Rank-Token": None}, 403, "token"),
            ({"X-Rank-Token": client.token + "x"}, 403, "token"),
            ({"X-Rank-Task": "0123456789abcdef"}, 409, "another ranking task"),
            ({"X-Rank-Task": None}, 409, "another ranking task"),
            ({"Host": "evil.example"}, 403, "host"),
            ({"Host": "evil.example:80"}, 403, "host"),
            ({"Origin": "http://evil.example"}, 403, "cross-origin"),
            ({"Origin": "null"}, 403, "cross-origin"),
            ({"Sec-Fetch-Site": "cross-site"}, 403, "cross-site"),
        ]
        for headers_sent, code, words in cases:
            status, body, headers = client.call("/api/next?labeler=al", headers=headers_sent)
            assert (status, body["code"]) == (code, "refused"), headers_sent
            assert words in body["error"] and "content-security-policy" in headers
        host = client.base.removeprefix("http://")
        status, _, _ = client.call("/api/next?labeler=al", headers={"Origin": f"http://{host}"})
        assert status == 200
        # The page and its scripts carry no data, so they need no token; a foreign Host still gets nothing.
        page, _, headers = client.call("/", headers={"X-Rank-Token": None, "X-Rank-Task": None})
        assert page == 200 and "frame-ancestors 'none'" in headers["content-security-policy"]
        assert client.call("/static/app.js", headers={"Host": "evil.example"})[0] == 403
        assert client.call("/api/submit", raw=b"x" * 300_000)[0] == 413
        assert client.call("/api/submit", raw=b"[1]")[0] == 400
        assert client.call("/api/submit", {"labeler": "al", "item_id": ["x"], "status": "ranked"})[0] == 400
        assert (
            client.call("/", headers={"Sec-Fetch-Site": "cross-site"})[0] == 200
        )  # a link may open the page
        assert client.call("/api/next?labeler=%3Cscript%3E")[0] == 400
    assert not Path(tmp_path / "rankings.jsonl").read_text()  # nothing refused was written


def test_two_labelers_overlap_reservations_skip_cannot_rank_and_resume(tmp_path):
    cfg = cfg_for(tmp_path, sample_records(5, 3), overlap=1, seed=0)
    task = load_task(cfg)
    ids = [i.item_id for i in task.items]
    assert [i.overlap for i in task.items] == [False, False, False, True, False]  # seed 0 picks item 3
    with ThreadServer(cfg) as client:
        info = client.call("/api/task")[1]
        assert (
            info["items"] == 5 and info["overlap"] == 1 and ["unsafe", "Unsafe or harmful"] in info["flags"]
        )
        a, b = client.next("alice")["item"], client.next("bob")["item"]
        assert (a["item_id"], b["item_id"]) == (ids[0], ids[1])  # item 0 is held for alice
        assert client.next("alice")["item"] == a  # reloading the page gives the same item
        order = shown_order(cfg.seed, "alice", ids[0], 3)
        assert a["responses"] == [task.items[0].responses[i] for i in order]  # alice's own order
        status, body = client.submit("alice", ids[0], tiers=[[0], [1], [2]])
        assert (status, body["field"]) == (400, "unchanged_order_confirmed")
        status, body = client.submit("alice", ids[0], tiers=[[0], [1], [2]], unchanged_order_confirmed=True)
        assert status == 200 and body["progress"] == {"done": 1, "remaining": 4}
        status, body = client.submit("alice", ids[0], tiers=[[2], [1], [0]])
        assert (status, body["code"]) == (409, "already_submitted")
        assert client.next("alice")["item"]["item_id"] == ids[2]  # item 1 is held for bob
        assert client.submit("bob", ids[1], status="skipped", comment="not my field")[0] == 200
        assert client.submit("alice", ids[2], tiers=[[1, 2], [0]])[0] == 200
        got = []
        while (nxt := client.next("alice")["item"]) is not None:
            got.append(nxt["item_id"])
            status_value = "cannot_rank" if nxt["item_id"] == ids[1] else "ranked"
            assert client.submit("alice", nxt["item_id"], status=status_value, tiers=[[2], [0, 1]])[0] == 200
        assert got == [ids[1], ids[3], ids[4]]  # bob's skip left item 1 to alice
        assert client.next("bob")["item"]["item_id"] == ids[3]  # only the shared item is left for bob
        assert (
            client.submit("bob", ids[3], tiers=[[1], [0], [2]], ratings={"1": 7}, flags={"2": ["unsafe"]})[0]
            == 200
        )
        assert client.next("bob") == {"item": None, "progress": {"done": 2, "remaining": 0}}
    records = read_out(Path(cfg.out))
    assert [(r["labeler"], r["item_id"], r["status"]) for r in records] == [
        ("alice", ids[0], "ranked"),
        ("bob", ids[1], "skipped"),
        ("alice", ids[2], "ranked"),
        ("alice", ids[1], "cannot_rank"),
        ("alice", ids[3], "ranked"),
        ("alice", ids[4], "ranked"),
        ("bob", ids[3], "ranked"),
    ]
    bob_order = shown_order(cfg.seed, "bob", ids[3], 3)
    assert records[-1]["ranking"] == [bob_order[1], bob_order[0], bob_order[2]]
    assert records[-1]["ratings"] == {str(bob_order[1]): 7} and records[-1]["flags"] == {
        str(bob_order[2]): ["unsafe"]
    }
    assert (
        records[0]["unchanged_order_confirmed"] is True and records[2]["unchanged_order_confirmed"] is False
    )
    for r in records:
        assert r["shown_order"] == shown_order(cfg.seed, r["labeler"], r["item_id"], 3)
        assert (
            r["responses"] == task.by_id[r["item_id"]].responses
            and r["prompt"] == task.by_id[r["item_id"]].prompt
        )
        if r["status"] != "ranked":
            assert r["ranking"] == [] and r["ties"] == []
    # A restarted server resumes: nothing is left for either labeler; a new one gets the shared item.
    with ThreadServer(cfg) as client:
        assert client.next("alice")["item"] is None and client.next("bob")["item"] is None
        assert client.next("carol")["item"]["item_id"] == ids[3]


def test_kill_9_loses_nothing_confirmed_and_resumes(tmp_path):
    cfg = cfg_for(tmp_path, sample_records(4, 3))
    out = Path(cfg.out)
    with ServerProcess(Path(cfg.data), out) as server:
        for expected_done in (1, 2):
            nxt = server.client.next("alice")["item"]
            status, body = server.client.submit("alice", nxt["item_id"], tiers=[[2], [1], [0]])
            assert status == 200 and body["progress"]["done"] == expected_done
        third = server.client.next("alice")["item"]["item_id"]
        server.kill()  # SIGKILL: no shutdown handler runs
    assert len(read_out(out)) == 2  # both confirmed submissions were on disk before the replies
    with out.open("a") as f:
        f.write('{"prompt": "torn')  # as if killed in the middle of a write
    with ServerProcess(Path(cfg.data), out) as server:
        assert any("2 submissions already" in line for line in server.output)
        assert server.client.next("alice")["item"]["item_id"] == third
        assert server.client.submit("alice", third, tiers=[[0, 1, 2]])[0] == 200
    records = read_out(out)
    assert len(records) == 3 and records[2]["ties"] == [records[2]["ranking"]]


def test_output_is_what_the_reward_model_reads_and_the_report_prints(tmp_path, capsys):
    records = [{"prompt": [{"role": "user", "content": "hi"}], "responses": ["a", "bb", "ccc"]}]
    cfg = cfg_for(tmp_path, [*records, *sample_records(3, 4)], overlap=2)
    with ThreadServer(cfg) as client:
        for name in ("alice", "bob"):
            while (nxt := client.next(name)["item"]) is not None:
                k = len(nxt["responses"])
                if name == "bob" and client.next("bob")["progress"]["done"] == 1:
                    assert client.submit(name, nxt["item_id"], status="cannot_rank")[0] == 200
                    continue
                tiers = [[k - 1, k - 2], *([p] for p in reversed(range(k - 2)))]  # a tie at the top
                assert client.submit(name, nxt["item_id"], tiers=tiers)[0] == 200
    out = Path(cfg.out)
    written = read_out(out)
    assert [r["status"] for r in written].count("cannot_rank") == 1 and len(written) == 6
    # fastrlhf rm reads the file as written: ranked records only, their tie groups kept.
    loaded = load_rankings(out)
    ranked = [r for r in written if r["status"] == "ranked"]
    assert [(x.prompt, x.responses, x.ranking, x.ties) for x in loaded] == [
        (r["prompt"], r["responses"], r["ranking"], r["ties"]) for r in ranked
    ]
    assert all(len(r["ties"]) == 1 and len(r["ties"][0]) == 2 for r in ranked)
    assert cli_main(["rank", "--report", "--out", str(out), "--data", cfg.data]) == 0
    text = capsys.readouterr().out
    assert "items finished (ranked or cannot_rank): 4 of 4" in text
    assert "items ranked by two or more labelers: 1" in text
    assert "alice vs bob: 1 items, pairwise " in text
    assert "best response was shown first: 0.0%" in text  # the top tier never held position 0


def test_cli_reports_bad_input_before_serving(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "p", "responses": ["x", None]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli_main(["rank", "--data", str(data), "--out", str(out), "--port", "0"]) == 1
    assert f"{data}:2: field 'responses[1]': expected a string" in capsys.readouterr().err
    assert not out.exists()  # failed before anything was created or bound
    assert cli_main(["rank", "--data", str(data), "--overlap", "-1"]) == 2  # a bad option
    assert "overlap: expected >= 0" in capsys.readouterr().err
    write_jsonl(data, [GOOD])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert cli_main(["rank", "--data", str(data), "--out", str(out), "--port", port]) == 1
    assert f"port: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not out.exists()
