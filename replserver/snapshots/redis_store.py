"""Snapshots in Redis, for many replicas: any replica restores a session another one saved.

redis-py's asyncio client; a snapshot is one string value, written with SET (atomic) and
an expiry of REPL_SNAPSHOT_TTL_S, so an abandoned session's state goes by itself.
"""

from __future__ import annotations

import redis.asyncio as redis
from redis.exceptions import RedisError

from . import StoreError

PREFIX = "replserver:snapshot:"
CONNECT_TIMEOUT_S = 2.0
IO_TIMEOUT_S = 10.0  # a 64 MiB value must have time to travel


class RedisStore:
    """A key per session id, expiring after the snapshot lifetime."""

    def __init__(self, url: str, *, ttl_s: float) -> None:
        # Bounded waits: an unreachable store costs a request at most a few seconds (its
        # session starts fresh), never a hang.
        self._client = redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=IO_TIMEOUT_S
        )
        self._ttl_ms = int(ttl_s * 1000)
        host = url.split("@")[-1]  # never log a password
        self.description = f"redis {host}"

    def __repr__(self) -> str:
        return f"<RedisStore {self.description}>"

    async def put(self, session_id: str, data: bytes) -> None:
        try:
            await self._client.set(PREFIX + session_id, data, px=self._ttl_ms)
        except RedisError as exc:
            raise StoreError(f"{self.description}: {exc}") from exc

    async def get(self, session_id: str) -> bytes | None:
        try:
            value = await self._client.get(PREFIX + session_id)
        except RedisError as exc:
            raise StoreError(f"{self.description}: {exc}") from exc
        return value if isinstance(value, bytes) else None

    async def delete(self, session_id: str) -> None:
        try:
            await self._client.delete(PREFIX + session_id)
        except RedisError as exc:
            raise StoreError(f"{self.description}: {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose()
