"""Helpers shared by the ``fastrlhf rank`` tests: data files, servers (in a thread or a subprocess), HTTP."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

XSS = [
    "<img src=x onerror=\"document.title='pwned';window.__pwned=1\">",
    "</script><script>window.__pwned=2</script>",
    "<b onmouseover=alert(1)>bold?</b> &amp; &lt;not an entity&gt;",
]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sample_records(n: int, k: int) -> list[dict[str, Any]]:
    """``fastrlhf sample``-shaped records with distinct, recognisable responses."""
    return [
        {"prompt": f"prompt {i}", "responses": [f"item {i} response {j}" for j in range(k)]} for i in range(n)
    ]


def read_out(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Client:
    """HTTP to one server with the page's headers; ``call`` returns (status, JSON body, headers)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.url = url
        self.task, self.token = query["task"][0], query["token"][0]

    def call(
        self, path: str, body: Any = None, *, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        sent = {"X-Rank-Task": self.task, "X-Rank-Token": self.token}
        sent.update(headers or {})
        sent = {k: v for k, v in sent.items() if v is not None}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.base + path, data=data, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                text, status, got = response.read(), response.status, dict(response.headers)
        except urllib.error.HTTPError as e:
            text, status, got = e.read(), e.code, dict(e.headers)
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return status, parsed, {k.lower(): v for k, v in got.items()}

    def next(self, labeler: str) -> dict[str, Any]:
        status, body, _ = self.call(f"/api/next?labeler={urllib.request.quote(labeler)}")
        assert status == 200, body
        return body

    def submit(self, labeler: str, item_id: str, **fields: Any) -> tuple[int, Any]:
        body = {"labeler": labeler, "item_id": item_id, "status": "ranked", **fields}
        status, answer, _ = self.call("/api/submit", body)
        return status, answer


class ThreadServer:
    """The app served by uvicorn in a thread on a free 127.0.0.1 port (fast, for the API tests)."""

    def __init__(self, cfg) -> None:
        import uvicorn

        from fastrlhf.rank.server import RankingService, build_app, page_url
        from fastrlhf.rank.store import RankingStore
        from fastrlhf.rank.task import load_task

        cfg.check()
        self.task = load_task(cfg)
        self.store = RankingStore(cfg.out, self.task)
        token = cfg.token or "test-token-0123456789"
        self.service = RankingService(cfg, self.task, self.store)
        app = build_app(cfg, self.service, token)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.url = page_url("127.0.0.1", port, self.task.task_id, token)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Client:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            threading.Event().wait(0.05)
        assert self.server.started, "server did not start"
        return Client(self.url)

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.store.close()


class ServerProcess:
    """``python -m fastrlhf.rank`` in a subprocess, for killing it the hard way."""

    def __init__(self, data: Path, out: Path, *extra: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "fastrlhf.rank", "--data", str(data), "--out", str(out), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        self.url = ""
        while True:
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                self.kill()
                raise AssertionError("server printed no URL within 60 s:\n" + "".join(self.output)) from None
            found = re.search(r"open (http://\S+)", line)
            if found:
                self.url = found.group(1)
                break
        self.client = Client(self.url)
        parts = urlsplit(self.url)
        for _ in range(100):  # the URL is printed just before uvicorn starts accepting
            try:
                socket.create_connection((parts.hostname, parts.port), timeout=1).close()
                break
            except OSError:
                threading.Event().wait(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=15)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()
