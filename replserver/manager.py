"""All sessions of this server: look up or create, evict, reset, close."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from .errors import ShuttingDown, TooManySessions
from .isolation import Isolation
from .session import Session
from .settings import Settings

log = logging.getLogger(__name__)

_FORGOTTEN_MAX = 10_000  # ids of ended sessions remembered, to say why state was lost


class SessionManager:
    """Owns every Session; the only place sessions are created or forgotten."""

    def __init__(self, settings: Settings, isolation: Isolation | None = None) -> None:
        self._settings = settings
        self.isolation = isolation
        # Least recently used first: the order eviction looks at.
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._forgotten: OrderedDict[str, str] = OrderedDict()  # id -> why it ended
        self._closing = False
        self.evicted = 0

    def __repr__(self) -> str:
        return f"<SessionManager sessions={len(self._sessions)} closing={self._closing}>"

    def __len__(self) -> int:
        return len(self._sessions)

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
            await self._evict_idle()
        session = self._sessions.get(session_id)  # created while we evicted?
        if session is None:
            session = Session(session_id, settings=self._settings, isolation=self.isolation)
            lost = self._forgotten.pop(session_id, None)
            if lost is not None:
                session.lost_state(lost)
            self._sessions[session_id] = session
        return session

    async def _evict_idle(self) -> None:
        """End the least recently used idle session, or refuse when all are busy."""
        for sid, session in self._sessions.items():
            if not session.busy:
                log.info("evicting idle session %s (cap of %d)", sid, self._settings.max_sessions)
                self.evicted += 1
                await self._drop(sid, "evicted: the server's session cap was reached")
                return
        raise TooManySessions(
            f"all {self._settings.max_sessions} sessions are busy; retry shortly",
            retry_after_s=1,
        )

    async def _drop(self, session_id: str, reason: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        self._forgotten[session_id] = reason
        while len(self._forgotten) > _FORGOTTEN_MAX:
            self._forgotten.popitem(last=False)
        await session.close(reason)

    async def reset(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            await session.reset()

    async def close_all(self) -> None:
        """End every session and its process group (server shutdown)."""
        self._closing = True
        sessions = list(self._sessions.values())
        self._sessions.clear()
        ending = (s.close("the server is shutting down") for s in sessions)
        results = await asyncio.gather(*ending, return_exceptions=True)
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, BaseException):
                log.error("closing session %s failed: %r", session.id, result)
        if self.isolation is not None:
            await self.isolation.close()
            self.isolation = None
