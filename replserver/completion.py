"""Completion and inspection: the query sent to a session's child, its checked answer.

The work happens in the child (runner_complete.py), under the session's uid and limits,
against its live namespace; the server only frames the query, bounds how long it may
take and checks what comes back, which is as untrusted as any byte of the child's.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from . import protocol
from .errors import BadRequest, ProtocolError, QueryTimeout

# A completion imports jedi (~0.3 s) and parses the builtins' stubs (~1 s) the first time,
# on a machine that may be busy: generous, but bounded, since the session waits for it.
QUERY_TIMEOUT_S = 10.0
MAX_MATCHES = 1000
MAX_MATCH_CHARS = 1000

Op = Literal["complete", "inspect"]


class QueryTarget(Protocol):
    """What a query needs of a ChildProcess (kept narrow: this module sits beside child.py)."""

    def query(self, frame: bytes) -> asyncio.Future[bytes]: ...
    def interrupt(self) -> bool: ...
    def kill(self, message: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Query:
    """A checked /complete or /inspect request: `cursor` is a character offset into `code`."""

    op: Op
    code: str
    cursor: int

    @classmethod
    def from_body(cls, op: Op, data: dict[str, Any]) -> Query:
        """The `code` and `cursor` fields of a request body, or BadRequest."""
        code = data.get("code")
        if not isinstance(code, str):
            raise BadRequest("field 'code' is required and must be a string")
        cursor = data.get("cursor", len(code))
        if isinstance(cursor, bool) or not isinstance(cursor, int):
            raise BadRequest("field 'cursor' must be an integer (a character offset in 'code')")
        if not 0 <= cursor <= len(code):
            raise BadRequest(f"field 'cursor' must be between 0 and {len(code)} (len(code))")
        return cls(op, code, cursor)

    def frame(self) -> bytes:
        body = {"op": self.op, "code": self.code, "cursor": self.cursor}
        return protocol.encode(protocol.T_QUERY, json.dumps(body).encode("utf-8", "surrogatepass"))

    def reply(self, payload: bytes) -> dict[str, Any]:
        """The HTTP reply made of the child's answer; ProtocolError if it is malformed."""
        try:
            answer = json.loads(payload)
        except ValueError:
            raise ProtocolError("the session's Python process sent a malformed answer") from None
        if not isinstance(answer, dict):
            raise ProtocolError("the session's Python process sent a malformed answer")
        if "error" in answer:
            # The child could not answer (its own code raised); an empty answer says so.
            answer = {"matches": [], "cursorStart": self.cursor, "cursorEnd": self.cursor}
            answer = answer if self.op == "complete" else {"found": False, "data": {}}
        return self._completion(answer) if self.op == "complete" else self._inspection(answer)

    def _completion(self, answer: dict[str, Any]) -> dict[str, Any]:
        matches, start, end = (
            answer.get("matches"),
            answer.get("cursorStart"),
            answer.get("cursorEnd"),
        )
        valid = (
            isinstance(matches, list)
            and len(matches) <= MAX_MATCHES
            and all(isinstance(m, str) and len(m) <= MAX_MATCH_CHARS for m in matches)
            and type(start) is int
            and type(end) is int
            and 0 <= start <= end <= len(self.code)
        )
        if not valid:
            raise ProtocolError("the session's Python process sent a malformed completion")
        return {"matches": matches, "cursorStart": start, "cursorEnd": end}

    def _inspection(self, answer: dict[str, Any]) -> dict[str, Any]:
        found, data = answer.get("found"), answer.get("data")
        text = data.get("text/plain") if isinstance(data, dict) else None
        if not isinstance(found, bool) or (found and not isinstance(text, str)):
            raise ProtocolError("the session's Python process sent a malformed inspection")
        return {"found": found, "data": {"text/plain": text} if found else {}}


async def ask(
    child: QueryTarget, query: Query, *, timeout_s: float, grace_s: float
) -> dict[str, Any]:
    """Send `query` to the child and check its answer. One that hangs in user code (a
    __dir__ that loops) is interrupted at `timeout_s`, and its process killed `grace_s`
    later if even that does not bring the answer: a session is never held up for longer."""
    answer = child.query(query.frame())
    try:
        async with asyncio.timeout(timeout_s):
            payload = await asyncio.shield(answer)
    except TimeoutError:
        child.interrupt()
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.shield(answer)
        except TimeoutError:
            child.kill(
                f"A {query.op} request did not finish within {timeout_s + grace_s:g} s, so"
                " the session's Python process was killed (earlier state was lost)."
            )
        raise QueryTimeout(
            f"the {query.op} request took longer than {timeout_s:g} s and was interrupted"
        ) from None
    return query.reply(payload)
