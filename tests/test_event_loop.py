"""Nothing blocking runs on the server's event loop while hostile code is stopped and killed.

A real `python -m replserver` runs with asyncio's debug mode (tests/slow_callbacks.py),
which logs every callback that holds the loop past a threshold. The threshold is 250 ms:
far above what this machine's noise reaches for a loop that only does its own work, and
far below what the blocking this test guards against took (the cgroup kill loop spun for
up to 2 s, /proc scans grow with the host's process count).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from replserver.cgroup import CgroupTree

from . import servers

SLOW_CALLBACK_S = float(os.environ.get("REPL_TEST_SLOW_CALLBACK_S") or 0.25)

FORK_LOOP = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
SLEEPERS_THEN_SPIN = (
    "import subprocess\n"
    "sleepers = [subprocess.Popen(['sleep', '60']) for _ in range(8)]\n"
    "while True:\n    pass"
)
IGNORES_SIGINT = (
    "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
)


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[servers.Replica]:
    server = await servers.start(
        log=tmp_path / "server.log",
        slow_callback_s=SLOW_CALLBACK_S,
        REPL_LIMIT_PROCESSES="64",
        REPL_INTERRUPT_GRACE_S="1",
        REPL_TIMEOUT_S="5",
    )
    try:
        await server.wait_ready()
        yield server
    finally:
        await server.kill()


async def run(
    http: aiohttp.ClientSession, base: str, sid: str, code: str, **fields: Any
) -> dict[str, Any]:
    async with http.post(f"{base}/execute/{sid}", json={"code": code, **fields}) as resp:
        assert resp.status == 200, await resp.text()
        reply: dict[str, Any] = await resp.json()
        return reply


@pytest.mark.timeout(120)
async def test_stops_kills_and_restarts_never_block_the_loop(replica: servers.Replica) -> None:
    base = replica.base
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for sid in ("a", "b", "c"):
            assert (await run(http, base, sid, "print(1)"))["output"] == "1\n"
        # A stop kills what the code left running: a fork loop's copies, background sleepers.
        reply = await run(http, base, "a", FORK_LOOP, timeout=1)
        assert reply["reason"] == "timeout"
        reply = await run(http, base, "b", SLEEPERS_THEN_SPIN, timeout=1)
        assert reply["reason"] == "timeout"
        # Past the grace the whole session is killed; a crash ends it too.
        reply = await run(http, base, "c", IGNORES_SIGINT, timeout=1)
        assert reply["namespaceSurvived"] is False
        reply = await run(http, base, "c", "import os\nos._exit(3)")
        assert reply["reason"] == "crashed"
        # Reset and delete end children (and their leases) on purpose.
        async with http.post(f"{base}/reset/a", json={}) as resp:
            assert resp.status == 200
        async with http.delete(f"{base}/sessions/b") as resp:
            assert resp.status == 200
        for sid in ("a", "b", "c"):
            assert (await run(http, base, sid, "print(2)"))["output"] == "2\n"
    reports = replica.slow_callbacks()
    assert not reports, "\n".join(reports)


async def test_moving_a_child_into_its_cgroup_lets_the_loop_run() -> None:
    """The kernel makes a move into a cgroup wait for an RCU grace period (6-16 ms here when
    moves are spaced out, as pool refills are): the move runs in a worker thread, and the
    loop serves other sessions meanwhile. Done on the loop, a warm session's p99 was 10 ms
    while sessions arrived, against 3.7-4.3 ms (the bench's `neighbours` scenario)."""
    tree = CgroupTree.create()
    if tree is None:
        pytest.skip("no pids cgroup can be made here")
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    try:
        cgroup = tree.new(8)
        assert cgroup is not None
        await asyncio.sleep(0)
        before = ticks
        await cgroup.add(proc.pid)
        assert ticks > before, "the loop ran nothing while the process was moved"
        assert proc.pid in cgroup.pids()
    finally:
        task.cancel()
        proc.kill()
        await proc.wait()
        await tree.remove()
