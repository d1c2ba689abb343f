"""HTTP handlers: validate, hand the work to a session, reply; errors become statuses here."""

from __future__ import annotations

import hmac
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__, streaming
from .errors import (
    BadRequest,
    ChildStartError,
    NoInputPending,
    NotFound,
    ProtocolError,
    QueryTimeout,
    ReplError,
    SessionBusy,
    ShuttingDown,
    TooManySessions,
    Unauthorized,
)
from .isolation import Isolation
from .manager import SessionManager
from .metrics import ACCESS_FIELDS, CONTENT_TYPE, Metrics
from .session import Run
from .settings import Settings

log = logging.getLogger(__name__)

MANAGER = web.AppKey("manager", SessionManager)
METRICS = web.AppKey("metrics", Metrics)
ISOLATION = web.AppKey("isolation", Isolation)
SETTINGS = web.AppKey("settings", Settings)

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_STATUS: dict[type[ReplError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    NoInputPending: 409,
    SessionBusy: 409,
    TooManySessions: 429,
    ChildStartError: 503,
    ShuttingDown: 503,
    ProtocolError: 502,
    QueryTimeout: 504,
}


def error_response(status: int, detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error leaves as JSON `{"detail": ...}`, the shape the frontend reads."""
    try:
        check_token(request)
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        resp = error_response(exc.status, detail or exc.reason)
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):
            if name in exc.headers:
                resp.headers[name] = exc.headers[name]
        return resp
    except ReplError as exc:
        resp = error_response(_STATUS.get(type(exc), 500), str(exc))
        if isinstance(exc, TooManySessions):
            resp.headers["Retry-After"] = str(exc.retry_after_s)
        elif isinstance(exc, Unauthorized):
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal server error")


# Open without a token: the health check (load balancers, orchestrators) and the page,
# which holds no secret and is where a token is typed in.
OPEN_PATHS = frozenset({"/health", "/"})


def check_token(request: web.Request) -> None:
    """Bearer-token authentication, when REPL_API_TOKEN is set."""
    token = request.app[SETTINGS].api_token
    path = request.path
    if not token or request.method == "OPTIONS" or path in OPEN_PATHS:
        return  # CORS preflights carry no credentials by design
    if path.startswith("/static/"):
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Constant-time comparison: response timing must not reveal how much of a guess matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("missing or invalid API token (send 'Authorization: Bearer <token>')")


def session_id(request: web.Request) -> str:
    value = request.match_info["session_id"]
    if not _SESSION_ID.fullmatch(value):
        raise BadRequest("invalid session id: use 1-128 characters from A-Z a-z 0-9 _ -")
    return value


@dataclass(frozen=True, slots=True)
class ExecuteRequest:
    """The body of /execute and /execute-stream, checked."""

    code: str
    timeout_s: float | None
    stop_on_disconnect: bool


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request body: a JSON object, or BadRequest."""
    body = await request.read()  # aiohttp answers 413 past client_max_size
    try:
        data = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


async def read_request(request: web.Request) -> ExecuteRequest:
    """The `code`, `timeout` and `stopOnDisconnect` fields of a JSON object body, checked."""
    data = await read_object(request)
    code = data.get("code")
    if code is None:
        raise BadRequest("field 'code' is required")
    if not isinstance(code, str):
        raise BadRequest("field 'code' must be a string")
    if not code.strip():
        raise BadRequest("field 'code' is empty")
    timeout = data.get("timeout")
    if timeout is not None:
        limit = request.app[SETTINGS].max_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise BadRequest("field 'timeout' must be a number of seconds")
        if not 0 < timeout <= limit:
            raise BadRequest(f"field 'timeout' must be above 0 and at most {limit:g} seconds")
        timeout = float(timeout)
    stop = data.get("stopOnDisconnect", False)
    if not isinstance(stop, bool):
        raise BadRequest("field 'stopOnDisconnect' must be true or false")
    return ExecuteRequest(code, timeout, stop)


def note_access(request: web.Request, run: Run) -> None:
    """What the access log line of this request tells about its execution."""
    request[ACCESS_FIELDS] = {"sessionId": run.session_id, "executionId": run.execution.id}


def note_outcome(request: web.Request, run: Run) -> None:
    fields = request.get(ACCESS_FIELDS)
    if fields is not None and run.execution.outcome is not None:
        fields["reason"] = run.execution.reason


async def execute(request: web.Request) -> web.Response:
    sid = session_id(request)
    body = await read_request(request)
    session = await request.app[MANAGER].get(sid)
    run = await session.start(body.code, timeout_s=body.timeout_s)
    note_access(request, run)
    limit = request.app[SETTINGS].max_output_bytes
    reply = await streaming.collect(run, output_limit=limit)
    note_outcome(request, run)
    return web.json_response(reply, headers={"X-Execution-Id": run.execution.id})


async def execute_stream(request: web.Request) -> web.StreamResponse:
    sid = session_id(request)
    body = await read_request(request)
    session = await request.app[MANAGER].get(sid)
    run = await session.start(body.code, timeout_s=body.timeout_s, interactive=True)
    note_access(request, run)
    limit = request.app[SETTINGS].max_output_bytes
    stop = session.interrupt if body.stop_on_disconnect else None
    resp = await streaming.stream(request, run, output_limit=limit, on_disconnect=stop)
    note_outcome(request, run)
    return resp


async def execution_events(request: web.Request) -> web.StreamResponse:
    """Reattach to an execution's events after a dropped connection (Last-Event-ID)."""
    execution_id = request.match_info["execution_id"]
    run = request.app[MANAGER].find_run(execution_id)
    if run is None:
        raise NotFound(f"no recent execution {execution_id!r} on this server")
    raw = request.headers.get("Last-Event-ID", request.query.get("lastEventId", "0"))
    try:
        after = int(raw or "0")
    except ValueError:
        raise BadRequest("Last-Event-ID must be an event id from this stream") from None
    if after < 0:
        raise BadRequest("Last-Event-ID must not be negative")
    note_access(request, run)
    limit = request.app[SETTINGS].max_output_bytes
    resp = await streaming.stream(request, run, output_limit=limit, after=after)
    note_outcome(request, run)
    return resp


async def describe_session(request: web.Request) -> web.Response:
    sid = session_id(request)
    session = request.app[MANAGER].find(sid)
    if session is None:
        raise NotFound(f"no session {sid!r} on this server")
    return web.json_response(session.describe())


async def delete_session(request: web.Request) -> web.Response:
    sid = session_id(request)
    if not request.app[MANAGER].delete(sid):
        raise NotFound(f"no session {sid!r} on this server")
    return web.json_response({"sessionId": sid, "deleted": True})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def answer_input(request: web.Request) -> web.Response:
    """The answer to the input() a stream of this session is waiting in."""
    sid = session_id(request)
    data = await read_object(request)
    value = data.get("value")
    if not isinstance(value, str):
        raise BadRequest("field 'value' is required and must be a string")
    session = request.app[MANAGER].find(sid)
    if session is None:
        raise NoInputPending("no such session, so no input is awaited")
    session.answer_input(value)
    return web.json_response({"sessionId": sid, "answered": True})


async def interrupt(request: web.Request) -> web.Response:
    sid = session_id(request)
    session = request.app[MANAGER].find(sid)
    running = session.interrupt() if session is not None else False
    return web.json_response({"sessionId": sid, "interrupted": running})


async def reset(request: web.Request) -> web.Response:
    sid = session_id(request)
    await request.app[MANAGER].reset(sid)
    return web.json_response({"message": "Namespace reset successfully", "sessionId": sid})


async def health(request: web.Request) -> web.Response:
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return web.json_response(
        {
            "status": "ok",
            "language": "python",
            "version": __version__,
            "stateless": False,
            "timestamp": now,
            "sessions": len(request.app[MANAGER]),
            "replica": request.app[SETTINGS].replica_id,
            "isolation": request.app[ISOLATION].layers.as_json(),
            "preload": request.app[MANAGER].pool.preload.as_json(),
        }
    )


# --- the built-in web REPL page -------------------------------------------------------------

STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Everything the page shows comes from its own origin; HTML displays render in a sandboxed
# frame without scripts; images come as data: URLs.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline';"
        " object-src 'none'; base-uri 'none'; form-action 'none'"
    ),
}


def static_file(name: str) -> web.FileResponse:
    headers = {**PAGE_HEADERS, "Content-Type": STATIC_FILES[name]}
    return web.FileResponse(STATIC_DIR / name, headers=headers)


async def page(request: web.Request) -> web.FileResponse:
    return static_file("index.html")


async def static(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES or name == "index.html":
        raise web.HTTPNotFound(text=f"no static file {name!r}")
    return static_file(name)


def add_routes(app: web.Application) -> list[web.AbstractRoute]:
    return [
        app.router.add_post("/execute/{session_id}", execute),
        app.router.add_post("/execute-stream/{session_id}", execute_stream),
        app.router.add_post("/input/{session_id}", answer_input),
        app.router.add_post("/reset/{session_id}", reset),
        app.router.add_post("/interrupt/{session_id}", interrupt),
        app.router.add_get("/health", health),
        app.router.add_get("/sessions/{session_id}", describe_session),
        app.router.add_delete("/sessions/{session_id}", delete_session),
        app.router.add_get("/executions/{execution_id}/events", execution_events),
        app.router.add_get("/metrics", metrics),
        app.router.add_get("/", page),
        app.router.add_get("/static/{name}", static),
    ]
