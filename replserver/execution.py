"""One execution: the events the child sends for it, in a bounded log that clients read.

The log gives every event a sequence number, which is the SSE `id` the client sees. One
reader at a time follows it (the request that started the execution, or a client that
reattached with Last-Event-ID). While a reader is attached and falls more than
`high_water` bytes behind, the child's pipe is paused, so a slow client slows the child
instead of growing our memory. With no reader attached the execution runs on and the log
keeps only the newest `replay_bytes` of events for a client that comes back.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from .errors import NoInputPending
from .protocol import (
    T_DISPLAY,
    T_INPUT_REQUEST,
    T_RESULT,
    T_STDERR,
    T_STDOUT,
    Done,
    InputRequest,
)

__all__ = [
    "T_DISPLAY",
    "T_END",
    "T_GAP",
    "T_INPUT_REQUEST",
    "T_RESULT",
    "T_STDERR",
    "T_STDOUT",
    "Entry",
    "Execution",
    "Failure",
]

T_END = 0x100  # log entry: the execution is over (render notices and `complete`)
T_GAP = 0x101  # reader-side marker: entries before this one were dropped from the log

# (sequence number, kind, payload): raw output bytes of T_STDOUT or T_STDERR, the UTF-8
# repr of a T_RESULT, the JSON of a T_DISPLAY, the raw payload of a T_INPUT_REQUEST, or
# the empty payload of T_END.
Entry = tuple[int, int, bytes]


@dataclass(frozen=True, slots=True)
class Failure:
    """The execution ended without a completion record: the child died or broke protocol."""

    message: str


class Execution:
    """Receives one execution's frames from the child and keeps them for its reader."""

    __slots__ = (
        "_cursor",
        "_entry_bytes",
        "_high_water",
        "_log",
        "_log_bytes",
        "_max_output",
        "_next_seq",
        "_on_end",
        "_pause",
        "_paused",
        "_reader",
        "_readers",
        "_remaining",
        "_replay_bytes",
        "_reply",
        "_resume",
        "_unread",
        "_waiter",
        "finished",
        "id",
        "input_request",
        "notes",
        "outcome",
        "started",
        "stop_on_disconnect",
        "stopped_by",
        "truncated",
    )

    def __init__(
        self,
        execution_id: str,
        *,
        high_water: int,
        max_output: int,
        replay_bytes: int,
        pause: Callable[[], None],
        resume: Callable[[], None],
        on_end: Callable[[], None],
        reply: Callable[[int, str | None], None],
    ) -> None:
        self.id = execution_id
        self._reply = reply  # sends an answer to the child's input request
        self.input_request: InputRequest | None = None  # the child waits for its answer
        self._log: deque[Entry] = deque()
        self._log_bytes = 0
        self._next_seq = 1
        self._replay_bytes = replay_bytes
        self._entry_bytes = max(1024, replay_bytes // 8)
        self._high_water = high_water
        # Token of the attached reader, 0 when none is. It starts reserved (-1) for the
        # request that started the execution, so nothing is dropped before it attaches.
        self._reader = -1
        self._readers = 0  # readers ever attached (tokens)
        self._cursor = 0  # the last sequence number the attached reader has taken
        self._unread = 0  # bytes the attached reader has not taken yet
        self._waiter: asyncio.Future[None] | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False
        self._on_end = on_end
        self._remaining = self._max_output = max_output
        self.truncated = False  # output past max_output was dropped
        self.notes: list[str] = []  # the server's own messages, appended to stderr text
        self.stopped_by: str | None = None  # "timeout" or "interrupted", when we stopped it
        self.stop_on_disconnect = False
        self.outcome: Done | Failure | None = None
        self.started = time.monotonic()
        self.finished = 0.0

    def __repr__(self) -> str:
        state = "running" if self.outcome is None else self.reason
        waiting = " waiting-for-input" if self.input_request is not None else ""
        return (
            f"<Execution {self.id} {state}{waiting} log={self._log_bytes}B reader={self._reader}>"
        )

    @property
    def duration_ms(self) -> float:
        end = self.finished or time.monotonic()
        return round((end - self.started) * 1000, 3)

    @property
    def reason(self) -> str:
        """Why the execution ended: ok, exception, timeout, interrupted, memory,
        output_limit or crashed."""
        outcome = self.outcome
        if self.stopped_by is not None:
            return self.stopped_by
        if not isinstance(outcome, Done):
            return "crashed"
        if outcome.reason == "ok":
            return "output_limit" if self.truncated else "ok"
        return "exception" if outcome.reason == "exit" else outcome.reason

    @property
    def output_bytes(self) -> int:
        """Output kept so far (at most the cap)."""
        return self._max_output - self._remaining

    # --- producer side (child pipe callbacks) -----------------------------------------------
    def push(self, kind: int, data: bytes) -> None:
        """Output, a result or a display: all count towards the output cap."""
        if self.outcome is not None:
            return
        size = len(data)
        if size > self._remaining:
            # Past the cap the bytes are dropped and the code runs on (README: limits). A
            # result or display is never cut (that would break its JSON): it goes whole.
            if self.truncated:
                return
            self.truncated = True
            if kind != T_STDOUT and kind != T_STDERR:
                return
            data = data[: self._remaining]
            size = len(data)
        self._remaining -= size
        if kind != T_STDOUT and kind != T_STDERR:
            self._append(kind, data)  # one entry, whatever its size: it is one event
            return
        # Entries of at most an eighth of the replay buffer: dropping the oldest ones to
        # stay within it then keeps most of the buffer's worth, whatever the read sizes.
        step = self._entry_bytes
        if size <= step:
            if size:
                self._append(kind, data)
            return
        view = memoryview(data)
        for start in range(0, size, step):
            self._append(kind, bytes(view[start : start + step]))

    def request_input(self, request: InputRequest, payload: bytes) -> None:
        """The child waits in input(); with no client left to answer, it gets end of input."""
        if self.outcome is not None:
            return
        if not self._reader:
            self._reply(request.number, None)
            return
        self.input_request = request
        # Not counted against the output cap: the prompt is short (cut by the child) and
        # there is one at a time; dropping it would leave the code waiting for nothing.
        self._append(T_INPUT_REQUEST, payload)

    def answer(self, value: str) -> None:
        """Send `value` as the answer to the pending input request."""
        request = self.input_request
        if request is None or self.outcome is not None:
            raise NoInputPending("no input request is waiting for an answer in this session")
        self.input_request = None
        self._reply(request.number, value)

    def finish(self, outcome: Done | Failure) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.input_request = None
        self.finished = time.monotonic()
        self._append(T_END, b"")
        if self._paused:
            self._paused = False
            self._resume()
        self._on_end()

    def _append(self, kind: int, data: bytes) -> None:
        size = len(data)
        self._log.append((self._next_seq, kind, data))
        self._next_seq += 1
        self._log_bytes += size
        if self._reader:
            self._unread += size
            if self._unread > self._high_water and not self._paused and self.outcome is None:
                self._paused = True
                self._pause()
        self._trim()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _trim(self) -> None:
        """Keep the log within replay_bytes, never dropping what the reader has not read
        (for an attached reader, backpressure bounds the unread part instead)."""
        log = self._log
        while self._log_bytes > self._replay_bytes and len(log) > 1:
            if self._reader and log[0][0] > self._cursor:
                break
            self._log_bytes -= len(log.popleft()[2])

    def _after(self, cursor: int) -> list[Entry]:
        """The entries after `cursor` still in the log, from the newest end: O(new ones)."""
        wanted = self._next_seq - 1 - cursor
        if wanted <= 0 or not self._log:
            return []
        if wanted >= len(self._log):
            return list(self._log)
        return list(itertools.islice(reversed(self._log), wanted))[::-1]

    # --- reader side ------------------------------------------------------------------------
    async def follow(self, after: int = 0) -> AsyncGenerator[list[Entry], None]:
        """Entries with a sequence number above `after`, as they come, until the end entry
        (none at all when `after` is already at or past it).

        Attaching detaches any earlier reader (its iteration ends). If entries after
        `after` were already dropped, the first batch starts with a T_GAP entry whose
        payload is the number of entries missed.
        """
        self._readers += 1
        token = self._reader = self._readers
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the earlier reader wakes, sees it is detached, ends
        cursor = self._cursor = after
        # Everything still in the log after `after` counts as unread for backpressure.
        self._unread = sum(len(e[2]) for e in self._after(after))
        try:
            while self._reader == token:
                batch = self._after(cursor)
                if batch:
                    first = batch[0][0]
                    if first > cursor + 1:
                        missed = first - cursor - 1
                        batch.insert(0, (first - 1, T_GAP, str(missed).encode()))
                    cursor = self._cursor = batch[-1][0]
                    self._unread = 0
                    if self._paused:
                        self._paused = False
                        self._resume()
                    yield batch
                    if batch[-1][1] == T_END:
                        return
                    continue
                if self.outcome is not None:
                    return  # over, and its end entry is at or before `after`: nothing comes
                waiter = self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    if self._waiter is waiter:  # not a later reader's
                        self._waiter = None
        finally:
            if self._reader == token:
                self.detach()

    def release_initial(self) -> None:
        """The starting request is done with the execution, having followed it or not."""
        if self._reader == -1:
            self.detach()

    def drop_reader(self) -> None:
        """Detach whoever reads, and wake them so that their iteration ends (their client is
        gone: only the server noticed)."""
        self.detach()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def detach(self) -> None:
        """The reader is gone: the execution runs on; the log keeps the newest events. An
        input request nobody can see any more gets end of input."""
        self._reader = 0
        self._unread = 0
        if self._paused:
            self._paused = False
            self._resume()
        self._trim()
        request, self.input_request = self.input_request, None
        if request is not None and self.outcome is None:
            self._reply(request.number, None)
