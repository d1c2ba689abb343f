"""One session: its child process, the queue of requests waiting for it, its counters."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .child import ChildProcess
from .errors import ShuttingDown
from .execution import Execution
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Run:
    """An execution that has been sent to the child, and whether state was lost before it."""

    execution: Execution
    execution_count: int
    restart_reason: str | None


class Session:
    """Runs one session's requests one at a time, in arrival order, in its own child."""

    def __init__(self, session_id: str, *, settings: Settings) -> None:
        self.id = session_id
        self._settings = settings
        self._child: ChildProcess | None = None
        # asyncio.Lock wakes waiters first-in first-out: requests run in arrival order.
        # The lock is held from sending the code until the child's completion frame, and
        # released by the execution itself, so a client that goes away cannot leave it held.
        self._lock = asyncio.Lock()
        self._lost_state: str | None = None  # why the next run starts on a fresh child
        self.created = time.time()
        self.last_active = self.created
        self.execution_count = 0  # executions sent to the current child
        self.queued = 0
        self.closed = False

    def __repr__(self) -> str:
        state = "running" if self.running else "idle"
        return (
            f"<Session id={self.id} {state} executions={self.execution_count}"
            f" queued={self.queued} child={self._child!r}>"
        )

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.current is not None

    async def start(self, code: str) -> Run:
        """Wait for our turn, make sure a child is up, send it `code`."""
        self.queued += 1
        try:
            await self._lock.acquire()
        finally:
            self.queued -= 1
        try:
            child = await self._ensure_child()
            self.execution_count += 1
            execution = Execution(
                high_water=self._settings.stream_buffer_bytes,
                pause=child.pause_reading,
                resume=child.resume_reading,
                on_end=self._on_end,
            )
            child.start(code, execution)
        except BaseException:
            self._lock.release()
            raise
        self.last_active = time.time()
        restart, self._lost_state = self._lost_state, None
        return Run(execution, self.execution_count, restart)

    def _on_end(self) -> None:
        self.last_active = time.time()
        self._lock.release()

    async def _ensure_child(self) -> ChildProcess:
        child = self._child
        if child is not None and child.alive:
            return child
        if child is not None:
            # The child died since we last used it: the next reply says state was lost.
            self._lost_state = child.error or "the session's Python process ended"
            self._child = None
            await child.end(0)
        child = await ChildProcess.spawn(self._settings)
        if self.closed:
            await child.end()
            raise ShuttingDown("the session was closed while starting")
        self._child = child
        self.execution_count = 0
        return child

    async def reset(self) -> None:
        """A fresh interpreter: queued behind earlier requests, nothing of the old one kept."""
        async with self._lock:
            child, self._child = self._child, None
            self._lost_state = None
            self.execution_count = 0
            if child is not None:
                await child.end()
        self.last_active = time.time()

    async def close(self) -> None:
        """End the session now: a running execution fails, its process group is killed."""
        self.closed = True
        child, self._child = self._child, None
        if child is not None:
            await child.end()
