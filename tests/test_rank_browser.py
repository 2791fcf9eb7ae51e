"""The ranking page end to end in real headless Chromium (Debian's ``chromium``, driven by Playwright).

Skipped only where Chromium or Playwright is truly absent; under CI (``CI=true``, where ``.ci/run`` installs
both) their absence fails the run instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from rank_support import XSS, ServerProcess, ThreadServer, read_out, write_jsonl

from fastrlhf.rank.task import RankConfig, load_task, shown_order

CHROMIUM = os.environ.get("FASTRLHF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing under CI: .ci/run must install it")
    pytest.skip(f"{what} is not installed (apt-get install chromium; pip install playwright)")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package")
    if CHROMIUM is None:
        _missing("chromium")
    with sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=60_000)
        yield b
        b.close()


class Page:
    """One labeler's page; records page errors so that a test fails on any script error."""

    def __init__(self, browser, url: str, labeler: str) -> None:
        self.context = browser.new_context(viewport={"width": 1100, "height": 900})
        self.context.set_default_timeout(20_000)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)
        self.page.fill("#labeler-name", labeler)
        self.page.click("#login-form button")
        self.page.wait_for_selector("#tiers .card")

    @property
    def item_id(self) -> str:
        return self.page.get_attribute("#work", "data-item") or ""

    def card(self, pos: int):
        return self.page.locator(f'#tiers .card[data-pos="{pos}"]')

    def tiers(self) -> list[list[int]]:
        return self.page.eval_on_selector_all(
            "#tiers .tier",
            "ts => ts.map(t => [...t.querySelectorAll('.card')].map(c => Number(c.dataset.pos)))",
        )

    def texts(self) -> dict[int, str]:
        return {
            int(pos): text
            for pos, text in self.page.eval_on_selector_all(
                "#tiers .card", "cs => cs.map(c => [c.dataset.pos, c.querySelector('.response').textContent])"
            )
        }

    def wait_for_next(self, previous: str) -> None:
        self.page.wait_for_function(
            "prev => document.getElementById('work').dataset.item !== prev", arg=previous, timeout=20_000
        )

    def close(self) -> None:
        self.context.close()


def make_cfg(tmp_path: Path, records, **options) -> RankConfig:
    data = write_jsonl(tmp_path / "to_rank.jsonl", records)
    return RankConfig(data=str(data), out=str(tmp_path / "out.jsonl"), **options)


def four_way(n: int) -> list[dict]:
    return [
        {"prompt": f"question {i}?", "responses": [f"answer {i}.{j}" + "!" * j for j in range(4)]}
        for i in range(n)
    ]


def test_drag_keyboard_ties_ratings_flags_and_comment(browser, tmp_path):
    cfg = make_cfg(tmp_path, four_way(3))
    task = load_task(cfg)
    with ThreadServer(cfg) as client:
        page = Page(browser, client.url, "alice")
        first = page.item_id
        shown = shown_order(cfg.seed, "alice", first, 4)
        texts = page.texts()
        assert texts == {p: task.by_id[first].responses[shown[p]] for p in range(4)}
        assert page.tiers() == [[0], [1], [2], [3]]
        handle = {"x": 14, "y": 14}
        # Drag C onto the top third of A: C goes first.
        page.card(2).drag_to(page.card(0), source_position=handle, target_position={"x": 200, "y": 4})
        assert page.tiers() == [[2], [0], [1], [3]]
        # Keyboard: Shift+Down moves B below D; T ties D with A above it.
        page.card(1).focus()
        page.page.keyboard.press("Shift+ArrowDown")
        assert page.tiers() == [[2], [0], [3], [1]]
        assert page.page.evaluate("document.activeElement.dataset.pos") == "1"  # focus follows the card
        page.card(3).focus()
        page.page.keyboard.press("t")
        assert page.tiers() == [[2], [0, 3], [1]]
        # Drop B onto the middle of C: a tie by drag; then the untie button takes it out again.
        box = page.card(2).bounding_box()
        page.card(1).drag_to(
            page.card(2), source_position=handle, target_position={"x": 200, "y": box["height"] / 2}
        )
        assert page.tiers() == [[2, 1], [0, 3]]
        page.card(1).locator("button.tie").click()
        assert page.tiers() == [[2], [1], [0, 3]]
        assert page.page.locator("#tiers .tier.tied .tier-rank").inner_text() == "3"
        # Ratings by key and by button, a flag, a comment.
        page.card(0).focus()
        page.page.keyboard.press("6")
        page.card(2).locator(".rating button", has_text="2").click()
        page.card(2).locator("summary").click()
        page.card(2).locator('input[data-flag="unsafe"]').check()
        page.page.fill("#comment", "C is dangerous")
        page.page.click("#submit")
        page.wait_for_next(first)
        second = page.item_id
        # The second item by keyboard only: focus moves with the arrows, Ctrl+Enter submits.
        page.card(0).focus()
        page.page.keyboard.press("ArrowDown")
        page.page.keyboard.press("ArrowDown")
        assert page.page.evaluate("document.activeElement.dataset.pos") == "2"
        page.page.keyboard.press("Shift+ArrowUp")
        page.page.keyboard.press("Shift+ArrowUp")
        page.page.keyboard.press("j")
        page.page.keyboard.press("=")
        assert page.tiers() == [[2, 0], [1], [3]]
        page.page.keyboard.press("Control+Enter")
        page.wait_for_next(second)
        assert page.errors == []
        page.close()
    first_record, second_record = read_out(Path(cfg.out))
    assert first_record["item_id"] == first and first_record["status"] == "ranked"
    assert first_record["ranking"] == [shown[2], shown[1], shown[0], shown[3]]
    assert first_record["ties"] == [[shown[0], shown[3]]]
    assert [first_record["responses"][i] for i in first_record["ranking"]] == [texts[p] for p in (2, 1, 0, 3)]
    assert first_record["ratings"] == {str(shown[0]): 6, str(shown[2]): 2}
    assert first_record["flags"] == {str(shown[2]): ["unsafe"]}
    assert first_record["comment"] == "C is dangerous" and first_record["unchanged_order_confirmed"] is False
    shown2 = shown_order(cfg.seed, "alice", second, 4)
    assert second_record["ranking"] == [shown2[2], shown2[0], shown2[1], shown2[3]]
    assert second_record["ties"] == [[shown2[2], shown2[0]]]


