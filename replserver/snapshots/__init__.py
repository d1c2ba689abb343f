"""Sessions that outlive their process: saved namespaces, where they are kept, and when.

The stores are strategies side by side, behind one small protocol: a directory on this
host (dir_store.py, the default) and Redis for many replicas (redis_store.py). keeper.py
decides when a session is saved and restored; transfer.py moves the bytes to and from the
child; envelope.py authenticates them. The child's side is replchild/snapshot.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

from ..settings import Settings

log = logging.getLogger(__name__)


class Store(Protocol):
    """Where sealed snapshots live, by session id. Writes are atomic: a reader sees the
    whole previous value or the whole new one."""

    description: str

    async def put(self, session_id: str, data: bytes) -> None: ...

    async def get(self, session_id: str) -> bytes | None: ...

    async def delete(self, session_id: str) -> None: ...

    async def close(self) -> None: ...


class StoreError(RuntimeError):
    """The store could not be opened, reached or written (at start-up: the server exits)."""


def default_directory() -> Path:
    """$XDG_STATE_HOME/replserver/snapshots (~/.local/state/... when that is unset)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "replserver" / "snapshots"


def open_store(settings: Settings) -> tuple[Store, bytes] | None:
    """The configured store and the HMAC key; None when snapshots are off."""
    where = settings.snapshot_store.strip()
    if where == "off":
        return None
    if where.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisStore

        return RedisStore(where, ttl_s=settings.snapshot_ttl_s), settings.snapshot_key.encode()
    from .dir_store import DirStore

    try:
        store = DirStore(Path(where) if where else default_directory(), settings.snapshot_ttl_s)
        key = settings.snapshot_key.encode() or store.key()
    except (OSError, StoreError) as exc:
        if where:
            raise StoreError(f"REPL_SNAPSHOT_STORE={where}: {exc}") from exc
        # The default place is unusable (a read-only home in a container, say): serve
        # without snapshots rather than not at all, and say so.
        log.warning("snapshots are off: %s (set REPL_SNAPSHOT_STORE)", exc)
        return None
    return store, key


NOTICE_NAMES = 5  # names listed in a protocol-1 notice; the rest are counted


def restore_notice(restored: dict[str, Any]) -> str | None:
    """The one `error` line a protocol-1 stream gets after a restore: what was not
    restored; None when everything was (a full restore is not news to such a client)."""
    skipped = list(restored.get("skipped", {}))
    if not skipped:
        return None
    listed = ", ".join(skipped[:NOTICE_NAMES])
    more = len(skipped) - NOTICE_NAMES
    if more > 0:
        listed += f" and {more} more"
    return f"[session restored ({restored.get('reason')}); not restored: {listed}]\n"
