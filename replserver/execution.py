"""One execution in flight: the output the child sends for it, buffered with backpressure."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .protocol import T_STDERR, T_STDOUT, Done

__all__ = ["T_STDERR", "T_STDOUT", "Chunk", "Execution", "Failure"]

Chunk = tuple[int, bytes]  # (T_STDOUT or T_STDERR, raw bytes)


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
        "_resume",
        "_waiter",
        "finished",
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
        self._remaining = max_output
        self.truncated = False  # output past max_output was dropped
        self.notes: list[str] = []  # the server's own messages, appended to stderr text
        self.stopped_by: str | None = None  # "timeout" or "interrupted", when we stopped it
        self.outcome: Done | Failure | None = None
        self.started = time.monotonic()
        self.finished = 0.0

    def __repr__(self) -> str:
        state = "running" if self.outcome is None else type(self.outcome).__name__.lower()
        return f"<Execution {state} buffered={self._buffered} detached={self._detached}>"

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
        if self.outcome is not None:
            return
        size = len(data)
        if size > self._remaining:
            # Past the cap the bytes are dropped and the code runs on (README: limits).
            if self.truncated:
                return
            self.truncated = True
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

    def finish(self, outcome: Done | Failure) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.finished = time.monotonic()
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
        """The consumer is gone: drop buffered and future output, never pause the child."""
        self._detached = True
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._resume()
