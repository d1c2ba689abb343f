"""One execution in flight: the output the child sends for it, buffered with backpressure."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
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
    "T_INPUT_REQUEST",
    "T_RESULT",
    "T_STDERR",
    "T_STDOUT",
    "Chunk",
    "Execution",
    "Failure",
]

# (frame type, payload): raw output bytes of T_STDOUT or T_STDERR, the UTF-8 repr of a
# T_RESULT, the JSON of a T_DISPLAY, the raw payload of a T_INPUT_REQUEST.
Chunk = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class Failure:
    """The execution ended without a completion record: the child died or broke protocol."""

    message: str


class Execution:
    """Receives one execution's frames from the child and hands them to one consumer.

    The producer side (`push`, `finish`) is called from the child's pipe callbacks; the
    consumer iterates `batches()`. When more than `high_water` bytes wait unconsumed, the
    child's pipe is paused, so a slow client slows the child instead of growing our memory.
    A detached execution (its client went away) keeps running and discards its output.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_detached",
        "_high_water",
        "_on_end",
        "_pause",
        "_paused",
        "_remaining",
        "_reply",
        "_resume",
        "_waiter",
        "finished",
        "input_request",
        "notes",
        "outcome",
        "started",
        "stopped_by",
        "truncated",
    )

    def __init__(
        self,
        *,
        high_water: int,
        max_output: int,
        pause: Callable[[], None],
        resume: Callable[[], None],
        on_end: Callable[[], None],
        reply: Callable[[int, str | None], None],
    ) -> None:
        self._chunks: deque[Chunk] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._buffered = 0
        self._high_water = high_water
        self._pause = pause
        self._resume = resume
        self._paused = False
        self._detached = False
        self._on_end = on_end
        self._reply = reply  # sends an answer to the child's input request
        self._remaining = max_output
        self.input_request: InputRequest | None = None  # the child waits for its answer
        self.truncated = False  # output past max_output was dropped
        self.notes: list[str] = []  # the server's own messages, appended to stderr text
        self.stopped_by: str | None = None  # "timeout" or "interrupted", when we stopped it
        self.outcome: Done | Failure | None = None
        self.started = time.monotonic()
        self.finished = 0.0

    def __repr__(self) -> str:
        state = "running" if self.outcome is None else type(self.outcome).__name__.lower()
        waiting = " waiting-for-input" if self.input_request is not None else ""
        return f"<Execution {state}{waiting} buffered={self._buffered} detached={self._detached}>"

    @property
    def duration_ms(self) -> float:
        end = self.finished or time.monotonic()
        return round((end - self.started) * 1000, 3)

    # --- producer side (child pipe callbacks) -----------------------------------------------
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
        if self._detached or not size:
            return
        self._chunks.append((kind, data))
        self._buffered += size
        if self._buffered > self._high_water and not self._paused:
            self._paused = True
            self._pause()
        self._wake()

    def request_input(self, request: InputRequest, payload: bytes) -> None:
        """The child waits in input(); with no client left to answer, it gets end of input."""
        if self.outcome is not None:
            return
        if self._detached:
            self._reply(request.number, None)
            return
        self.input_request = request
        # Not counted against the output cap: the prompt is short (cut by the child) and
        # there is one at a time; dropping it would leave the code waiting for nothing.
        self._chunks.append((T_INPUT_REQUEST, payload))
        self._wake()

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
        self.finished = time.monotonic()
        self.input_request = None
        if self._paused:
            self._paused = False
            self._resume()
        self._wake()
        self._on_end()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- consumer side ----------------------------------------------------------------------
    async def batches(self) -> AsyncIterator[list[Chunk]]:
        """Yield every chunk available at each wake-up, until the outcome is known."""
        while True:
            if self._chunks:
                batch = list(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self._resume()
                yield batch
                continue
            if self.outcome is not None:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def wait(self) -> Done | Failure:
        """Wait for the outcome, discarding output (for callers that do not want it)."""
        self.detach()
        while self.outcome is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.outcome

    def detach(self) -> None:
        """The consumer is gone: drop buffered and future output, never pause the child;
        an input request nobody can see any more gets end of input."""
        self._detached = True
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._resume()
        request, self.input_request = self.input_request, None
        if request is not None and self.outcome is None:
            self._reply(request.number, None)
