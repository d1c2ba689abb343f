"""HTTP handlers: validate, hand the work to a session, reply; errors become statuses here."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__, streaming
from .errors import BadRequest, NoInputPending, NotFound
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
    protocol: int  # the stream protocol asked for (1, the default, or 2)


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request body: a JSON object of valid Unicode text, or BadRequest (never a 500)."""
    body = await request.read()  # aiohttp answers 413 past client_max_size
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:  # the decoder recurses once per level: [[[[...]]]]
        raise BadRequest("request body is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    except ValueError:  # int() past sys.get_int_max_str_digits()
        raise BadRequest("request body has a number with too many digits") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    if body.isascii() and b"\\u" not in body and b"\x00" not in body:
        # Only a \u escape can make a lone surrogate in an ASCII body read as UTF-8 (no
        # NUL byte: json.loads takes UTF-16 and UTF-32 too, and decodes with surrogatepass).
        # Without one there is nothing to find: the body is not encoded again.
        return data
    try:
        # A \ud800-style escape decodes to a lone surrogate, which is no Unicode text: any
        # later .encode() of it (to the child, into a reply) would fail. One check here.
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise BadRequest(
            "request body has a lone surrogate (an unpaired \\ud800-\\udfff escape) in a string"
        ) from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    return data


def _no_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity, which Python's json accepts and JSON does not."""
    raise BadRequest(f"request body is not valid JSON: {name} is not a JSON value")


async def read_request(request: web.Request) -> ExecuteRequest:
    """The `code`, `timeout`, `stopOnDisconnect` and `protocol` fields of a JSON object
    body, checked."""
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
    protocol = data.get("protocol", streaming.PROTOCOL_OLD)
    # Only the integers themselves: not true (an int to Python), 2.0 or "2".
    if type(protocol) is not int or protocol not in streaming.PROTOCOLS:
        raise BadRequest("field 'protocol' must be 1 (the default) or 2")
    return ExecuteRequest(code, timeout, stop, protocol)


def note_access(request: web.Request, run: Run) -> None:
    """What the access log line of this request tells about its execution."""
    request[ACCESS_FIELDS] = {"sessionId": run.session_id, "executionId": run.execution.id}


def note_outcome(request: web.Request, run: Run) -> None:
    fields = request.get(ACCESS_FIELDS)
    if fields is not None and run.execution.outcome is not None:
        fields["reason"] = run.execution.reason


async def execute(request: web.Request) -> web.StreamResponse:
    sid = session_id(request)
    body = await read_request(request)
    session = await request.app[MANAGER].get(sid)
    run = await session.start(body.code, timeout_s=body.timeout_s)
    note_access(request, run)
    limit = request.app[SETTINGS].max_output_bytes
    resp = await streaming.collect(request, run, output_limit=limit)
    note_outcome(request, run)
    return resp


async def execute_stream(request: web.Request) -> web.StreamResponse:
    sid = session_id(request)
    body = await read_request(request)
    session = await request.app[MANAGER].get(sid)
    # input() can only be answered by a client that sees input_request events: under
    # protocol 1 it raises EOFError at once, as in /execute.
    rich = body.protocol == streaming.PROTOCOL_RICH
    run = await session.start(body.code, timeout_s=body.timeout_s, interactive=rich)
    note_access(request, run)
    limit = request.app[SETTINGS].max_output_bytes
    stop = session.interrupt if body.stop_on_disconnect else None
    resp = await streaming.stream(
        request, run, output_limit=limit, protocol=body.protocol, on_disconnect=stop
    )
    note_outcome(request, run)
    return resp


async def execution_events(request: web.Request) -> web.StreamResponse:
    """Reattach to an execution's events after a dropped connection (Last-Event-ID),
    always in protocol 2: its clients need the ids."""
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
    resp = await streaming.stream(
        request, run, output_limit=limit, protocol=streaming.PROTOCOL_RICH, after=after
    )
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
    "editor.js": "text/javascript; charset=utf-8",
    "editor.LICENSES.txt": "text/plain; charset=utf-8",
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
