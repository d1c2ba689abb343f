"""One session: its child process, the queue of requests waiting for it, its counters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import completion
from .child import ChildProcess
from .errors import NoInputPending, ReplError, SessionBusy, ShuttingDown
from .execution import Execution
from .files import SessionDir, copy_files, has_entries
from .metrics import Metrics
from .pool import ChildPool
from .settings import Settings

log = logging.getLogger(__name__)

RUNS_KEPT = 2  # per session: the running execution and the one before it
# The watchdog ends an execution this long after its time limit and interrupt grace, if
# nothing else has: the bound on how long any session stays busy.
WATCHDOG_MARGIN_S = 1.0


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass(frozen=True, slots=True)
class Run:
    """An execution that has been sent to the child, and whether state was lost before it."""

    session_id: str
    execution: Execution
    execution_count: int
    restart_reason: str | None
    # Set on the first run after the namespace was restored from a snapshot: what came back.
    restored: dict[str, Any] | None = None


# Brings a saved namespace into a session's new child (replserver/snapshots); the bool is
# True when the session's earlier child died.
Restorer = Callable[["Session", ChildProcess, bool], Awaitable[None]]


class Session:
    """Runs one session's requests one at a time, in arrival order, in its own child."""

    def __init__(
        self,
        session_id: str,
        *,
        settings: Settings,
        pool: ChildPool,
        metrics: Metrics | None = None,
    ) -> None:
        self.id = session_id
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._child: ChildProcess | None = None
        # asyncio.Lock wakes waiters first-in first-out: requests run in arrival order.
        # The lock is held from sending the code until the child's completion frame, and
        # released by the execution itself, so a client that goes away cannot leave it held.
        self._lock = asyncio.Lock()
        self._current: Execution | None = None
        # The latest runs, for clients reattaching to an execution's events by its id.
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self._timers: list[asyncio.TimerHandle] = []
        self._lost_state: str | None = None  # why the next run starts on a fresh child
        self.restorer: Restorer | None = None
        self._restored: dict[str, Any] | None = None  # for the next run to report
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
        return self._current is not None

    @property
    def busy(self) -> bool:
        """Running, or requests wait for it: not to be evicted."""
        return self._current is not None or self.queued > 0 or self._lock.locked()

    def describe(self) -> dict[str, Any]:
        """GET /sessions/{id}: the session's state and its process's resource use."""
        child = self._child
        rss, cpu = child.usage() if child is not None else (0, 0.0)
        return {
            "sessionId": self.id,
            "state": "running" if self.running else ("idle" if child else "not started"),
            "created": _iso(self.created),
            "lastActive": _iso(self.last_active),
            "executionCount": self.execution_count,
            "running": self.running,
            "queued": self.queued,
            "rssBytes": rss,
            "cpuSeconds": cpu,
        }

    def files(self) -> SessionDir | None:
        """The working directory of the session's current child (None before it has one)."""
        child = self._child
        lease = child.lease if child is not None else None
        return SessionDir(lease.workdir, lease.uid) if lease is not None else None

    async def ensure_child(self) -> None:
        """Give the session a child, and with it a working directory, without running code."""
        child = self._child
        if child is not None and child.alive:
            return
        async with self._lock:
            await self._ensure_child()
        self.last_active = time.time()

    async def _carry_files(self, old: ChildProcess, new: ChildProcess) -> None:
        """The files of the old child's directory follow the session to its new child.

        A notebook's kernel restart keeps the files on disk; so do a reset and a crash here.
        The old child is killed first (it is being discarded), so nothing of it writes
        while the copy runs.
        """
        source, target = old.lease, new.lease
        if source is None or target is None:
            return
        src = SessionDir(source.workdir, source.uid)
        try:
            if not await asyncio.to_thread(has_entries, src):
                return
            old.kill("the session was reset")
            dst = SessionDir(target.workdir, target.uid)
            copied = await asyncio.to_thread(copy_files, src, dst)
            log.info("session %s: %d file(s) carried to its new process", self.id, copied)
        except (OSError, ReplError) as exc:
            log.warning("session %s: files not all carried to its new process: %s", self.id, exc)

    def lost_state(self, reason: str) -> None:
        """The next reply says earlier state is gone, and why (eviction, idle culling)."""
        self._lost_state = reason

    def restored_from(self, details: dict[str, Any], *, state_lost: bool) -> None:
        """The next reply says the namespace came back from a snapshot; unless `state_lost`
        (an older snapshot, after a crash), it is not a restart."""
        self._restored = details
        if not state_lost:
            self._lost_state = None

    @contextlib.asynccontextmanager
    async def between_requests(self, *, wait: bool = True) -> AsyncIterator[ChildProcess | None]:
        """Hold the session between two requests: its live child, or None if it has none
        (or, with `wait` False, if a request holds it now)."""
        if not wait and self._lock.locked():
            yield None
            return
        async with self._lock:
            child = self._child
            yield child if child is not None and child.alive and not self.closed else None

    async def start(
        self, code: str, *, timeout_s: float | None = None, interactive: bool = False
    ) -> Run:
        """Wait for our turn, make sure a child is up, send it `code`; `interactive`: the
        client can answer input() (a stream)."""

        self.queued += 1
        try:
            await self._lock.acquire()
        finally:
            self.queued -= 1
        try:
            child = await self._ensure_child()
            if not child.alive:
                # It ended while it was made ready (files carried over, a snapshot given):
                # the session's next child, which the reply reports as a restart.
                child = await self._ensure_child()
            self.execution_count += 1
            execution = Execution(
                f"{self.id}.{secrets.token_hex(6)}",
                high_water=self._settings.stream_buffer_bytes,
                max_output=self._settings.max_output_bytes,
                replay_bytes=self._settings.replay_buffer_bytes,
                pause=child.pause_reading,
                resume=child.resume_reading,
                on_end=self._on_end,
                reply=child.reply_input,
            )
            child.start(code, execution, interactive=interactive)
        except BaseException:
            self._lock.release()
            raise
        self._current = execution
        # The clock starts when the code reaches the child, not while it waits its turn.
        limit = self._settings.timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(limit, self._expire, execution, limit))
        bound = limit + self._settings.interrupt_grace_s + WATCHDOG_MARGIN_S
        self._timers.append(loop.call_later(bound, self._watchdog, execution, child, bound))
        self.last_active = time.time()
        restart, self._lost_state = self._lost_state, None
        restored, self._restored = self._restored, None
        run = Run(self.id, execution, self.execution_count, restart, restored)
        self.runs[execution.id] = run
        while len(self.runs) > RUNS_KEPT:
            self.runs.popitem(last=False)
        return run

    def _on_end(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        execution, self._current = self._current, None
        try:
            if execution is not None and self._metrics is not None:
                self._metrics.execution_finished(execution)
            child = self._child
            if execution is not None and execution.stopped_by and child and child.alive:
                # A stop means everything the code was running: processes it started (a
                # fork loop's copies born after the SIGINT, say) must not run on unseen.
                child.kill_others()
        finally:
            self.last_active = time.time()
            self._lock.release()  # whatever failed above, the session is free

    def answer_input(self, value: str) -> None:
        """Answer the input() the running code waits in; NoInputPending if it waits for none."""
        execution = self._current
        if execution is None:
            raise NoInputPending("nothing is running in this session, so no input is awaited")
        execution.answer(value)

    async def ask(self, query: completion.Query) -> dict[str, Any]:
        """Completion or inspection from the child's live namespace. It never waits behind
        code: while the session runs (or has requests queued), SessionBusy at once."""
        if self.busy:
            raise SessionBusy(
                f"the session is running code (or another request); {query.op} answers"
                " when it is idle: retry then"
            )
        async with self._lock:
            child = await self._ensure_child()
            self.last_active = time.time()
            return await completion.ask(
                child,
                query,
                timeout_s=completion.QUERY_TIMEOUT_S,
                grace_s=self._settings.interrupt_grace_s,
            )

    # --- stopping running code ----------------------------------------------------------------
    def _expire(self, execution: Execution, limit_s: float) -> None:
        if execution.outcome is None:
            execution.notes.append(f"Execution timed out after {limit_s:g} s.")
            self._stop(execution, "timeout")

    def interrupt(self) -> bool:
        """Interrupt the running execution (the stop button); False if nothing runs."""
        execution = self._current
        if execution is None or execution.stopped_by is not None:
            return execution is not None
        execution.notes.append("Execution interrupted.")
        self._stop(execution, "interrupted")
        return True

    def _stop(self, execution: Execution, why: str) -> None:
        """SIGINT now; if the code has not come back within the grace period, kill it."""
        execution.stopped_by = why
        child = self._child
        if child is None or not child.interrupt():
            return
        loop = asyncio.get_running_loop()
        grace = self._settings.interrupt_grace_s
        self._timers.append(loop.call_later(grace, self._escalate, execution, child, grace))

    def _escalate(self, execution: Execution, child: ChildProcess, grace_s: float) -> None:
        if execution.outcome is not None or not child.alive:
            return
        log.warning(
            "session %s: no response %g s after SIGINT, killing its process", self.id, grace_s
        )
        child.kill(
            f"The code did not stop within {grace_s:g} s of the interrupt, so the session's"
            " Python process was killed; the next request starts a fresh one"
            " (earlier state was lost)."
        )

    def _watchdog(self, execution: Execution, child: ChildProcess, bound_s: float) -> None:
        """The last line: the time limit, the interrupt and the kill all failed to end the
        execution, whatever the code did. End it and its processes, and free the session."""
        if execution.outcome is not None:
            return
        log.error(
            "session %s: %r still running after %g s: killing it", self.id, execution, bound_s
        )
        child.abandon(
            execution,
            f"The watchdog ended this execution: it was still running {bound_s:g} s after it"
            " started, past its time limit and the interrupt's grace period, so the session's"
            " Python process was killed; the next request starts a fresh one (earlier state"
            " was lost).",
        )

    # --- the child ----------------------------------------------------------------------------
    async def _ensure_child(self) -> ChildProcess:
        child = self._child
        if child is not None and child.alive:
            return child
        crashed = child is not None
        if child is not None:
            # The child died since we last used it: the next reply says state was lost.
            self._lost_state = child.error or "the session's Python process ended"
            self._child = None
            if self._metrics is not None:
                self._metrics.child_restarts.inc()
        old = child
        try:
            child = await self._pool.acquire()
        except BaseException:
            if old is not None:
                self._pool.discard(old, 0)
            raise
        if old is not None:
            try:
                await self._carry_files(old, child)
            except BaseException:
                self._pool.discard(child)
                raise
            finally:
                self._pool.discard(old, 0)
        if self.closed:
            self._pool.discard(child)
            raise ShuttingDown("the session was closed while starting")
        self._child = child
        self.execution_count = 0
        if self.restorer is not None:
            await self.restorer(self, child, crashed)
            if not child.alive:  # the restore went wrong and ended it: start afresh
                self._pool.discard(child, 0)
                child = self._child = await self._pool.acquire()
        return child

    async def reset(self) -> None:
        """A fresh interpreter: queued behind earlier requests, nothing of the old one kept
        but the files of its working directory.

        The new child comes from the warm pool at once; the old one ends in the background.
        """
        async with self._lock:
            child, self._child = self._child, None
            self._lost_state = None
            self.execution_count = 0
            try:
                new = None if self.closed else await self._pool.acquire()
            except BaseException:
                if child is not None:
                    self._pool.discard(child)
                raise
            if child is not None:
                try:
                    if new is not None:
                        await self._carry_files(child, new)
                except BaseException:
                    if new is not None:
                        self._pool.discard(new)
                    raise
                finally:
                    self._pool.discard(child)
            if new is not None and self.closed:  # closed while the files were copied
                self._pool.discard(new)
                new = None
            self._child = new
        self.last_active = time.time()

    def close(self, reason: str = "the session was closed") -> None:
        """End the session now: a running execution fails with `reason`, and the child's
        whole process group is killed (in the background)."""
        self.closed = True
        child, self._child = self._child, None
        if child is not None:
            if child.current is not None:
                child.kill(f"The session's Python process was ended: {reason}; its state was lost.")
            self._pool.discard(child)
