"""Completion and inspection: the query sent to a session's child, its checked answer.

The work happens in the child (replchild/complete.py), under the session's uid and limits,
against its live namespace; the server only frames the query, bounds how long it may
take and checks what comes back, which is as untrusted as any byte of the child's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from . import protocol
from .errors import BadRequest, ProtocolError, QueryTimeout

log = logging.getLogger(__name__)

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
        # Not ASCII-escaped: the frame stays about as large as the request body (which is
        # below the frame limit), where \uXXXX escapes could triple it.
        text = json.dumps(body, ensure_ascii=False)
        return protocol.encode(protocol.T_QUERY, text.encode("utf-8", "surrogatepass"))

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


# Where replchild/complete.py looks for the shared cache: beside its package, in the runner's
# directory (which bubblewrap binds read-only into every sandbox).
JEDI_CACHE_DIR = "jedi-cache"
BUILD_TIMEOUT_S = 120.0
_WARM_JEDI = (
    "import sys, jedi\n"
    "jedi.settings.cache_directory = sys.argv[1]\n"
    "jedi.Interpreter('pri', [{}]).complete(1, 3)\n"
)


class JediCache:
    """jedi's parse of the builtins' stubs, pickled once by the server for every child.

    Parsing those stubs is most of a session's first completion (seconds, see the README);
    a child that finds them pickled loads them instead. Only a server whose children run
    as other uids builds it (a root server): they can read it but not write it, so no
    session can plant a pickle that another one would load. Built in the background
    after the server's first query, never at start-up, so servers that never complete
    pay nothing.
    """

    def __init__(self, python: str, runner_dir: Path, *, enabled: bool) -> None:
        self._python = python
        self.path = runner_dir / JEDI_CACHE_DIR
        self.state = "not built" if enabled else "off"  # then "building", "ready", "failed"
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<JediCache {self.state} {self.path}>"

    def ensure(self) -> None:
        """Start building the cache, once."""
        if self.state == "not built":
            self.state = "building"
            self._task = asyncio.create_task(self._build())

    async def _build(self) -> None:
        staging = self.path.with_name(f".{JEDI_CACHE_DIR}-staging")
        proc = await asyncio.create_subprocess_exec(
            self._python,
            "-I",
            "-c",
            _WARM_JEDI,
            str(staging),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.path.parent,
        )
        try:
            async with asyncio.timeout(BUILD_TIMEOUT_S):
                _, err = await proc.communicate()  # a short-lived helper, not a child
        except BaseException as exc:
            proc.kill()
            await asyncio.shield(proc.wait())
            self.state = "failed"
            if not isinstance(exc, TimeoutError):
                raise
            log.warning("no shared jedi cache: building it took over %g s", BUILD_TIMEOUT_S)
            return
        if proc.returncode != 0:  # no jedi for the children's interpreter, say
            self.state = "failed"
            log.info("no shared jedi cache: %s", err.decode(errors="replace")[-300:].strip())
            return
        await asyncio.to_thread(_publish, staging, self.path)
        self.state = "ready"

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our own cancellation, not the builder's


def _publish(staging: Path, final: Path) -> None:
    """Readable by every uid, writable by none of the children; then in place at once."""
    for root, dirs, files in os.walk(staging):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    os.rename(staging, final)
