"""All sessions of this server: look up or create, evict, cull, delete, close."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from .errors import ShuttingDown, TooManySessions
from .isolation import Isolation
from .metrics import Metrics
from .pool import ChildPool
from .session import Run, Session
from .settings import Settings
from .snapshots.keeper import Snapshots

log = logging.getLogger(__name__)

_FORGOTTEN_MAX = 10_000  # ids of ended sessions remembered, to say why state was lost


class SessionManager:
    """Owns every Session; the only place sessions are created or forgotten."""

    def __init__(
        self,
        settings: Settings,
        isolation: Isolation | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self.isolation = isolation
        self.metrics = metrics
        self.pool = ChildPool(settings, isolation=isolation)
        # Least recently used first: the order eviction and culling look at.
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._forgotten: OrderedDict[str, str] = OrderedDict()  # id -> why it ended
        self._closing = False
        self._culler: asyncio.Task[None] | None = None
        self.evicted = 0
        self.culled = 0
        self.deleted = 0
        # Saved namespaces (None with REPL_SNAPSHOT_STORE=off): sessions outlive processes.
        self.snapshots = Snapshots.from_settings(settings, metrics)
        if metrics is not None:
            metrics.watch(self.snapshot)

    def __repr__(self) -> str:
        return f"<SessionManager sessions={len(self._sessions)} {self.pool!r}>"

    def __len__(self) -> int:
        return len(self._sessions)

    def start(self) -> None:
        """Background work: fill the warm pool, cull idle sessions."""
        self.pool.start()
        self._culler = asyncio.create_task(self._cull_forever())
        if self.snapshots is not None:
            self.snapshots.start(self._sessions.values)

    def snapshot(self) -> dict[str, float]:
        """Counts for /metrics, read at scrape time."""
        return {
            "live": len(self._sessions),
            "culled": self.culled,
            "evicted": self.evicted,
            "deleted": self.deleted,
            "warm": self.pool.warm,
            "spawned": self.pool.spawned,
        }

    def find_run(self, execution_id: str) -> Run | None:
        """A recent execution by its id ("<session id>.<token>")."""
        session = self._sessions.get(execution_id.rpartition(".")[0])
        return session.runs.get(execution_id) if session is not None else None

    def find(self, session_id: str) -> Session | None:
        """The session with this id if it exists; never creates one."""
        return self._sessions.get(session_id)

    async def get(self, session_id: str) -> Session:
        """The session with this id, created on first use (evicting an idle one at the cap)."""
        session = self._sessions.get(session_id)
        if session is not None:
            self._sessions.move_to_end(session_id)
            return session
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if len(self._sessions) >= self._settings.max_sessions:
            self._evict_idle()
        session = Session(session_id, settings=self._settings, pool=self.pool, metrics=self.metrics)
        if self.snapshots is not None:
            session.restorer = self.snapshots.restore
        lost = self._forgotten.pop(session_id, None)
        if lost is not None:
            session.lost_state(lost)
        self._sessions[session_id] = session
        return session

    def _evict_idle(self) -> None:
        """End the least recently used idle session, or refuse when all are busy."""
        for sid, session in self._sessions.items():
            if not session.busy:
                log.info("evicting idle session %s (cap of %d)", sid, self._settings.max_sessions)
                self.evicted += 1
                self._drop(sid, "evicted: the server's session cap was reached", "evicted")
                return
        raise TooManySessions(
            f"all {self._settings.max_sessions} sessions are busy; retry shortly",
            retry_after_s=1,
        )

    def _drop(self, session_id: str, reason: str, cause: str | None = None) -> None:
        """Forget the session and end it; with a `cause` (culled, evicted), save it first."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        self._forgotten[session_id] = reason
        while len(self._forgotten) > _FORGOTTEN_MAX:
            self._forgotten.popitem(last=False)
        if cause is not None and self.snapshots is not None:
            self.snapshots.retire(session, cause, reason)
        else:
            session.close(reason)

    def delete(self, session_id: str) -> bool:
        """End a session now (DELETE /sessions/{id}); False if there was none. Its snapshot
        is deleted either way."""
        if self.snapshots is not None:
            self.snapshots.forget(session_id)
        if session_id not in self._sessions:
            return False
        self.deleted += 1
        self._drop(session_id, "the session was deleted")
        self._forgotten.pop(session_id, None)  # a deleted id starts afresh, not "restarted"
        return True

    def cull(self, now: float | None = None) -> int:
        """End sessions idle for longer than REPL_SESSION_IDLE_S; how many were ended."""
        limit = self._settings.session_idle_s
        deadline = (time.time() if now is None else now) - limit
        idle = [sid for sid, s in self._sessions.items() if s.last_active < deadline and not s.busy]
        for sid in idle:
            self._drop(sid, f"idle: no request for {limit:g} s", "culled")
        self.culled += len(idle)
        return len(idle)

    async def _cull_forever(self) -> None:
        period = min(60.0, max(0.05, self._settings.session_idle_s / 4))
        while True:
            await asyncio.sleep(period)
            culled = self.cull()
            if culled:
                log.info("culled %d idle session(s)", culled)

    async def reset(self, session_id: str) -> None:
        if self.snapshots is not None:
            await self.snapshots.forget(session_id)  # a reset session is never resurrected
        session = self._sessions.get(session_id)
        if session is not None:
            await session.reset()

    async def close_all(self) -> None:
        """End every session and its process group (server shutdown)."""
        self._closing = True
        if self._culler is not None:
            self._culler.cancel()
            self._culler = None
        reason = "the server is shutting down"
        if self.snapshots is not None:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            await self.snapshots.retire_all(sessions, "shutdown", reason)
            await self.snapshots.close()
        for sid in list(self._sessions):
            self._drop(sid, reason)
        await self.pool.close()
        if self.isolation is not None:
            await self.isolation.close()
            self.isolation = None
