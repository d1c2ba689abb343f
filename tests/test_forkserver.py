"""The fork server: sessions are forked from it, confined as children started by exec are,
hold none of its descriptors, report how they ended, and outlive nothing when it dies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from replserver.child import ChildProcess, child_environment
from replserver.isolation import Isolation

from . import servers
from .conftest import MakeClient, execute
from .conftest import test_settings as settings_for_test

PARENT = "import os; print(os.getppid())"
DEADLINE_S = 20.0


def command_line(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def parent_of(client: object, sid: str) -> int:
    body = await execute(client, sid, PARENT)  # type: ignore[arg-type]
    assert body["returnCode"] == 0, body
    return int(body["output"])


async def test_sessions_are_forked_by_one_fork_server(make_client: MakeClient) -> None:
    client = await make_client()
    parents = {await parent_of(client, f"fs-{i}") for i in range(3)}
    assert len(parents) == 1, parents
    (forks,) = parents
    assert forks != os.getpid()
    assert b"forkserver" in command_line(forks)
    assert int(Path(f"/proc/{forks}/stat").read_text().rsplit(")", 1)[1].split()[1]) == (
        os.getpid()
    )


async def test_without_it_each_session_is_a_child_of_the_server(make_client: MakeClient) -> None:
    client = await make_client(fork_server=False)
    assert await parent_of(client, "exec-1") == os.getpid()


async def test_both_ways_of_starting_put_the_same_layers_in_force(
    make_client: MakeClient,
) -> None:
    forked = await make_client()
    execd = await make_client(fork_server=False)
    layers = []
    for client in (forked, execd):
        resp = await client.get("/health")
        layers.append((await resp.json())["isolation"])
    assert layers[0] == layers[1]
    if os.geteuid() == 0:
        assert layers[0]["uidSeparation"] and layers[0]["seccompMode"] == "deny-list"


FDS = """\
import json, os
seen = {}
for fd in os.listdir('/proc/self/fd'):
    try:
        seen[fd] = os.readlink(f'/proc/self/fd/{fd}')
    except OSError:
        pass
print(json.dumps(seen))
"""


async def test_a_session_holds_none_of_the_fork_servers_descriptors(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    for sid in ("fd-1", "fd-2", "fd-3"):  # later children were forked while others lived
        body = await execute(client, sid, FDS)
        fds = json.loads(body["output"])
        targets = list(fds.values())
        assert not [t for t in targets if t.startswith("socket:")], fds
        assert not [t for t in targets if "pidfd" in t], fds
        # The std descriptors, the runner's pipes and files, the listing itself: no more.
        assert len(fds) < 16, fds


async def test_how_a_child_ended_comes_from_the_fork_server(make_client: MakeClient) -> None:
    client = await make_client()
    body = await execute(client, "end-1", "import os; os._exit(7)")
    assert "exited with code 7" in body["error"], body
    body = await execute(client, "end-2", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert "killed by SIGKILL" in body["error"], body
    after = await execute(client, "end-1", "print('again')")
    assert after["output"] == "again\n" and after["restarted"], after


async def test_sessions_cannot_signal_the_fork_server(make_client: MakeClient) -> None:
    if os.geteuid() != 0:
        pytest.skip("children of a non-root server share its uid")
    client = await make_client()
    body = await execute(
        client,
        "sig-1",
        "import os\ntry:\n    os.kill(os.getppid(), 0)\nexcept PermissionError:\n"
        "    print('refused')",
    )
    assert body["output"] == "refused\n", body


async def test_a_dead_fork_server_is_replaced(make_client: MakeClient) -> None:
    client = await make_client()
    forks = await parent_of(client, "dead-1")
    body = await execute(client, "dead-1", "x = 41")
    assert body["returnCode"] == 0
    os.kill(forks, signal.SIGKILL)
    # Its children get SIGTERM (their parent-death signal) and end with their group: the
    # session's state is lost, and the next request says so.
    assert await servers.wait_gone([forks], within_s=DEADLINE_S) == []
    body = await until_it_answers(client, "dead-1", "print(x + 1)")
    assert body["restarted"] and "NameError" in body["error"], body
    # New sessions come from a new fork server.
    body = await until_it_answers(client, "dead-2", PARENT)
    again = int(body["output"])
    assert again != forks and b"forkserver" in command_line(again)


async def until_it_answers(client: object, sid: str, code: str) -> dict[str, Any]:
    """The first reply to `code` that ran it: the requests of a session whose process was
    ending when it was taken (a reserve child of the dead fork server) report that loss."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        body = await execute(client, sid, code)  # type: ignore[arg-type]
        lost = "its state was lost" in str(body["error"]) and not body["output"]
        if not lost or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.05)


async def test_starts_wait_for_room_when_the_fork_servers_socket_is_full() -> None:
    settings = settings_for_test()
    isolation = Isolation(settings)
    children: list[ChildProcess] = []
    try:
        forks = await isolation.fork_server(child_environment(settings, python=isolation.python))
        assert forks is not None
        # The smallest buffer the kernel allows: a few requests fill it, as a burst of
        # starts would fill the default one (it did at 100 at once, with EAGAIN).
        sock = forks._sock
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        starts = [ChildProcess.spawn(settings, isolation=isolation) for _ in range(12)]
        children = list(await asyncio.gather(*starts))
        assert len({child.pid for child in children}) == 12
        assert all(child.alive for child in children)
    finally:
        await asyncio.gather(*(child.end(0) for child in children))
        await isolation.close()


async def test_a_start_given_up_while_connecting_leaves_no_child() -> None:
    settings = settings_for_test()
    isolation = Isolation(settings)
    loop = asyncio.get_running_loop()
    connect = loop.connect_read_pipe
    try:
        forks = await isolation.fork_server(child_environment(settings, python=isolation.python))
        assert forks is not None and forks._process is not None
        server_pid = forks._process.pid

        async def cancelled(*args: Any, **kwargs: Any) -> Any:
            raise asyncio.CancelledError  # as if the request that wanted the child left

        descriptors = len(os.listdir("/proc/self/fd"))
        loop.connect_read_pipe = cancelled  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await ChildProcess.spawn(settings, isolation=isolation)
        loop.connect_read_pipe = connect  # type: ignore[method-assign]
        # None of its descriptors stays open here (the pipes' ends, the pidfd)...
        assert len(os.listdir("/proc/self/fd")) <= descriptors
        # ...and the child it forked ends, not left running with nobody to watch it.
        deadline = time.monotonic() + DEADLINE_S
        while servers.live_children(server_pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert servers.live_children(server_pid) == []
    finally:
        loop.connect_read_pipe = connect  # type: ignore[method-assign]
        await isolation.close()
