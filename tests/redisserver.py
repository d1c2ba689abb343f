"""A real Redis server for tests (Debian's redis-server), on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from . import servers


def find_redis() -> str | None:
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")


@contextlib.asynccontextmanager
async def running(directory: Path) -> AsyncIterator[str]:
    """Start redis-server (no persistence) and yield its URL; skip the test without one."""
    binary = find_redis()
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    port = servers.free_port()
    proc = await asyncio.create_subprocess_exec(
        *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
        *("--appendonly", "no", "--dir", str(directory)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        try:
            async with asyncio.timeout(10):
                while True:
                    assert proc.returncode is None, "redis-server exited at start-up"
                    try:
                        await client.ping()
                        break
                    except (OSError, redis.ConnectionError):
                        await asyncio.sleep(0.02)
        finally:
            await client.aclose()
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()
