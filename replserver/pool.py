"""Where sessions get their children: a few started ahead of time, the rest on demand.

A new session or a reset takes a warm child (already started, confined and ready) instead
of waiting for an interpreter to start; the pool refills in the background. Children that
sessions are done with are also ended in the background, so no request waits for a
process to die or a directory to be removed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from .child import ChildProcess
from .errors import ChildStartError, ShuttingDown
from .isolation import Isolation
from .settings import Settings
from .startup import PreloadStatus

log = logging.getLogger(__name__)

REFILL_DELAY_S = 0.05


class ChildPool:
    """Hands out ready children; keeps `size` warm ones in reserve."""

    def __init__(
        self, settings: Settings, *, isolation: Isolation | None = None, size: int | None = None
    ) -> None:
        self._settings = settings
        self._isolation = isolation
        self.size = settings.pool_size if size is None else size
        self._warm: deque[ChildProcess] = deque()
        self._filling: asyncio.Task[None] | None = None
        self._endings: set[asyncio.Task[object]] = set()
        self._closed = False
        self.spawned = 0  # children started, warm or on demand
        self.hits = 0  # acquisitions served from the warm reserve
        self.preload = PreloadStatus(settings)  # what the children's start-up did, for /health

    def __repr__(self) -> str:
        return f"<ChildPool warm={len(self._warm)}/{self.size} spawned={self.spawned}>"

    @property
    def warm(self) -> int:
        return len(self._warm)

    def start(self) -> None:
        """Begin filling the reserve (call once the event loop runs)."""
        self._refill()

    async def acquire(self) -> ChildProcess:
        """A ready child: a warm one if there is one, else a fresh start."""
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        while self._warm:
            child = self._warm.popleft()
            if child.alive:
                self.hits += 1
                # Starting a child blocks the event loop for the fork and exec (a few ms):
                # not before the request that took this one has had its answer.
                asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._refill)
                return child
            self.discard(child)
        self._refill()
        child = await self._spawn()
        if self._closed:
            self.discard(child)
            raise ShuttingDown("the server is shutting down")
        return child

    def discard(self, child: ChildProcess, grace_s: float | None = None) -> None:
        """End a child in the background (the termination ladder, then its lease)."""
        task: asyncio.Task[object] = asyncio.create_task(child.end(grace_s))
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    async def _spawn(self) -> ChildProcess:
        child = await ChildProcess.spawn(self._settings, isolation=self._isolation)
        self.spawned += 1
        self.preload.record(child.startup)
        return child

    def _refill(self) -> None:
        if self._closed or len(self._warm) >= self.size:
            return
        if self._filling is None or self._filling.done():
            self._filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        # One at a time: a start forks the server and costs the machine ~15 ms of CPU,
        # which must not crowd out the requests being served meanwhile.
        while not self._closed and len(self._warm) < self.size:
            try:
                child = await self._spawn()
            except ChildStartError as exc:
                log.error("could not start a warm child: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if self._closed:
                self.discard(child)
                return
            self._warm.append(child)

    async def close(self) -> None:
        """End the reserve and wait for every background ending."""
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
            try:
                await self._filling
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our own cancellation, not the filler's
        while self._warm:
            self.discard(self._warm.popleft())
        while self._endings:
            await asyncio.gather(*list(self._endings), return_exceptions=True)
