"""Request middleware: every error as JSON `{"detail"}` with its status, and the API token."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

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

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Looked up along the exception's MRO, so a subclass gets its base's status.
STATUS: dict[type[ReplError], int] = {
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
# Headers of an aiohttp HTTPException that say how to retry; kept on the JSON reply.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")

# Open without a token: the health check (load balancers, orchestrators) and the page,
# which holds no secret and is where a token is typed in.
OPEN_PATHS = frozenset({"/health", "/"})


def status_of(exc: ReplError) -> int:
    """The HTTP status of one of our errors: its own (a file error knows which of 400,
    403, 404, 409, 413 or 507 it is), else its nearest class in STATUS, else 500."""
    own = getattr(exc, "status", None)
    if isinstance(own, int):
        return own
    for cls in type(exc).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_response(status: int, detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON `{"detail": ...}`, the shape the frontend reads."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        resp = error_response(exc.status, detail or exc.reason)
        for name in _KEPT_HEADERS:
            if name in exc.headers:
                resp.headers[name] = exc.headers[name]
        return resp
    except ReplError as exc:
        resp = error_response(status_of(exc), str(exc))
        if isinstance(exc, TooManySessions):
            resp.headers["Retry-After"] = str(exc.retry_after_s)
        elif isinstance(exc, Unauthorized):
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal server error")


def require_token(token: str | None) -> Middleware:
    """Bearer-token authentication when `token` (REPL_API_TOKEN) is set; inside json_errors,
    so a refusal is a JSON 401."""
    expected = token.encode() if token else b""

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        # CORS preflights carry no credentials by design; static files hold no secret.
        open_path = path in OPEN_PATHS or path.startswith("/static/")
        checked = expected and request.method != "OPTIONS" and not open_path
        if checked and not _authorized(request, expected):
            raise Unauthorized(
                "missing or invalid API token (send 'Authorization: Bearer <token>')"
            )
        return await handler(request)

    return check_token


def _authorized(request: web.Request, expected: bytes) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # surrogateescape: a header of undecodable bytes is a wrong token, not an error.
    # Constant-time: response timing must not reveal how much of a guess matched.
    given_bytes = given.encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given_bytes, expected)
