"""The warm pool with real children: refilling, growing, shrinking, closing without leaks."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from replserver.child import ChildProcess
from replserver.errors import ShuttingDown
from replserver.isolation import Isolation
from replserver.pool import ChildPool

from . import servers
from .conftest import MakeClient, execute
from .conftest import test_settings as settings_for

DEADLINE_S = 30.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` against a deadline (state, not speed: no timing is asserted)."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S} s: {what}")
        await asyncio.sleep(0.01)


def live_children() -> set[int]:
    """Pids of the session children of this process that have not exited (zombies
    excluded): its own children, or its fork server's."""
    mine = set(servers.live_children(os.getpid()))
    # (A forked child keeps its fork server's command line: only ours are asked.)
    forks = {pid for pid in mine if b"forkserver" in command_line(pid)}
    return (mine - forks).union(*(servers.live_children(pid) for pid in forks))


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    return pid in live_children()


@pytest.fixture
async def isolation() -> AsyncIterator[Isolation]:
    iso = Isolation(settings_for())
    yield iso
    await iso.close()


async def test_pool_refills_after_an_acquire(isolation: Isolation) -> None:
    pool = ChildPool(settings_for(pool_size=2), isolation=isolation)
    pool.start()
    try:
        await until(lambda: pool.warm == 2, "the reserve filled")
        child = await pool.acquire()
        assert child.alive and pool.hits == 1 and pool.misses == 0
        await until(lambda: pool.warm == 2 and pool.starting == 0, "the reserve refilled")
        assert pool.spawned == 3
        assert pool.target == 2  # a hit is no reason to grow
        pool.discard(child)
    finally:
        await pool.close()


async def test_pool_grows_under_a_burst_up_to_max_and_not_beyond(isolation: Isolation) -> None:
    pool = ChildPool(settings_for(pool_size=1, pool_max=3), isolation=isolation)
    pool.start()
    children: list[ChildProcess] = []
    try:
        await until(lambda: pool.warm == 1, "the reserve filled")
        most_warm = 0

        async def watch() -> None:
            nonlocal most_warm
            while True:
                most_warm = max(most_warm, pool.warm)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        children = list(await asyncio.gather(*(pool.acquire() for _ in range(10))))
        assert len({c.pid for c in children}) == 10 and all(c.alive for c in children)
        assert pool.misses == 9 and pool.target == 3
        await until(lambda: pool.warm == 3 and pool.starting == 0, "the reserve grew to max")
        # A second burst: the grown reserve serves three at once, and it stays at max.
        children += await asyncio.gather(*(pool.acquire() for _ in range(10)))
        await until(lambda: pool.warm == 3 and pool.starting == 0, "the reserve refilled")
        watcher.cancel()
        assert most_warm <= 3
        assert pool.hits >= 1 + 3
        # Every child started is either handed out or in the reserve: none went missing.
        assert pool.spawned == len(children) + pool.warm
    finally:
        for child in children:
            pool.discard(child)
        await pool.close()


async def test_pool_shrinks_back_to_size_after_idle(isolation: Isolation) -> None:
    pool = ChildPool(settings_for(pool_size=1, pool_max=4), isolation=isolation, idle_shrink_s=1.0)
    others = live_children()  # children of earlier tests in this process, if any
    pool.start()
    children: list[ChildProcess] = []
    try:
        await until(lambda: pool.warm == 1, "the reserve filled")
        children = list(await asyncio.gather(*(pool.acquire() for _ in range(6))))
        await until(lambda: pool.warm > 1, "the reserve grew")
        before = live_children()
        await until(
            lambda: pool.target == 1 and pool.warm == 1 and pool.starting == 0,
            "the reserve shrank back to REPL_POOL_SIZE",
        )
        # The surplus children were ended, not just forgotten: of the reserve seen grown,
        # one child is left.
        reserve = before - others - {c.pid for c in children}
        assert len(reserve) > 1
        await until(lambda: len(reserve & live_children()) == 1, "the surplus children ended")
    finally:
        for child in children:
            pool.discard(child)
        await pool.close()


@pytest.mark.parametrize("started", [False, True])
async def test_pool_of_size_zero_or_not_started_starts_children_only_on_demand(
    isolation: Isolation, started: bool
) -> None:
    pool = ChildPool(settings_for(pool_size=0, pool_max=4), isolation=isolation)
    if started:
        pool.start()
    try:
        child = await pool.acquire()
        assert child.alive and pool.spawned == 1 and pool.misses == 1
        # Nothing started after it: no reserve, and no growth of one.
        assert pool.warm == 0 and pool.starting == 0 and pool.target == 0
        pool.discard(child)
    finally:
        await pool.close()


async def test_pool_close_leaves_no_children(isolation: Isolation) -> None:
    before = live_children()
    pool = ChildPool(settings_for(pool_size=2, pool_max=4), isolation=isolation)
    pool.start()
    await until(lambda: pool.warm == 2, "the reserve filled")
    handed_out = await pool.acquire()
    # Close with starts in flight, requests waiting and one waiter cancelled midway.
    waiting = [asyncio.create_task(pool.acquire()) for _ in range(4)]
    cancelled = asyncio.create_task(pool.acquire())
    await until(lambda: pool.starting > 0, "starts in flight")
    cancelled.cancel()
    pool.discard(handed_out)
    await pool.close()
    results = await asyncio.gather(*waiting, cancelled, return_exceptions=True)
    for result in results:
        if isinstance(result, ChildProcess):
            await result.end()  # a waiter served before the close: its caller ends it
        else:
            assert isinstance(result, (ShuttingDown, asyncio.CancelledError)), result
    assert not alive(handed_out.pid)
    assert live_children() - before == set()
    with pytest.raises(ShuttingDown):
        await pool.acquire()


async def test_a_burst_of_new_sessions_all_get_answers(make_client: MakeClient) -> None:
    client = await make_client(pool_size=1, pool_max=4)
    n = 24
    replies = await asyncio.gather(
        *(execute(client, f"burst-{i}", f"print({i} * 2)") for i in range(n))
    )
    assert [r["output"] for r in replies] == [f"{i * 2}\n" for i in range(n)]
    assert all(r["error"] is None for r in replies)


async def test_forked_starts_run_two_per_core_and_exec_starts_one(isolation: Isolation) -> None:
    cores = len(os.sched_getaffinity(0))
    forked = ChildPool(settings_for(pool_size=0), isolation=isolation)
    assert isolation.forks_children and forked.parallel == 2 * cores
    execd_isolation = Isolation(settings_for(fork_server=False))
    try:
        assert not execd_isolation.forks_children
        assert ChildPool(settings_for(), isolation=execd_isolation).parallel == cores
    finally:
        await execd_isolation.close()
    # Never more starts in flight than that, however many requests wait.
    seen: list[int] = []
    waiters = [asyncio.create_task(forked.acquire()) for _ in range(3 * forked.parallel)]
    async with asyncio.timeout(DEADLINE_S):
        while not all(w.done() for w in waiters):
            seen.append(forked.starting)
            await asyncio.sleep(0.001)
    children = [w.result() for w in waiters]
    try:
        assert max(seen) == forked.parallel, seen
    finally:
        for child in children:
            forked.discard(child, 0)
        await forked.close()
