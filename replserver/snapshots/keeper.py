"""When sessions are saved and restored: on culling, eviction and shutdown, after a quiet
spell (against crashes), and on an id's next use; deleted on reset and DELETE."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Histogram

from ..child import ChildProcess
from ..metrics import Metrics
from ..session import Session
from ..settings import Settings
from . import Store, StoreError, open_store
from .dir_store import DirStore
from .envelope import Meta, Rejected, seal, unseal
from .transfer import TransferError, give, take

log = logging.getLogger(__name__)

SIZE_BUCKETS = tuple(2.0**n for n in range(10, 28, 2))  # 1 KiB .. 64 MiB
TIME_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SWEEP_PERIOD_S = 3600.0
IDLE_CAUSE = "idle"  # a save after a quiet spell: restored only when the process died


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")[:-6] + "Z"


class Snapshots:
    """Saves and restores this server's sessions in one store."""

    def __init__(
        self, settings: Settings, store: Store, key: bytes, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self._key = key
        self._settings = settings
        # Work per session id, in order: a restore waits for the save or delete before it.
        self._pending: dict[str, asyncio.Task[Any]] = {}
        self._saved_activity: dict[str, float] = {}  # id -> last_active when last saved
        self._idle_saver: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.saved = self.restored = self.failed = 0
        self._metrics = _SnapshotMetrics(metrics) if metrics is not None else None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Snapshots | None:
        opened = open_store(settings)
        return None if opened is None else cls(settings, *opened, metrics=metrics)

    def __repr__(self) -> str:
        return (
            f"<Snapshots {self.store.description} saved={self.saved} restored={self.restored}"
            f" failed={self.failed} pending={len(self._pending)}>"
        )

    def start(self, sessions: Callable[[], Iterable[Session]]) -> None:
        """Background work: expired snapshots swept, idle sessions saved against crashes."""
        if isinstance(self.store, DirStore):
            self._sweeper = asyncio.create_task(self._sweep_forever(self.store))
        if self._settings.snapshot_idle_s > 0:
            self._idle_saver = asyncio.create_task(self._save_idle_forever(sessions))

    # --- saving -------------------------------------------------------------------------------
    async def save(self, session: Session, cause: str) -> bool:
        """Save the session's namespace now (between its requests); False if nothing was."""
        started = time.monotonic()
        # No request since the last save: the stored snapshot is the session's state, and
        # only its label changes, which costs no pickling (a shutdown of many sessions that
        # were saved while idle is quick).
        unchanged = self._saved_activity.get(session.id) == session.last_active
        if cause != IDLE_CAUSE and unchanged and await self._relabel(session.id, cause):
            self._count("save", cause, "relabelled", seconds=time.monotonic() - started)
            return True
        # An idle save never waits: the session is in use again, and saves later. Nor does
        # a shutdown's: code still running then is ended, and its session comes back as of
        # its last save (or fresh).
        wait = cause not in (IDLE_CAUSE, "shutdown")
        async with session.between_requests(wait=wait) as child:
            if child is None:
                return False
            activity = session.last_active
            try:
                blob, summary = await take(
                    child, self._settings.snapshot_max_bytes, self._settings.timeout_s
                )
            except TransferError as exc:
                log.warning("session %s: not saved (%s): %s", session.id, cause, exc)
                self._count("save", cause, "failed")
                self._saved_activity[session.id] = activity  # idle: not again until used
                return False
        try:
            if summary["names"] == 0 and summary["files"] == 0 and not summary["skipped"]:
                await self.store.delete(session.id)  # nothing to bring back
                self._count("save", cause, "empty")
                return True
            meta = Meta(session.id, cause, time.time(), self._settings.replica_id)
            data = seal(self._key, meta, blob)
            await self.store.put(session.id, data)
        except (StoreError, OSError) as exc:
            log.warning("session %s: not saved (%s): %s", session.id, cause, exc)
            self._count("save", cause, "failed")
            return False
        self._saved_activity[session.id] = activity
        elapsed = time.monotonic() - started
        log.info(
            "session %s saved (%s): %d names, %d skipped, %d bytes in %.3f s",
            session.id, cause, summary["names"], len(summary["skipped"]), len(data), elapsed,
        )  # fmt: skip
        self._count("save", cause, "ok", size=len(data), seconds=elapsed)
        return True

    async def _relabel(self, session_id: str, cause: str) -> bool:
        """Store the session's snapshot again under `cause`; False if it is not there."""
        try:
            data = await self.store.get(session_id)
            if data is None:
                return False
            meta, blob = unseal(
                self._key, session_id, data, max_age_s=self._settings.snapshot_ttl_s
            )
            meta = Meta(session_id, cause, meta.taken_at, self._settings.replica_id)
            await self.store.put(session_id, seal(self._key, meta, blob))
        except (StoreError, OSError, Rejected) as exc:
            log.warning("session %s: snapshot not relabelled: %s", session_id, exc)
            return False
        return True

    def retire(self, session: Session, cause: str, reason: str) -> asyncio.Task[Any]:
        """Save the session in the background, then end it with `reason`."""
        return self._chain(session.id, self._save_then_close(session, cause, reason))

    async def _save_then_close(self, session: Session, cause: str, reason: str) -> None:
        try:
            await self.save(session, cause)
        except asyncio.CancelledError:
            log.warning("session %s: not saved (%s): out of time", session.id, cause)
            self._count("save", cause, "failed")
            raise
        finally:
            session.close(reason)
            self._saved_activity.pop(session.id, None)

    async def retire_all(self, sessions: list[Session], cause: str, reason: str) -> None:
        """Save every session (as many at once as there are cores), then end each; saves
        not done within REPL_TIMEOUT_S are given up (those sessions end unsaved), so that
        a shutdown takes a bounded time."""
        self._stop_idle_saves()
        limit = asyncio.Semaphore(max(2, os.cpu_count() or 1))

        async def one(session: Session) -> None:
            async with limit:
                await self._save_then_close(session, cause, reason)

        tasks = [self._chain(s.id, one(s)) for s in sessions]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self._settings.timeout_s)
        for task in late:
            task.cancel()  # _save_then_close still ends the session
        if late:
            log.warning("%d session(s) not saved within %g s", len(late), self._settings.timeout_s)
            await asyncio.wait(late)

    async def _save_idle_forever(self, sessions: Callable[[], Iterable[Session]]) -> None:
        idle_s = self._settings.snapshot_idle_s
        period = min(30.0, max(0.05, idle_s / 4))
        while True:
            await asyncio.sleep(period)
            now = time.time()
            for session in list(sessions()):
                quiet = now - session.last_active >= idle_s and not session.busy
                changed = self._saved_activity.get(session.id) != session.last_active
                if quiet and changed and not session.closed and session.id not in self._pending:
                    await self._chain(session.id, self.save(session, IDLE_CAUSE))

    # --- restoring ----------------------------------------------------------------------------
    async def restore(self, session: Session, child: ChildProcess, crashed: bool) -> None:
        """Give the session's new child its saved namespace, if there is one; the session's
        next reply says what came back, or why nothing did."""
        pending = self._pending.get(session.id)
        if pending is not None and not crashed:
            # A save or delete of this id in flight, by the session this one replaces (a
            # crashed session is its own: its pending save waits for the lock we hold).
            await asyncio.wait([pending])
        started = time.monotonic()
        try:
            data = await self.store.get(session.id)
        except (StoreError, OSError) as exc:
            log.warning("session %s: snapshot store unreadable: %s", session.id, exc)
            session.lost_state(f"its saved state could not be read ({exc})")
            self._count("restore", "unknown", "failed")
            return
        if data is None:
            return
        try:
            meta, blob = unseal(
                self._key, session.id, data, max_age_s=self._settings.snapshot_ttl_s
            )
            report = await give(child, blob, self._settings.timeout_s)
            if "error" in report:
                raise Rejected(report["error"])
        except (Rejected, TransferError) as exc:
            log.warning("session %s: snapshot not restored: %s", session.id, exc)
            session.lost_state(f"its saved state was not restored: {exc}")
            self._count("restore", "unknown", "rejected")
            self._chain(session.id, self._delete(session.id))
            return
        reason = self._reason(meta, crashed)
        details: dict[str, Any] = {
            "reason": reason,
            "takenAt": iso(meta.taken_at),
            "names": report["names"],
            "skipped": report["skipped"],
        }
        if report["files"]:
            details["files"] = report["files"]
        session.restored_from(details, state_lost=reason == "crash")
        self._saved_activity[session.id] = session.last_active
        self._count("restore", reason, "ok", seconds=time.monotonic() - started)

    def _reason(self, meta: Meta, crashed: bool) -> str:
        if crashed or meta.cause == IDLE_CAUSE:
            return "crash"  # the process ended without a save: this state is older
        if meta.replica != self._settings.replica_id and meta.cause == "shutdown":
            return "moved"
        return meta.cause

    # --- deleting -----------------------------------------------------------------------------
    def forget(self, session_id: str) -> asyncio.Task[Any]:
        """Delete the session's snapshot (reset, DELETE): it is never restored again."""
        self._saved_activity.pop(session_id, None)
        return self._chain(session_id, self._delete(session_id))

    async def _delete(self, session_id: str) -> None:
        try:
            await self.store.delete(session_id)
        except (StoreError, OSError) as exc:
            log.error("session %s: snapshot not deleted: %s", session_id, exc)

    # --- bookkeeping --------------------------------------------------------------------------
    def _chain(self, session_id: str, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `work` after what is pending for this id; restores wait for the last one."""
        before = self._pending.get(session_id)

        async def run() -> Any:
            if before is not None:
                await asyncio.wait([before])
            return await work

        task = asyncio.create_task(run())
        self._pending[session_id] = task
        task.add_done_callback(lambda t: self._done(session_id, t))
        return task

    def _done(self, session_id: str, task: asyncio.Task[Any]) -> None:
        if self._pending.get(session_id) is task:
            del self._pending[session_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("snapshot work for %r failed", session_id, exc_info=task.exception())

    def _count(
        self, op: str, reason: str, outcome: str, *, size: int = 0, seconds: float | None = None
    ) -> None:
        if op == "save" and outcome == "ok":
            self.saved += 1
        elif op == "restore" and outcome == "ok":
            self.restored += 1
        elif outcome in ("failed", "rejected"):
            self.failed += 1
        if self._metrics is not None:
            self._metrics.record(op, reason, outcome, size, seconds)

    def _stop_idle_saves(self) -> None:
        for task in (self._idle_saver, self._sweeper):
            if task is not None:
                task.cancel()
        self._idle_saver = self._sweeper = None

    @staticmethod
    async def _sweep_forever(store: DirStore) -> None:
        """Expired snapshots of sessions nobody came back for go (Redis expires its own)."""
        while True:
            try:
                removed = await store.sweep()
            except OSError as exc:
                log.warning("snapshot sweep of %s: %s", store.directory, exc)
            else:
                if removed:
                    log.info("removed %d expired snapshot(s)", removed)
            await asyncio.sleep(SWEEP_PERIOD_S)

    async def settled(self) -> None:
        """Return once no save, relabel or delete is in flight."""
        while self._pending:
            await asyncio.wait(list(self._pending.values()))

    async def close(self) -> None:
        """Wait for the saves and deletes in flight; close the store."""
        self._stop_idle_saves()
        await self.settled()
        if not self._closed:
            self._closed = True
            await self.store.close()


class _SnapshotMetrics:
    """Snapshots and restores by reason and outcome; sizes; how long each took."""

    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.operations = Counter(
            "replserver_snapshots",
            "Snapshot saves and restores, by operation, reason and outcome.",
            ["operation", "reason", "outcome"],
            registry=registry,
        )
        self.sizes = Histogram(
            "replserver_snapshot_bytes",
            "Sizes of the snapshots saved.",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.seconds = Histogram(
            "replserver_snapshot_seconds",
            "Time a save or a restore took.",
            ["operation"],
            buckets=TIME_BUCKETS,
            registry=registry,
        )

    def record(self, op: str, reason: str, outcome: str, size: int, seconds: float | None) -> None:
        self.operations.labels(op, reason, outcome).inc()
        if size:
            self.sizes.observe(size)
        if seconds is not None:
            self.seconds.labels(op).observe(seconds)
