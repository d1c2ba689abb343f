"""All sessions of this server: look up or create, reset, close."""

from __future__ import annotations

import asyncio
import logging

from .cgroup import CgroupTree
from .errors import ShuttingDown
from .session import Session
from .settings import Settings

log = logging.getLogger(__name__)


class SessionManager:
    """Owns every Session; the only place sessions are created or forgotten."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.cgroups = CgroupTree.create() if settings.cgroups == "auto" else None
        self._sessions: dict[str, Session] = {}
        self._closing = False

    def __repr__(self) -> str:
        return f"<SessionManager sessions={len(self._sessions)} closing={self._closing}>"

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session:
        """The session with this id, created on first use."""
        session = self._sessions.get(session_id)
        if session is None:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            session = Session(session_id, settings=self._settings, cgroups=self.cgroups)
            self._sessions[session_id] = session
        return session

    def find(self, session_id: str) -> Session | None:
        """The session with this id if it exists; never creates one."""
        return self._sessions.get(session_id)

    async def reset(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            await session.reset()

    async def close_all(self) -> None:
        """End every session and its process group (server shutdown)."""
        self._closing = True
        sessions = list(self._sessions.values())
        self._sessions.clear()
        results = await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, BaseException):
                log.error("closing session %s failed: %r", session.id, result)
        if self.cgroups is not None:
            await self.cgroups.remove()
            self.cgroups = None
