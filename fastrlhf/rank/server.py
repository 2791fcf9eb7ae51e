"""The ranking page's HTTP side: a Starlette app behind a guard, served by uvicorn on 127.0.0.1.

The guard refuses every request that does not belong to the task served: a ``Host`` that is not one of ours
(DNS rebinding), an ``Origin`` other than the page's own (another site's scripts), and, for the API, a
missing or wrong token (``X-Rank-Token``) or a page of another data file (``X-Rank-Task``). Custom headers
also force a CORS preflight, which nothing here answers, so no cross-site request reaches a handler.

API (all JSON; screen positions, never response indices, go back and forth)::

    GET  /api/task                    -> {"task_id", "items", "flags": [[id, label]], "overlap"}
    GET  /api/next?labeler=NAME       -> {"item": {"item_id", "prompt", "responses": [shown order]} | null,
                                          "progress": {"done", "remaining"}}
    POST /api/submit                  <- {"labeler", "item_id", "status", "tiers", "ratings", "flags",
                                          "comment", "unchanged_order_confirmed"}
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastrlhf.rank.store import RankingStore, SubmissionError, build_record, check_labeler
from fastrlhf.rank.task import Item, RankConfig, Task, load_task, shown_order

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
RESERVATION_SECONDS = 30 * 60
"""How long an item handed to one labeler is kept from the others (overlap items are never reserved)."""
MAX_BODY = 256 * 1024
SECURITY_HEADERS = {
    # Scripts and styles only from our own files: an injected <script> or inline handler cannot run.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",  # the token is in the page's URL
    "cache-control": "no-store",
}


class Reservations:
    """Items handed to one labeler, so that two labelers do not rank the same non-overlap item."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, float]] = {}

    def holder(self, item_id: str) -> str | None:
        entry = self._held.get(item_id)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def held_by(self, labeler: str) -> list[str]:
        return [i for i, (name, _) in self._held.items() if name == labeler and self.holder(i) == labeler]

    def take(self, item_id: str, labeler: str) -> None:
        self._held[item_id] = (labeler, time.monotonic() + RESERVATION_SECONDS)

    def release(self, item_id: str) -> None:
        self._held.pop(item_id, None)


class RankingService:
    """Task, store and reservations: the logic behind the API, free of HTTP."""

    def __init__(self, cfg: RankConfig, task: Task, store: RankingStore) -> None:
        self.cfg, self.task, self.store = cfg, task, store
        self.flag_ids = {f for f, _ in cfg.flag_list()}
        self.reservations = Reservations()
        self._lock = threading.Lock()

    def next_item(self, labeler: str) -> Item | None:
        """The labeler's held item, else the first one in file order that is still open to them."""
        with self._lock:
            for item_id in self.reservations.held_by(labeler):
                item = self.task.by_id[item_id]
                if self.store.available_to(labeler, item):
                    return item
            for item in self.task.items:
                if not self.store.available_to(labeler, item):
                    continue
                if item.overlap:
                    return item
                if self.reservations.holder(item.item_id) in (None, labeler):
                    self.reservations.take(item.item_id, labeler)
                    return item
            return None

    def view(self, item: Item, labeler: str) -> dict[str, Any]:
        order = shown_order(self.cfg.seed, labeler, item.item_id, len(item.responses))
        return {
            "item_id": item.item_id,
            "prompt": item.prompt,
            "responses": [item.responses[i] for i in order],
        }

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        labeler = check_labeler(body.get("labeler"))
        item_id = body.get("item_id")
        item = self.task.by_id.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise SubmissionError("item_id", "not an item of this task")
        order = shown_order(self.cfg.seed, labeler, item.item_id, len(item.responses))
        record = build_record(item, labeler, order, body, self.flag_ids)
        self.store.append(record)
        with self._lock:
            if self.reservations.holder(item.item_id) == labeler:
                self.reservations.release(item.item_id)
        return record


