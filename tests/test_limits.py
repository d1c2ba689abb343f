"""Execution control: timeouts, interrupts, crashes, resource limits, bounded output.

Every hostile case runs under the limits it tests (small timeouts and caps, a pids cgroup
for the fork bomb) and inside the per-test timeout, so a failure cannot take the machine
down. After each, the server, a bystander session and the session itself must answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from replserver.routes import ISOLATION

from . import servers
from .conftest import Client, MakeClient, execute, parse_sse

GUARDS: dict[str, Any] = {
    "timeout_s": 5.0,
    "interrupt_grace_s": 1.0,
    "limit_memory_bytes": 512 * 1024 * 1024,
    "max_output_bytes": 1024 * 1024,
    "limit_processes": 64,
}


@pytest.fixture
async def guarded(make_client: MakeClient) -> Client:
    return await make_client(**GUARDS)


async def run(client: Client, sid: str, code: str, **fields: Any) -> dict[str, Any]:
    resp = await client.post(f"/execute/{sid}", json={"code": code, **fields})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def assert_all_well(client: Client, sid: str, *, survived: bool) -> None:
    """The server, a bystander session and this session all answer; state as expected."""
    assert (await client.get("/health")).status == 200
    bystander = await execute(client, "bystander", "print('fine')")
    assert bystander["output"] == "fine\n"
    after = await execute(client, sid, "print(globals().get('marker', 'fresh'))")
    assert after["output"] == ("kept\n" if survived else "fresh\n"), after
    assert after["restarted"] is not survived


async def test_infinite_loop_times_out_and_keeps_namespace(guarded: Client) -> None:
    await execute(guarded, "loop", "marker = 'kept'")
    started = time.monotonic()
    reply = await run(guarded, "loop", "while True:\n    pass", timeout=1)
    assert time.monotonic() - started < 4
    assert reply["returnCode"] == 1 and reply["reason"] == "timeout"
    assert "Execution timed out after 1 s." in reply["error"]
    assert "KeyboardInterrupt" in reply["error"] and "runner_child" not in reply["error"]
    assert reply["namespaceSurvived"] is True
    await assert_all_well(guarded, "loop", survived=True)


async def test_sleep_is_interrupted_by_the_default_timeout(make_client: MakeClient) -> None:
    client = await make_client(**{**GUARDS, "timeout_s": 1.0})
    await execute(client, "sleepy", "marker = 'kept'")
    reply = await run(client, "sleepy", "import time\ntime.sleep(10**6)")
    assert reply["reason"] == "timeout" and "timed out after 1 s" in reply["error"]
    await assert_all_well(client, "sleepy", survived=True)


async def test_ignored_sigint_escalates_to_a_restart(guarded: Client) -> None:
    await execute(guarded, "stubborn", "marker = 'kept'")
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    started = time.monotonic()
    reply = await run(guarded, "stubborn", code, timeout=0.5)
    assert time.monotonic() - started < 5
    assert reply["reason"] == "timeout" and reply["namespaceSurvived"] is False
    assert "did not stop within 1 s" in reply["error"]
    assert "earlier state was lost" in reply["error"]
    await assert_all_well(guarded, "stubborn", survived=False)


async def test_timeout_field_is_validated(guarded: Client) -> None:
    await execute(guarded, "tv", "marker = 'kept'")
    for bad in ("1", 0, -1, True, 301, [1]):
        resp = await guarded.post("/execute/tv", json={"code": "1", "timeout": bad})
        assert resp.status == 400, bad
        assert "timeout" in (await resp.json())["detail"]
    ok = await run(guarded, "tv", "print(marker)", timeout=2.5)
    assert ok["output"] == "kept\n"


async def test_memory_bomb_gets_memory_error(guarded: Client) -> None:
    await execute(guarded, "mem", "marker = 'kept'")
    reply = await run(guarded, "mem", "hog = bytearray(2 * 1024**3)")
    assert "MemoryError" in reply["error"] and reply["reason"] == "memory"
    gradual = await run(guarded, "mem", "hog = []\nwhile True:\n    hog.append(' ' * 10**6)")
    assert "MemoryError" in gradual["error"] and gradual["reason"] == "memory"
    await execute(guarded, "mem", "del hog")
    await assert_all_well(guarded, "mem", survived=True)


async def test_os_exit_is_reported_and_the_next_request_restarts(guarded: Client) -> None:
    await execute(guarded, "crash", "marker = 'kept'")
    reply = await run(guarded, "crash", "import os\nos._exit(3)")
    assert reply["returnCode"] == 1 and reply["reason"] == "crashed"
    assert "exited with code 3" in reply["error"]
    await assert_all_well(guarded, "crash", survived=False)


async def test_segfault_is_reported_and_streams_say_restart(guarded: Client) -> None:
    await execute(guarded, "segv", "marker = 'kept'")
    reply = await run(guarded, "segv", "import ctypes\nctypes.string_at(0)")
    assert "SIGSEGV" in reply["error"] and reply["reason"] == "crashed"
    body = {"code": "print('again')", "protocol": 2}
    resp = await guarded.post("/execute-stream/segv", json=body)
    events = parse_sse(await resp.text())
    assert events[0]["type"] == "restart" and "SIGSEGV" in events[0]["reason"]
    assert events[-1]["type"] == "complete" and events[-1]["restarted"] is True
    assert (await execute(guarded, "bystander", "print(1)"))["output"] == "1\n"


async def test_deep_recursion(guarded: Client) -> None:
    await execute(guarded, "deep", "marker = 'kept'")
    plain = await run(guarded, "deep", "def f():\n    return f()\nf()")
    assert "RecursionError" in plain["error"] and plain["reason"] == "exception"
    await assert_all_well(guarded, "deep", survived=True)
    # With the guard lifted, C recursion (repr of a deep list) overflows the C stack: a
    # crash, recovered from.
    code = (
        "import sys\nsys.setrecursionlimit(10**7)\n"
        "nest = []\nfor _ in range(10**6):\n    nest = [nest]\nrepr(nest)"
    )
    crashed = await run(guarded, "deep", code)
    assert crashed["returnCode"] == 1 and crashed["reason"] == "crashed"
    assert "SIGSEGV" in crashed["error"]
    assert (await execute(guarded, "deep", "print('up')"))["output"] == "up\n"


async def test_closing_std_fds_does_not_break_the_session(guarded: Client) -> None:
    await execute(guarded, "fds", "marker = 'kept'")
    await run(guarded, "fds", "import os\nos.close(0)\nos.close(1)\nos.close(2)")
    after = await execute(guarded, "fds", "import os\nprint('out')\nos.write(2, b'err')")
    assert after["output"] == "out\n" and after["error"] == "err"
    await assert_all_well(guarded, "fds", survived=True)


async def test_thread_output_after_completion_is_dropped(guarded: Client) -> None:
    code = (
        "import os, threading, time\n"
        "def late():\n"
        "    while not os.path.exists('go'):\n"
        "        time.sleep(0.01)\n"
        "    print('late', flush=True)\n"
        "    open('printed', 'w').close()\n"
        "threading.Thread(target=late, daemon=True).start()\n"
        "marker = 'kept'\n"
        "print(os.getcwd())"
    )
    first = await execute(guarded, "stray", code)
    home = Path(first["output"].strip())
    # The thread prints only once this execution is over and nothing runs in the session.
    (home / "go").touch()
    async with asyncio.timeout(5):
        while not (home / "printed").exists():
            await asyncio.sleep(0.01)  # polling against the deadline above
    second = await execute(guarded, "stray", "print('next')")
    assert second["output"] == "next\n"
    await assert_all_well(guarded, "stray", survived=True)


@pytest.fixture
async def server() -> AsyncIterator[servers.Replica]:
    """A real `python -m replserver` under the guards: its memory is its own, not pytest's."""
    replica = await servers.start(
        REPL_TIMEOUT_S=str(GUARDS["timeout_s"]),
        REPL_INTERRUPT_GRACE_S=str(GUARDS["interrupt_grace_s"]),
        REPL_LIMIT_MEMORY_BYTES=str(GUARDS["limit_memory_bytes"]),
        REPL_MAX_OUTPUT_BYTES=str(GUARDS["max_output_bytes"]),
        REPL_LIMIT_PROCESSES=str(GUARDS["limit_processes"]),
    )
    try:
        await replica.wait_ready()
        yield replica
    finally:
        await replica.kill()


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident size so far (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def reset_peak_rss(pid: int) -> float:
    """Start the peak over from the current size (clear_refs 5) where the kernel lets us;
    the peak to measure from, in MiB."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss_mib(pid)


async def post(http: aiohttp.ClientSession, url: str, code: str, **fields: Any) -> Any:
    async with http.post(url, json={"code": code, **fields}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_output_flood_is_capped_and_server_memory_bounded(server: servers.Replica) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{server.base}/execute/flood"
        await post(http, url, "marker = 'kept'")  # the session and its child exist
        before = reset_peak_rss(server.proc.pid)
        code = "while True:\n    print('x' * 1000)"
        reply = await post(http, url, code, timeout=2)
        assert reply["truncated"] is True and reply["reason"] == "timeout"
        assert len(reply["output"]) <= GUARDS["max_output_bytes"]
        assert "[output truncated" in reply["error"]
        stream_url = f"{server.base}/execute-stream/flood"
        async with http.post(stream_url, json={"code": code, "timeout": 2}) as resp:
            events = parse_sse(await resp.text())
        streamed = sum(len(e["content"]) for e in events if e["type"] == "output")
        assert streamed <= GUARDS["max_output_bytes"]
        assert any("[output truncated" in e.get("content", "") for e in events)
        assert events[-1]["type"] == "complete" and events[-1]["truncated"] is True
        grown_mib = peak_rss_mib(server.proc.pid) - before
        assert grown_mib < 64, f"the server's peak grew by {grown_mib:.0f} MiB"
        after = await post(http, url, "print(marker)")
        assert after["output"] == "kept\n"


async def test_stream_flood_with_a_stalled_client_keeps_memory_bounded(
    server: servers.Replica,
) -> None:
    async with aiohttp.ClientSession() as http:
        await post(http, f"{server.base}/execute/warm", "print(1)")
        before = reset_peak_rss(server.proc.pid)
        code = "while True:\n    print('y' * 1000)"
        url = f"{server.base}/execute-stream/stall"
        resp = await http.post(url, json={"code": code, "timeout": 2})
        await resp.content.read(100)  # then stop reading: backpressure must hold the child
        # Stalled until the execution has ended by its timeout: the session's next request
        # runs only then (requests of a session run one at a time).
        async with asyncio.timeout(15):
            after = await post(http, f"{server.base}/execute/stall", "print('ok')")
        grown_mib = peak_rss_mib(server.proc.pid) - before
        resp.close()
    assert after["output"] == "ok\n"
    assert grown_mib < 64, f"the server's peak grew by {grown_mib:.0f} MiB"


async def test_interrupt_route(guarded: Client) -> None:
    idle = await guarded.post("/interrupt/intr")
    assert idle.status == 200 and (await idle.json()) == {"sessionId": "intr", "interrupted": False}
    await execute(guarded, "intr", "marker = 'kept'")
    code = "import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.01)"
    resp = await guarded.post("/execute-stream/intr", json={"code": code})
    async with asyncio.timeout(5):
        while b"started" not in await resp.content.readline():
            pass
    queued = asyncio.create_task(run(guarded, "intr", "print('queued ran')"))
    async with asyncio.timeout(5):
        while (await (await guarded.get("/sessions/intr")).json())["queued"] < 1:
            await asyncio.sleep(0.01)  # polling against the deadline above
    stop = await guarded.post("/interrupt/intr")
    assert (await stop.json())["interrupted"] is True
    events = parse_sse(await resp.text())
    assert events[-1]["reason"] == "interrupted" and events[-1]["returnCode"] == 1
    assert any("KeyboardInterrupt" in e.get("content", "") for e in events)
    assert (await queued)["output"] == "queued ran\n"
    bad = await guarded.post("/interrupt/bad.id")
    assert bad.status == 400
    await assert_all_well(guarded, "intr", survived=True)


async def test_rlimits_are_in_place(guarded: Client) -> None:
    code = (
        "import resource\n"
        "print(resource.getrlimit(resource.RLIMIT_AS)[0],"
        " resource.getrlimit(resource.RLIMIT_NOFILE)[0],"
        " resource.getrlimit(resource.RLIMIT_CPU)[0],"
        " resource.getrlimit(resource.RLIMIT_NPROC)[0])"
    )
    reply = await execute(guarded, "rl", code)
    assert reply["output"].split() == [str(512 * 1024 * 1024), "1024", "3600", "64"]


async def test_reset_kills_the_whole_process_group(guarded: Client) -> None:
    code = "import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid)"
    pid = int((await execute(guarded, "grp", code))["output"])
    assert not servers.pid_gone(pid)
    assert (await guarded.post("/reset/grp")).status == 200
    assert not await servers.wait_gone([pid])


async def test_reset_kills_what_escaped_the_group_through_the_cgroup(guarded: Client) -> None:
    if guarded.app[ISOLATION].cgroups is None:
        pytest.skip("no pids cgroup here: a setsid descendant is out of the server's reach")
    code = "import subprocess\nq = subprocess.Popen(['setsid', 'sleep', '60'])\nprint(q.pid)"
    pid = int((await execute(guarded, "esc", code))["output"])
    assert not servers.pid_gone(pid)
    assert (await guarded.post("/reset/esc")).status == 200
    # Escaped its process group with setsid, but not its cgroup.
    assert not await servers.wait_gone([pid])


async def test_fork_bomb_is_bounded_by_the_pids_cgroup(make_client: MakeClient) -> None:
    # Two cores shared with 63 spinning copies: the parent may need more than a second to
    # reach its KeyboardInterrupt, so a longer grace lets it (and its state) survive.
    guarded = await make_client(**{**GUARDS, "interrupt_grace_s": 4.0})
    if guarded.app[ISOLATION].cgroups is None:
        pytest.skip("no pids cgroup can be created here: a fork bomb as root would be unbounded")
    await execute(guarded, "bomb", "marker = 'kept'")
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    started = time.monotonic()
    reply = await run(guarded, "bomb", code, timeout=2)
    assert time.monotonic() - started < 10
    assert reply["reason"] == "timeout" and reply["namespaceSurvived"] is True
    await assert_all_well(guarded, "bomb", survived=True)
    # The stopped loop's copies are gone and the session can start processes again.
    after = await execute(
        guarded, "bomb", "import subprocess\nprint(subprocess.run(['true']).returncode)"
    )
    assert after["output"] == "0\n"


async def test_completion_metadata(guarded: Client) -> None:
    reply = await execute(guarded, "meta", "print(1)")
    assert reply["returnCode"] == 0 and reply["executionCount"] == 1
    assert isinstance(reply["durationMs"], float) and reply["durationMs"] >= 0
    resp = await guarded.post("/execute-stream/meta", json={"code": "1/0"})
    complete = parse_sse(await resp.text())[-1]
    assert complete["type"] == "complete"
    assert complete["returnCode"] == 1 and complete["executionCount"] == 2
    assert complete["reason"] == "exception" and complete["durationMs"] >= 0


def test_stale_cgroup_trees_of_dead_servers_are_removed() -> None:
    from replserver.cgroup import CgroupTree

    probe = CgroupTree.create()
    if probe is None:
        pytest.skip("no pids cgroup can be created here")
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = probe.base.parent / f"replserver-{proc.pid}-dead00"
    (stale / "child-1").mkdir(parents=True)
    fresh = CgroupTree.create()  # a new server starting up tidies its predecessors' trees
    try:
        assert fresh is not None and not stale.exists()
        assert probe.base.exists()  # a live server's tree is left alone
    finally:
        asyncio.run(probe.remove())
        if fresh is not None:
            asyncio.run(fresh.remove())
