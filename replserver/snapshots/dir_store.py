"""Snapshots as files in a 0700 directory: one server (or several on one host) keeps
sessions across culling, eviction and restarts with no set-up."""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import time
from pathlib import Path

from . import StoreError

KEY_FILE = "key"
SUFFIX = ".snapshot"
TEMP_MAX_AGE_S = 3600.0  # a temporary file this old was left by a crash mid-write


class DirStore:
    """A file per session id; written to a temporary name, synced, then renamed over."""

    def __init__(self, directory: Path, ttl_s: float) -> None:
        self.directory = directory
        self.ttl_s = ttl_s
        self.description = f"directory {directory}"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)

    def __repr__(self) -> str:
        return f"<DirStore {self.directory}>"

    def key(self) -> bytes:
        """The directory's HMAC key: made once (0600), kept beside the snapshots."""
        path = self.directory / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) < 32:
                message = f"{path} holds a key of {len(key)} bytes; 32 or more needed"
                raise StoreError(message) from None
            return key
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        return path.read_bytes()

    def _path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}{SUFFIX}"  # ids are [A-Za-z0-9_-]{1,128}

    async def put(self, session_id: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, self._path(session_id), data)

    def _write(self, path: Path, data: bytes) -> None:
        fd, temp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise

    async def get(self, session_id: str) -> bytes | None:
        path = self._path(session_id)
        # Most new sessions have no snapshot: one stat (microseconds) answers that on the
        # loop, where a thread hop would add a wake-up to every new session's first reply.
        if not path.exists():
            return None
        return await asyncio.to_thread(self._read, path)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    async def delete(self, session_id: str) -> None:
        self._path(session_id).unlink(missing_ok=True)

    async def sweep(self) -> int:
        """Remove snapshots past their lifetime and temporary files left by a crash."""
        return await asyncio.to_thread(self._sweep)

    def _sweep(self) -> int:
        now = time.time()
        removed = 0
        for entry in os.scandir(self.directory):
            if entry.name.endswith(SUFFIX):
                deadline = now - self.ttl_s
            elif entry.name.startswith(".tmp-"):
                deadline = now - TEMP_MAX_AGE_S
            else:
                continue
            try:
                if entry.stat().st_mtime < deadline:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass  # replaced or deleted meanwhile
        return removed

    async def close(self) -> None:
        pass
