"""Exceptions that carry what went wrong; middleware.py alone maps them to HTTP statuses."""

from __future__ import annotations


class ReplError(Exception):
    """Base class of replserver's own errors; `str()` is the client-facing detail."""


class BadRequest(ReplError):
    """The request itself is malformed (400)."""


class ChildStartError(ReplError):
    """A session's Python process could not be started or did not come up (503)."""


class ShuttingDown(ReplError):
    """The server is stopping and takes no new work (503)."""


class Unauthorized(ReplError):
    """A token is configured and the request did not carry it (401)."""


class TooManySessions(ReplError):
    """Every live session is busy and the cap is reached (429)."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotFound(ReplError):
    """No such session or execution here (404)."""


class ProtocolError(ReplError):
    """The child sent something that is not a valid frame; the child is ended."""


class NoInputPending(ReplError):
    """An answer to input() arrived, but nothing in the session is waiting for one (409)."""


class SessionBusy(ReplError):
    """The session runs code, and the request answers at once or not at all (409)."""


class QueryTimeout(ReplError):
    """A completion or inspection did not come back in time; it was interrupted (504)."""
