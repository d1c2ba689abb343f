"""Session processes never outlive the server: killed, terminated or shut down cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp

from . import servers
from .conftest import MakeClient, execute

SPAWN_PIDS = (
    "import os, subprocess\n"
    "sleeper = subprocess.Popen(['sleep', '60'])\n"
    "print(os.getpid(), sleeper.pid)"
)


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if not servers.pid_gone(pid):
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class Server:
    def __init__(self, proc: asyncio.subprocess.Process, base: str) -> None:
        self.proc = proc
        self.base = base
        self.http = aiohttp.ClientSession()

    async def execute(self, sid: str, code: str) -> dict[str, Any]:
        async with self.http.post(f"{self.base}/execute/{sid}", json={"code": code}) as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
            return body

    async def session_pids(self, sid: str) -> tuple[int, int]:
        body = await self.execute(sid, SPAWN_PIDS)
        child, grandchild = (int(x) for x in body["output"].split())
        assert not servers.pid_gone(child) and not servers.pid_gone(grandchild)
        return child, grandchild


@asynccontextmanager
async def server_process() -> AsyncIterator[Server]:
    """`python -m replserver` on a free port, in its own process group, ready to serve."""
    replica = await servers.start()
    server = Server(replica.proc, replica.base)
    try:
        await replica.wait_ready(15)
        yield server
    finally:
        await server.http.close()
        await replica.kill()


async def test_sigkill_of_server_ends_children_and_grandchildren() -> None:
    pids: list[int] = []
    try:
        async with server_process() as server:
            pids += await server.session_pids("one")
            pids += await server.session_pids("two")
            server.proc.kill()  # SIGKILL: no cleanup code of the server runs
            async with asyncio.timeout(5):
                await server.proc.wait()
            alive = await servers.wait_gone(pids)
            assert alive == [], f"still running after the server was killed: {alive}"
    finally:
        kill_leftovers(pids)


async def test_sigkill_of_server_ends_busy_child() -> None:
    pids: list[int] = []
    try:
        async with server_process() as server:
            pids += await server.session_pids("busy")
            url = f"{server.base}/execute-stream/busy"
            resp = await server.http.post(url, json={"code": "import time\ntime.sleep(60)"})
            assert resp.status == 200
            server.proc.kill()
            async with asyncio.timeout(5):
                await server.proc.wait()
            resp.close()
            alive = await servers.wait_gone(pids)
            assert alive == [], f"still running after the server was killed: {alive}"
    finally:
        kill_leftovers(pids)


async def test_sigterm_shuts_down_gracefully() -> None:
    pids: list[int] = []
    try:
        async with server_process() as server:
            pids += await server.session_pids("idle")
            pids += await server.session_pids("busy")
            url = f"{server.base}/execute-stream/busy"
            resp = await server.http.post(url, json={"code": "import time\ntime.sleep(60)"})
            assert resp.status == 200
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                with suppress(aiohttp.ClientError):
                    await resp.read()  # the running stream ends instead of holding shutdown up
                await server.proc.wait()
            elapsed = time.monotonic() - start
            resp.close()
            assert elapsed < 5
            assert server.proc.returncode == 0
            alive = await servers.wait_gone(pids)
            assert alive == [], f"still running after the server stopped: {alive}"
    finally:
        kill_leftovers(pids)


# Pickling `slow` takes 1.5 s: a shutdown's save of this session is under way that long.
SLOW_TO_SAVE = (
    "import time\n"
    "class Slow:\n"
    "    def __reduce__(self):\n"
    "        time.sleep(1.5)\n"
    "        return (int, (7,))\n"
    "slow = Slow()\n"
    "value = 42"
)


async def test_a_second_sigterm_does_not_cut_the_shutdown_short(tmp_path: Path) -> None:
    """A SIGTERM during the shutdown is ignored: the shutdown's snapshot save finishes.
    (aiohttp's own handler cancelled every task on a second signal: the save was lost, and
    a child start caught in it kept the server from ever exiting.)"""
    env: dict[str, Any] = {
        "REPL_SNAPSHOT_STORE": str(tmp_path / "store"),
        "REPL_SNAPSHOT_IDLE_S": "3600",  # only the shutdown saves
        "REPL_REPLICA_ID": "one",
        "REPL_LOG_LEVEL": "info",  # the shutdown's start, and the second signal, are logged
    }
    log = tmp_path / "server.log"
    first = await servers.start(log=log, **env)
    try:
        await first.wait_ready()
        url, code = f"{first.base}/execute/kept", {"code": SLOW_TO_SAVE}
        async with aiohttp.ClientSession() as http, http.post(url, json=code) as r:
            assert r.status == 200
            assert (await r.json())["error"] is None
        first.proc.send_signal(signal.SIGTERM)
        # Its log says the shutdown began; the save takes 1.5 s from then. (Not "the port
        # refuses": a connection accepted just before the listener closed hangs until the
        # shutdown ends.)
        async with asyncio.timeout(10):
            while "SIGTERM: shutting down" not in log.read_text():
                await asyncio.sleep(0.01)
        first.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.proc.wait(), 20) == 0, first.log_tail()
        assert "SIGTERM while shutting down: ignored" in log.read_text()
    finally:
        await first.kill()
    second = await servers.start(log=log, **env)
    try:
        await second.wait_ready()
        async with aiohttp.ClientSession() as http:
            code = {"code": "print(value, slow)"}
            async with http.post(f"{second.base}/execute/kept", json=code) as r:
                body = await r.json()
        assert body["output"] == "42 7\n", (body, second.log_tail())
        assert body["restored"]["reason"] == "shutdown", body
    finally:
        await second.stop()
        await second.kill()


async def test_app_cleanup_ends_children(make_client: MakeClient) -> None:
    client = await make_client()
    pids: list[int] = []
    try:
        for sid in ("a", "b"):
            body = await execute(client, sid, SPAWN_PIDS)
            pids += [int(x) for x in body["output"].split()]
        assert all(not servers.pid_gone(pid) for pid in pids)
        async with asyncio.timeout(10):
            await client.close()
        alive = await servers.wait_gone(pids)
        assert alive == [], f"still running after app cleanup: {alive}"
    finally:
        kill_leftovers(pids)


async def test_reset_ends_grandchildren(make_client: MakeClient) -> None:
    client = await make_client()
    pids: list[int] = []
    try:
        body = await execute(client, "reset", SPAWN_PIDS)
        pids += [int(x) for x in body["output"].split()]
        async with asyncio.timeout(10):
            resp = await client.post("/reset/reset")
        assert resp.status == 200
        alive = await servers.wait_gone(pids)
        assert alive == [], f"still running after reset: {alive}"
        after = await execute(client, "reset", "import os\nprint(os.getpid())")
        assert int(after["output"]) not in pids
    finally:
        kill_leftovers(pids)


async def test_sigterm_tells_a_running_execution_why_it_ended() -> None:
    async with server_process() as server:
        url = f"{server.base}/execute/busy"
        reply = asyncio.ensure_future(
            server.http.post(url, json={"code": "import time\ntime.sleep(60)"})
        )
        # Until the code has been sent to the child (a deadline, not a nap).
        async with asyncio.timeout(10):
            while True:
                async with server.http.get(f"{server.base}/sessions/busy") as info:
                    if info.status == 200 and (await info.json())["executionCount"] == 1:
                        break
                await asyncio.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            resp = await reply
            body = await resp.json()
            await server.proc.wait()
        assert resp.status == 200
        assert "ended: the server is shutting down" in body["error"], body
        assert body["namespaceSurvived"] is False and body["returnCode"] == 1