def test_unchanged_order_warning_cannot_rank_and_skip(browser, tmp_path):
    cfg = make_cfg(tmp_path, four_way(3))
    with ThreadServer(cfg) as client:
        page = Page(browser, client.url, "bob")
        first = page.item_id
        dialog = page.page.locator("#unchanged")
        page.page.click("#submit")
        assert dialog.is_visible()
        page.page.click("#unchanged-back")
        assert not dialog.is_visible() and page.item_id == first
        assert read_out(Path(cfg.out)) == []
        page.page.keyboard.press("Control+Enter")
        assert dialog.is_visible()
        page.page.click("#unchanged-submit")
        page.wait_for_next(first)
        second = page.item_id
        page.page.fill("#comment", "all four are wrong")
        page.page.click("#cannot-rank")
        page.wait_for_next(second)
        page.page.click("#skip")
        page.page.wait_for_selector("#done:not([hidden])")
        assert "You submitted 3 item(s)" in page.page.inner_text("#done-text")
        assert page.errors == []
        page.close()
    records = read_out(Path(cfg.out))
    assert [r["status"] for r in records] == ["ranked", "cannot_rank", "skipped"]
    assert records[0]["unchanged_order_confirmed"] is True
    assert records[0]["ranking"] == records[0]["shown_order"]
    assert records[1]["comment"] == "all four are wrong" and records[1]["ranking"] == []


def test_model_text_is_rendered_as_text_never_as_html(browser, tmp_path):
    prompt = [{"role": "user", "content": "</script><script>window.__pwned=3</script><i>hi</i>"}]
    cfg = make_cfg(tmp_path, [{"prompt": prompt, "responses": [*XSS, "plain"]}])
    with ThreadServer(cfg) as client:
        page = Page(browser, client.url, "eve")
        page.page.wait_for_timeout(300)  # give an onerror handler time to fire, were one ever attached
        assert page.page.evaluate("window.__pwned") is None
        assert page.page.title() == "fastrlhf rank"
        assert page.page.locator("main img, main script, main b, main i").count() == 0
        item = load_task(cfg).items[0]
        shown = shown_order(cfg.seed, "eve", item.item_id, 4)
        assert page.texts() == {p: item.responses[shown[p]] for p in range(4)}
        assert page.page.inner_text("#prompt .text") == prompt[0]["content"]
        page.card(3).drag_to(
            page.card(0), source_position={"x": 14, "y": 14}, target_position={"x": 100, "y": 3}
        )
        page.page.click("#submit")
        page.page.wait_for_selector("#done:not([hidden])")
        assert page.page.evaluate("window.__pwned") is None
        assert page.errors == []
        page.close()
    (record,) = read_out(Path(cfg.out))
    assert record["responses"] == item.responses and record["prompt"] == prompt  # stored verbatim


def test_resume_after_the_server_is_killed(browser, tmp_path):
    cfg = make_cfg(tmp_path, four_way(3))
    data, out, token = Path(cfg.data), Path(cfg.out), "resume-test-token"
    server = ServerProcess(data, out, "--token", token)
    port = server.client.base.rsplit(":", 1)[1]
    try:
        page = Page(browser, server.url, "carol")
        first = page.item_id
        page.card(3).focus()
        page.page.keyboard.press("Shift+ArrowUp")
        page.page.click("#submit")
        page.wait_for_next(first)
        second = page.item_id
        page.card(1).focus()
        page.page.keyboard.press("t")  # work in progress on the second item
        server.kill()  # SIGKILL
        page.page.click("#submit")
        page.page.wait_for_selector("#status:not([hidden])")
        assert "cannot be reached" in page.page.inner_text("#status")
        assert page.item_id == second and page.tiers() == [[0, 1], [2], [3]]  # nothing on the page was lost
        assert [r["item_id"] for r in read_out(out)] == [first]
        # Restarted on the same port and token, the open page just submits again.
        server = ServerProcess(data, out, "--token", token, "--port", port)
        page.page.click("#submit")
        page.wait_for_next(second)
        third = page.item_id
        server.kill()
        server = ServerProcess(data, out, "--token", token, "--port", port)
        page.page.reload()  # a reload resumes where the labeler stopped
        page.page.wait_for_selector("#tiers .card")
        assert page.item_id == third
        assert page.errors == []
        page.close()
    finally:
        server.kill()
    records = read_out(out)
    assert [r["item_id"] for r in records] == [first, second]
    assert records[1]["ties"] == [[records[1]["shown_order"][0], records[1]["shown_order"][1]]]


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium is missing under CI"):
        _missing("chromium")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        _missing("chromium")
