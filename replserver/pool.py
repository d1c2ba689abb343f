"""Where sessions get their children: a reserve started ahead of time, the rest on demand.

A new session or a reset takes a warm child (already started, confined and ready) instead
of waiting for an interpreter to start. The reserve refills as soon as a child is taken,
grows when requests find it empty (arrivals faster than starts), up to `REPL_POOL_MAX`,
and shrinks back to `REPL_POOL_SIZE` once no child has been taken for a while. Starts run
concurrently, two per core (one per core when started by exec). Children that sessions are done with
are ended in the background, so no request waits for a process to die.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque

from .child import ChildProcess
from .errors import ChildStartError, ShuttingDown
from .isolation import Isolation
from .settings import Settings
from .startup import PreloadStatus

log = logging.getLogger(__name__)

# No child taken for this long: the reserve goes back to its resting size.
IDLE_SHRINK_S = 30.0
# A refill that is not urgent waits this long (see _refill_soon).
REFILL_AFTER_S = 0.01
# After a failed start with nobody waiting, wait this long before the reserve tries again.
RETRY_AFTER_S = 1.0


def core_count() -> int:
    """Cores this process may run on (its affinity, not the machine's total)."""
    return len(os.sched_getaffinity(0)) or 1


class ChildPool:
    """Hands out ready children; keeps `target` warm ones, between `size` and `max_size`."""

    def __init__(
        self,
        settings: Settings,
        *,
        isolation: Isolation | None = None,
        size: int | None = None,
        max_size: int | None = None,
        idle_shrink_s: float = IDLE_SHRINK_S,
        parallel: int | None = None,
    ) -> None:
        self._settings = settings
        self._isolation = isolation
        self.size = settings.pool_size if size is None else size
        self.max_size = max(self.size, settings.pool_max if max_size is None else max_size)
        self.target = self.size  # warm children wanted now: grows on a miss, shrinks when idle
        # Starts in flight at most. A forked child's start is partly waiting (5 ms from
        # request to ready for 3.8 ms of its CPU and 1 ms of ours): two per core kept a
        # burst of 50 new sessions 15-20% shorter than one per core; by exec a start is
        # CPU all through, and more at once than cores only made bursts slower.
        forked = isolation is not None and isolation.forks_children
        self.parallel = parallel or core_count() * (2 if forked else 1)
        self._idle_shrink_s = idle_shrink_s
        self._warm: deque[ChildProcess] = deque()
        self._waiters: deque[asyncio.Future[ChildProcess]] = deque()
        self._starting: set[asyncio.Task[None]] = set()
        self._endings: set[asyncio.Task[object]] = set()
        self._shrink: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._refill_timer: asyncio.TimerHandle | None = None
        self._last_acquire = 0.0
        self._keeps_reserve = False
        self._closed = False
        self.spawned = 0  # children started, warm or on demand
        self.hits = 0  # acquisitions served from the warm reserve
        self.preload = PreloadStatus(settings)  # what the children's start-up did, for /health
        self.misses = 0  # acquisitions that found the reserve empty

    def __repr__(self) -> str:
        return (
            f"<ChildPool warm={len(self._warm)}/{self.target} max={self.max_size} "
            f"starting={len(self._starting)} waiting={len(self._waiters)} "
            f"spawned={self.spawned} hits={self.hits} misses={self.misses}>"
        )

    @property
    def warm(self) -> int:
        return len(self._warm)

    @property
    def starting(self) -> int:
        return len(self._starting)

    def start(self) -> None:
        """Begin keeping the reserve (call once the event loop runs). Before this, for a
        pool that is never started, and with `size` 0 (no reserve asked for, so none grows
        either), children are only started on demand."""
        self._keeps_reserve = self.size > 0
        self._refill()

    async def acquire(self) -> ChildProcess:
        """A ready child: a warm one if there is one, else the next one to finish starting."""
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        self._last_acquire = asyncio.get_running_loop().time()
        while self._warm:
            child = self._warm.popleft()
            if child.alive:
                self.hits += 1
                if self._warm:
                    self._refill_soon()
                else:
                    self._refill()  # the last one: the next arrival must not find it empty
                return child
            self.discard(child)
        self.misses += 1
        if self._keeps_reserve:
            # Ran dry: arrivals are faster than starts, so keep more ready from now on.
            self.target = min(self.max_size, max(2 * self.target, self.size + 1))
        waiter: asyncio.Future[ChildProcess] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._refill()
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled after a child was handed over but before we resumed: keep it.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._deliver(waiter.result())
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def discard(self, child: ChildProcess, grace_s: float | None = None) -> None:
        """End a child in the background (the termination ladder, then its lease)."""
        task: asyncio.Task[object] = asyncio.create_task(child.end(grace_s))
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    # --- starting children -------------------------------------------------------------------
    def _wanted(self) -> int:
        """Children that should be warm or starting: the reserve plus everyone waiting."""
        reserve = self.target if self._keeps_reserve and self._retry is None else 0
        return reserve + sum(1 for w in self._waiters if not w.done())

    def _refill_soon(self) -> None:
        """Refill once the request that just took a child has likely had its answer.

        A start holds the event loop for about 2 ms (the session's filesystem, the fork
        server's request; by exec, the fork of this process, about 5 ms); begun at once,
        it lands in the middle of that request (a `print(1)` takes about 1 ms). While the
        reserve still has a child this can wait a little; when it is empty it cannot."""
        if self._refill_timer is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._refill_timer = loop.call_later(REFILL_AFTER_S, self._refill_now)

    def _refill_now(self) -> None:
        self._refill_timer = None
        self._refill()

    def _refill(self) -> None:
        """Start children at once, self.parallel at a time, until the reserve
        and the waiters are covered. A start holds the event loop for a few ms: each one
        is its own task, so requests get the loop between two of them."""
        if self._closed:
            return
        while (
            len(self._starting) < self.parallel
            and len(self._warm) + len(self._starting) < self._wanted()
        ):
            self._starting.add(asyncio.create_task(self._start_one()))
        self._schedule_shrink()

    async def _start_one(self) -> None:
        try:
            child = await ChildProcess.spawn(self._settings, isolation=self._isolation)
        except ChildStartError as exc:
            self._start_failed(exc)
        except Exception as exc:  # a waiter must fail with a reason, never wait forever
            log.exception("unexpected error while starting a child")
            self._start_failed(ChildStartError(f"could not start the Python process: {exc}"))
        else:
            self.spawned += 1
            self.preload.record(child.startup)
            self._deliver(child)
        finally:
            # Counted out before anyone it served resumes, then the next start may begin.
            task = asyncio.current_task()
            if task is not None:
                self._starting.discard(task)
            self._refill()

    def _start_failed(self, exc: ChildStartError) -> None:
        waiter = next((w for w in self._waiters if not w.done()), None)
        if waiter is not None:
            waiter.set_exception(exc)  # that request fails with the reason; others retry
            return
        log.error("could not start a warm child: %s", exc)
        if self._retry is None and not self._closed:
            self._retry = asyncio.get_running_loop().call_later(RETRY_AFTER_S, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._refill()

    def _deliver(self, child: ChildProcess) -> None:
        """A ready child goes to the longest waiting request, else to the reserve."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(child)
                # Busy until the last waiter is served: idleness counts from then.
                self._last_acquire = asyncio.get_running_loop().time()
                return
        # More than the reserve holds (its waiter gave up): not kept past REPL_POOL_MAX.
        if self._closed or not child.alive or len(self._warm) >= self.max_size:
            self.discard(child)
            return
        self._warm.append(child)

    # --- shrinking when idle -----------------------------------------------------------------
    def _schedule_shrink(self) -> None:
        if self._shrink is not None or self._closed:
            return
        if self.target <= self.size and len(self._warm) <= self.size:
            return
        loop = asyncio.get_running_loop()
        due = self._last_acquire + self._idle_shrink_s
        self._shrink = loop.call_at(max(due, loop.time()), self._shrink_if_idle)

    def _shrink_if_idle(self) -> None:
        self._shrink = None
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_acquire >= self._idle_shrink_s:
            self.target = self.size
            while len(self._warm) > self.size:
                self.discard(self._warm.pop())
        self._schedule_shrink()

    # --- the end -----------------------------------------------------------------------------
    async def close(self) -> None:
        """Refuse new work, let starts in flight finish (their children are ended: a start
        cancelled midway could leave its process behind), end the reserve, and wait for
        every background ending."""
        self._closed = True
        for handle in (self._shrink, self._retry, self._refill_timer):
            if handle is not None:
                handle.cancel()
        self._shrink = self._retry = self._refill_timer = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ShuttingDown("the server is shutting down"))
        while self._starting:
            await asyncio.gather(*list(self._starting), return_exceptions=True)
        while self._warm:
            self.discard(self._warm.popleft())
        while self._endings:
            await asyncio.gather(*list(self._endings), return_exceptions=True)