def build_app(cfg: RankConfig, service: RankingService, token: str):
    """The Starlette app wrapped in the request guard."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    pages = {
        "/": ("index.html", "text/html; charset=utf-8"),
        "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
        "/static/style.css": ("style.css", "text/css; charset=utf-8"),
    }
    files = {route: ((STATIC / name).read_bytes(), kind) for route, (name, kind) in pages.items()}

    async def page(request: Request) -> Response:
        body, kind = files[request.url.path]
        return Response(body, media_type=kind)

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    async def task_info(request: Request) -> Response:
        return JSONResponse(
            {
                "task_id": service.task.task_id,
                "items": len(service.task.items),
                "overlap": cfg.overlap,
                "flags": cfg.flag_list(),
            }
        )

    async def next_item(request: Request) -> Response:
        try:
            labeler = check_labeler(request.query_params.get("labeler"))
        except SubmissionError as e:
            return error(400, str(e), field=e.field)
        item = service.next_item(labeler)
        view = service.view(item, labeler) if item is not None else None
        return JSONResponse({"item": view, "progress": asdict(service.store.progress(labeler))})

    async def submit(request: Request) -> Response:
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            return error(413, f"submission larger than {MAX_BODY} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return error(413, f"submission larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "expected a JSON object")
        if not isinstance(body, dict):
            return error(400, "expected a JSON object")
        try:
            record = service.submit(body)
        except SubmissionError as e:
            code = "already_submitted" if "already submitted" in e.problem else "invalid"
            return error(409 if code == "already_submitted" else 400, str(e), field=e.field, code=code)
        progress = service.store.progress(record["labeler"])
        return JSONResponse({"ok": True, "progress": asdict(progress)})

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [Route(path, page, methods=["GET"]) for path in pages]
    routes.append(Route("/favicon.ico", no_icon, methods=["GET"]))
    routes += [
        Route("/api/task", task_info, methods=["GET"]),
        Route("/api/next", next_item, methods=["GET"]),
        Route("/api/submit", submit, methods=["POST"]),
    ]
    return RequestGuard(Starlette(routes=routes), cfg.allowed_hosts(), token, service.task.task_id)


class RequestGuard:
    """ASGI middleware: refuse what is not a same-origin request for this task, add security headers."""

    def __init__(self, app: Any, allowed_hosts: set[str], token: str, task_id: str) -> None:
        self.app, self.allowed_hosts, self.token, self.task_id = app, allowed_hosts, token, task_id

    def refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        hostname = (urlsplit(f"//{host}").hostname or "").lower()
        if hostname not in self.allowed_hosts:
            return 403, f"host {host!r} is not served here"
        origin = headers.get("origin")
        if origin is not None and origin != f"http://{host}":
            return 403, "cross-origin request refused"
        if scope["path"].startswith("/api/"):
            # A link from another site may open the page (it holds no data), but only the page calls the API.
            if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return 403, "cross-site request refused"
            if not hmac.compare_digest(headers.get("x-rank-token", "").encode(), self.token.encode()):
                return 403, "missing or wrong task token: open the URL the server printed"
            if headers.get("x-rank-task") != self.task_id:
                return 409, "this page belongs to another ranking task: open the URL the server printed"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.refusal(scope)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if refused is None:
            await self.app(scope, receive, send_with_headers)
            return
        status, message = refused
        body = json.dumps({"error": message, "code": "refused"}).encode()
        await send_with_headers(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def page_url(host: str, port: int, task_id: str, token: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/?task={task_id}&token={token}"


def serve(cfg: RankConfig) -> None:
    """Validate the data and the output file, bind, print the page's URL, and serve until interrupted."""
    cfg.check()
    task = load_task(cfg)  # bad input fails here, before anything listens or is written
    try:
        import uvicorn
    except ImportError as e:
        raise OSError("the ranking page needs starlette and uvicorn: pip install 'fastrlhf[rank]'") from e
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind at once after a kill
    try:
        sock.bind((cfg.host, cfg.port))
        store = RankingStore(cfg.out, task)
    except OSError as e:
        sock.close()
        if e.filename is not None:
            raise
        raise OSError(f"port: cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); try --port 0") from e
    except BaseException:
        sock.close()
        raise
    token = cfg.token or secrets.token_urlsafe(18)
    app = build_app(cfg, RankingService(cfg, task, store), token)
    port = sock.getsockname()[1]
    url = page_url(cfg.host, port, task.task_id, token)
    print(
        f"fastrlhf rank: {len(task.items)} items ({cfg.overlap} shared by all labelers), "
        f"{len(store.records)} submissions already in {cfg.out}",
        flush=True,
    )
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: bound to {cfg.host}: anyone who can reach it and has the URL can label", flush=True)
    print(f"open {url}", flush=True)
    if cfg.open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
