"""Attacks from user code on other sessions, the server and the network; each must fail.

The same attacks run against a server as root (children drop to a uid each) and, where the
checkout is readable by an unprivileged user, against a server running as `nobody`. Where
a layer is not available here, its test is skipped with the reason, never passed blind.
"""

from __future__ import annotations

import ast
import asyncio
import os
import platform
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from replserver.routes import ISOLATION

from . import servers
from .conftest import MakeClient, execute, wait_for_session

REPO_ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
CANARY_NAME = "REPL_TEST_CANARY"
CANARY = "canary-" + secrets.token_hex(8)

Run = Callable[[str, str], Awaitable[dict[str, Any]]]


class Target:
    """A server under attack: how to run code in a session, and what it runs as."""

    def __init__(self, run: Run, *, root: bool, layers: dict[str, Any], port: int) -> None:
        self.run = run
        self.root = root
        self.layers = layers
        self.port = port

    async def out(self, sid: str, code: str) -> str:
        reply = await self.run(sid, code)
        assert reply["returnCode"] == 0, reply
        text: str = reply["output"]
        return text

    def require(self, layer: str, why: str) -> None:
        if not self.layers.get(layer):
            pytest.skip(f"{layer} is not in force on this server: {why}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def root_target(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Target]:
    """The app in this process, as root: children drop to a uid of their own."""
    if os.geteuid() != 0:
        pytest.skip("these tests run the server as root; this test run is not root")
    # The canary sits in the server's environment (this process) while the app runs.
    monkeypatch.setenv(CANARY_NAME, CANARY)
    client = await make_client()

    async def run(sid: str, code: str) -> dict[str, Any]:
        return await execute(client, sid, code)

    layers = (await (await client.get("/health")).json())["isolation"]
    assert client.port is not None
    yield Target(run, root=True, layers=layers, port=client.port)


@asynccontextmanager
async def nobody_target() -> AsyncIterator[Target]:
    """`python -m replserver` run as the unprivileged user `nobody`."""
    if os.geteuid() != 0:
        pytest.skip("starting a server as nobody needs root")
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import replserver, runner_child",
        preexec_fn=_as_nobody,
        cwd="/",
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await probe.wait() != 0:
        pytest.skip(
            "this checkout or its venv is not readable by nobody: cannot run a server as it"
        )
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        CANARY_NAME: CANARY,
        "REPL_LOG_LEVEL": "warning",
        "PYTHONPATH": str(REPO_ROOT),
        # As tests/servers.py starts servers: no snapshot saves at shutdown, a short ladder.
        "REPL_SNAPSHOT_STORE": "off",
        "REPL_SHUTDOWN_GRACE_S": "1",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "replserver",
        "--port",
        str(port),
        env=env,
        cwd="/",
        preexec_fn=_as_nobody,
        start_new_session=True,
    )
    http = aiohttp.ClientSession()
    base = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    async with http.get(f"{base}/health") as resp:
                        layers = (await resp.json())["isolation"]
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)

        async def run(sid: str, code: str) -> dict[str, Any]:
            async with http.post(f"{base}/execute/{sid}", json={"code": code}) as resp:
                assert resp.status == 200, await resp.text()
                body: dict[str, Any] = await resp.json()
                return body

        yield Target(run, root=False, layers=layers, port=port)
    finally:
        await http.close()
        os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)  # a bound on a busy machine, not a wait


def _as_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


@pytest.fixture(params=["root", "nobody"])
async def target(
    request: pytest.FixtureRequest, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Target]:
    root = request.param == "root"
    async with root_target(make_client, monkeypatch) if root else nobody_target() as attacked:
        yield attacked


@pytest.fixture
async def root_only(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Target]:
    async with root_target(make_client, monkeypatch) as attacked:
        yield attacked


PID = "import os\nprint(os.getpid())"


async def test_other_sessions_variables_are_out_of_reach(target: Target) -> None:
    secret = "secret-" + secrets.token_hex(6)
    await target.out("victim", f"secret = {secret!r}")
    # The victim's variable is `secret`; the attacker defines no such name itself.
    code = (
        "import gc, sys\n"
        "hits = [o for o in gc.get_objects() if isinstance(o, dict) and 'secret' in o]\n"
        "hits += [m for m in list(sys.modules.values()) if hasattr(m, 'secret')]\n"
        "print(len(hits))"
    )
    assert await target.out("attacker", code) == "0\n"
    # The same search finds it in the victim's own process: the probe can see.
    assert await target.out("victim", code) != "0\n"


async def test_other_childs_proc_environ_and_mem_are_refused(target: Target) -> None:
    victim = int(await target.out("victim", PID))
    code = (
        "for name in ('environ', 'mem', 'maps'):\n"
        "    try:\n"
        f"        open('/proc/{victim}/' + name, 'rb').read(16)\n"
        "        print(name, 'READ')\n"
        "    except OSError as exc:\n"
        "        print(name, type(exc).__name__)"
    )
    out = await target.out("attacker", code)
    assert "READ" not in out, out
    assert out.count("PermissionError") == 3, out


async def test_killing_another_sessions_child_is_refused(target: Target) -> None:
    target.require("uidSeparation", "children of a non-root server share its uid")
    victim = int(await target.out("victim", "import os\nmarker = 1\nprint(os.getpid())"))
    code = (
        f"import os, signal\ntry:\n    os.kill({victim}, signal.SIGKILL)\n    print('KILLED')\n"
        "except PermissionError:\n    print('refused')"
    )
    assert await target.out("attacker", code) == "refused\n"
    assert await target.out("victim", "print(marker)") == "1\n"


async def test_other_sessions_directory_is_private(target: Target) -> None:
    home = (
        await target.out(
            "victim", "import os\nopen('notes.txt', 'w').write('x')\nprint(os.getcwd())"
        )
    ).strip()
    code = (
        "import os\n"
        f"home = {home!r}\n"
        "for attempt in (lambda: os.listdir(home), lambda: open(home + '/notes.txt').read(),"
        " lambda: os.listdir(os.path.dirname(home))):\n"
        "    try:\n"
        "        seen = attempt()\n"
        "        print('OPEN' if os.path.basename(home) in seen or seen == 'x' else 'UNSEEN')\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)"
    )
    out = await target.out("attacker", code)
    if not target.root:
        # One uid for every child: 0700 directories do not separate sessions (README).
        pytest.skip(f"same uid for all sessions (non-root server); attempts gave {out.split()}")
    if target.layers["privateTmp"]:
        # In its own mount namespace the victim's directory is not even there, and the
        # parent it sees keeps the host's mode (0711).
        assert out.split() == ["FileNotFoundError", "FileNotFoundError", "PermissionError"], out
    else:
        assert out.split() == ["PermissionError"] * 3


async def test_server_environment_does_not_leak(target: Target) -> None:
    code = (
        "import os\n"
        f"name, value = {CANARY_NAME!r}, {CANARY!r}\n"
        "print('env', name in os.environ)\n"
        "for path in (f'/proc/{os.getppid()}/environ', '/proc/1/environ'):\n"
        "    try:\n"
        "        print(path.split('/')[2], value.encode() in open(path, 'rb').read())\n"
        "    except OSError as exc:\n"
        "        print(path.split('/')[2], type(exc).__name__)"
    )
    out = await target.out("curious", code)
    assert "True" not in out, out
    assert out.startswith("env False\n")


async def test_network_is_unreachable(target: Target) -> None:
    if not (target.layers["networkNamespace"] or target.layers["seccomp"]):
        pytest.skip("neither a network namespace nor seccomp is in force here")
    listener = socket.create_server(("127.0.0.1", 0))
    other_port = listener.getsockname()[1]
    code = (
        "import socket\n"
        f"for port in ({target.port}, {other_port}):\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', port), timeout=2).close()\n"
        "        print('CONNECTED')\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)\n"
        "try:\n"
        "    socket.socket(socket.AF_UNIX).close()\n"
        "    print('unix ok')\n"
        "except OSError as exc:\n"
        "    print('unix', type(exc).__name__)"
    )
    try:
        out = await target.out("netcat", code)
    finally:
        listener.close()
    assert "CONNECTED" not in out
    lines = out.split()
    if target.layers["seccomp"]:
        assert lines[:2] == ["PermissionError", "PermissionError"], out
    assert out.endswith("unix ok\n"), out  # local IPC within the session still works


async def test_network_namespace_has_only_a_loopback(target: Target) -> None:
    target.require("networkNamespace", "a network namespace needs root")
    out = await target.out("ns", "print(open('/proc/net/dev').read())")
    interfaces = [line.split(":")[0].strip() for line in out.splitlines()[2:] if ":" in line]
    assert interfaces == ["lo"], out


async def test_user_code_is_not_root_and_cannot_gain_privileges(target: Target) -> None:
    code = (
        "import os\n"
        "print(os.getuid(), os.geteuid(), os.getgroups())\n"
        "status = open('/proc/self/status').read().splitlines()\n"
        "print([line.split()[1] for line in status if line.startswith('NoNewPrivs')][0])\n"
        "try:\n"
        "    os.setuid(0)\n"
        "    print('ROOT')\n"
        "except PermissionError:\n"
        "    print('refused')"
    )
    uid_line, no_new_privs, verdict = (await target.out("climber", code)).splitlines()
    uid, euid, groups = uid_line.split(" ", 2)
    assert uid != "0" and euid != "0" and verdict == "refused"
    assert no_new_privs == "1"
    if target.root:
        assert groups == "[]"


async def test_children_are_not_dumpable(target: Target) -> None:
    target.require("nonDumpable", "the probe found children dumpable")
    code = "import os\nprint(os.stat('/proc/self/mem').st_uid != os.getuid())"
    assert await target.out("dump", code) == "True\n"


async def test_layers_reported(target: Target) -> None:
    layers = target.layers
    assert layers["rlimits"] is True and layers["minimalEnvironment"] is True
    if target.root:
        assert layers["uidSeparation"] is True and layers["nonDumpable"] is True
    else:
        assert layers["uidSeparation"] is False
        assert any("not root" in note for note in layers["notes"])
    assert layers["networkNamespace"] or layers["seccomp"]


async def test_distinct_uids_per_live_session(root_only: Target) -> None:
    uids = {await root_only.out(f"u{i}", "import os\nprint(os.getuid())") for i in range(3)}
    assert len(uids) == 3


async def test_reset_removes_the_session_directory(make_client: MakeClient) -> None:
    client = await make_client()
    where = "import os\nprint(os.getcwd())"
    home = Path((await execute(client, "tidy", where))["output"].strip())
    assert home.is_dir()
    assert (await client.post("/reset/tidy")).status == 200
    # The old child ends in the background; its directory goes with it, promptly.
    async with asyncio.timeout(5):
        while home.exists():
            await asyncio.sleep(0.02)
    fresh = Path((await execute(client, "tidy", where))["output"].strip())
    assert fresh != home and fresh.is_dir()
    if os.geteuid() == 0:
        assert fresh.stat().st_mode & 0o777 == 0o700


async def test_require_isolation_refuses_to_start(tmp_path: Path) -> None:
    # bubblewrap is configured but its binary is missing: a required layer cannot be had.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "REPL_REQUIRE_ISOLATION": "1",
        "REPL_BUBBLEWRAP": "1",
        "REPL_BUBBLEWRAP_PATH": "/nonexistent/bwrap",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "replserver",
        "--port",
        str(free_port()),
        env=env,
        cwd=REPO_ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"required isolation layers are not in force: bubblewrap" in err


async def test_token_is_required_when_configured(make_client: MakeClient) -> None:
    client = await make_client(api_token="s3cret-token")
    health = await client.get("/health")
    assert health.status == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
        resp = await client.post("/execute/t", json={"code": "print(1)"}, headers=headers)
        assert resp.status == 401
        assert "token" in (await resp.json())["detail"]
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/reset/t", "/interrupt/t", "/execute-stream/t"):
        assert (await client.post(path, json={"code": "1"})).status == 401
    ok = await client.post(
        "/execute/t", json={"code": "print(1)"}, headers={"Authorization": "Bearer s3cret-token"}
    )
    assert ok.status == 200 and (await ok.json())["output"] == "1\n"


async def test_session_cap_evicts_idle_then_refuses(make_client: MakeClient) -> None:
    client = await make_client(max_sessions=2)
    await execute(client, "a", "marker = 'a'")
    await execute(client, "b", "marker = 'b'")
    await execute(client, "c", "marker = 'c'")  # evicts a, the least recently used idle one
    again = await execute(client, "a", "print(globals().get('marker', 'gone'))")
    assert again["output"] == "gone\n" and again["restarted"] is True  # evicts b
    # Both live sessions busy: a third id is refused until one is free.
    busy = [asyncio.create_task(execute(client, sid, "import time\ntime.sleep(1)")) for sid in "ac"]
    for sid in "ac":
        await wait_for_session(client, sid, lambda info: info["running"])
    refused = await client.post("/execute/d", json={"code": "1"})
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    assert "busy" in (await refused.json())["detail"]
    await asyncio.gather(*busy)
    assert (await execute(client, "d", "print('in')"))["output"] == "in\n"


async def test_bubblewrap_confines_writes_to_the_session_directory(make_client: MakeClient) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed here")
    client = await make_client(bubblewrap=True, require_isolation=os.geteuid() == 0)
    layers = (await (await client.get("/health")).json())["isolation"]
    assert layers["bubblewrap"] is True
    marker = "escape-" + secrets.token_hex(4)
    code = (
        "import os\n"
        "open('mine.txt', 'w').write('ok')\n"
        f"for path in ('/usr/{marker}', '/etc/{marker}', '/{marker}'):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('WROTE', path)\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__)\n"
        f"open('/tmp/{marker}', 'w').write('private')\n"
        "try:\n"
        "    print(sorted(os.listdir(os.path.dirname(os.getcwd()))))\n"
        "except PermissionError:\n"
        "    print('closed')\n"
        "print(max(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    )
    await execute(client, "neighbour", "print(1)")  # its directory exists beside ours
    reply = await execute(client, "boxed", code)
    lines = reply["output"].splitlines()
    assert lines[:3] == ["OSError"] * 3, lines  # EROFS: a read-only root
    assert not any(Path(p).exists() for p in (f"/usr/{marker}", f"/etc/{marker}", f"/{marker}"))
    assert not Path(f"/tmp/{marker}").exists()  # its /tmp is a private tmpfs
    if layers["privateTmp"]:
        # Its /tmp is the session's own, where the way to its directory keeps the host's
        # modes: the parent cannot be listed, as on the host (0711).
        assert lines[3] == "closed", lines
    else:
        # Beside its own directory it sees the runner it executes, and no other session's.
        listing = ast.literal_eval(lines[3])
        assert len(listing) == 2 and "runner" in listing, listing
    # Its own pid namespace: it sees bubblewrap's init and itself, no process of the host.
    assert int(lines[4]) < 10, lines


async def test_servers_on_one_host_never_share_a_uid() -> None:
    if os.geteuid() != 0:
        pytest.skip("uids are handed out only by a root server")
    from replserver.errors import ChildStartError
    from replserver.isolation import Isolation

    from .conftest import test_settings as settings_for_test

    # Two servers with the same range, as replicas side by side on one host.
    settings = settings_for_test(uid_range="63990-63992", cgroups="off")
    first, second = Isolation(settings), Isolation(settings)
    try:
        leases = [first.lease(), first.lease()]
        other = second.lease()
        assert other.uid not in {lease.uid for lease in leases}
        with pytest.raises(ChildStartError, match="no free uid"):
            second.lease()  # the range is used up, across both servers
        await first.release(leases[0])
        assert second.lease().uid == leases[0].uid  # free again once released
    finally:
        await first.close()
        await second.close()


async def test_layers_are_observed_not_configured(make_client: MakeClient, tmp_path: Path) -> None:
    # A runner that skips its rlimits and keeps a variable of its own: the probe child
    # reports what it finds, so /health shows both layers missing although configured.
    # The child package comes from the server's own import; only the script is swapped.
    runner = tmp_path / "runner_child.py"
    shutil.copy(REPO_ROOT / "runner_child.py", runner)
    source = runner.read_text()
    applied = 'apply_limits(os.environ.pop("REPL_RLIMITS", ""))'
    assert applied in source
    runner.write_text(source.replace(applied, 'os.environ["SMUGGLED"] = "1"'))
    client = await make_client(runner_path=str(runner), cgroups="off")
    layers = (await (await client.get("/health")).json())["isolation"]
    assert layers["rlimits"] is False and layers["minimalEnvironment"] is False, layers
    assert layers["pidsCgroup"] is False  # REPL_CGROUPS=off
    honest = await make_client()
    layers = (await (await honest.get("/health")).json())["isolation"]
    assert layers["rlimits"] is True and layers["minimalEnvironment"] is True, layers
    # In its cgroup exactly when the server could make one (seen from the inside).
    assert layers["pidsCgroup"] is (honest.app[ISOLATION].cgroups is not None), layers


async def test_ptrace_of_another_sessions_child_is_refused(target: Target) -> None:
    # Another uid (root server), or the same uid but non-dumpable (non-root server).
    victim = int(await target.out("traced", "import os\nmarker = 1\nprint(os.getpid())"))
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"if libc.ptrace(16, {victim}, 0, 0) == 0:  # PTRACE_ATTACH\n"
        f"    libc.ptrace(17, {victim}, 0, 0)  # PTRACE_DETACH\n"
        "    print('ATTACHED')\n"
        "else:\n"
        "    print('errno', ctypes.get_errno())"
    )
    assert await target.out("tracer", code) == "errno 1\n"  # EPERM
    assert await target.out("traced", "print(marker)") == "1\n"


CHILD_ENVIRONMENT = ["HOME", "LANG", "LC_ALL", "MPLBACKEND", "PATH", "PYTHONIOENCODING", "TMPDIR"]


async def test_child_environment_is_the_documented_minimum(target: Target) -> None:
    out = await target.out("env", "import os\nprint(sorted(os.environ))")
    assert ast.literal_eval(out) == CHILD_ENVIRONMENT


async def test_abstract_unix_sockets_of_other_sessions_are_out_of_reach(target: Target) -> None:
    target.require("networkNamespace", "abstract sockets are per network namespace")
    name = "replserver-test-" + secrets.token_hex(4)
    listen = (
        "import socket\nserver = socket.socket(socket.AF_UNIX)\n"
        f"server.bind('\\0{name}')\nserver.listen()\nprint('listening')"
    )
    assert await target.out("host", listen) == "listening\n"
    connect = (
        "import socket\ntry:\n"
        f"    socket.socket(socket.AF_UNIX).connect('\\0{name}')\n    print('CONNECTED')\n"
        "except OSError as exc:\n    print(type(exc).__name__)"
    )
    assert await target.out("host", connect) == "CONNECTED\n"  # the session's own: reachable
    assert await target.out("guest", connect) == "ConnectionRefusedError\n"


async def test_seccomp_refuses_io_uring_and_other_abis(target: Target) -> None:
    target.require("seccomp", "the filter could not be installed")
    if platform.machine() != "x86_64":
        pytest.skip("the x32 check is for x86_64; the io_uring number is shared")
    # Unfiltered, these fail otherwise: EFAULT (no params) and ENOSYS (x32 off).
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for number in (425, 0x40000000 | 39):  # io_uring_setup, x32 getpid\n"
        "    print(libc.syscall(number, 1, 0), ctypes.get_errno())"
    )
    assert await target.out("uring", code) == "-1 1\n-1 1\n"  # EPERM from the filter


async def test_uid_is_reused_only_after_its_processes_are_gone(make_client: MakeClient) -> None:
    """Without a cgroup, what left the process group is found by its uid and killed."""
    if os.geteuid() != 0:
        pytest.skip("uids are handed out only by a root server")
    client = await make_client(cgroups="off", uid_range="63960-63961", pool_size=0)
    code = "import os, subprocess\nq = subprocess.Popen(['setsid', 'sleep', '60'])\nprint(q.pid)"
    escaped = int((await execute(client, "one", code))["output"])
    assert not servers.pid_gone(escaped)
    assert (await client.post("/reset/one")).status == 200
    # Out of the child's process group, in no cgroup: only the scan for its uid finds it,
    # and that uid is given back only after.
    async with asyncio.timeout(10):
        while not servers.pid_gone(escaped):
            await asyncio.sleep(0.02)  # polling against the deadline above


async def test_cap_setuid_without_root_gives_no_uid_separation(tmp_path: Path) -> None:
    """Uid separation needs euid 0: a server as nobody holding CAP_SETUID and CAP_SETGID
    (ambient, as a capability-granting launcher leaves it) still runs children as itself."""
    if os.geteuid() != 0 or shutil.which("capsh") is None:
        pytest.skip("needs root and capsh (libcap2-bin) to start a server as nobody with caps")
    caps = ["--caps=cap_setuid,cap_setgid+eip cap_setpcap+ep", "--keep=1", "--user=nobody"]
    prefix = ["capsh", *caps, "--addamb=cap_setuid,cap_setgid", "--", "-c", 'exec "$@"', "sh"]
    replica = await servers.start(prefix=prefix, log=tmp_path / "server.log")
    try:
        await replica.wait_ready()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{replica.base}/health") as resp:
                layers = (await resp.json())["isolation"]
            code = "import os\nprint(os.getuid(), open('/proc/self/status').read().count('CapAmb'))"
            async with http.post(f"{replica.base}/execute/c", json={"code": code}) as resp:
                reply = await resp.json()
            server_status = Path(f"/proc/{replica.proc.pid}/status").read_text()
    finally:
        await replica.kill()
    assert "CapEff:\t00000000000000c0" in server_status  # it held both capabilities
    assert layers["uidSeparation"] is False, layers
    assert reply["output"].split()[0] == str(NOBODY), reply


async def test_session_directories_go_at_eviction_and_shutdown(make_client: MakeClient) -> None:
    client = await make_client(max_sessions=1)
    where = "import os\nprint(os.getcwd())"
    first = Path((await execute(client, "first", where))["output"].strip())
    second = Path((await execute(client, "second", where))["output"].strip())  # evicts first
    async with asyncio.timeout(5):
        while first.exists():
            await asyncio.sleep(0.02)  # polling against the deadline above
    assert second.is_dir()
    await client.close()  # the application's cleanup, as at shutdown
    assert not second.exists() and not second.parent.exists()


async def test_peak_memory_is_per_execution(target: Target) -> None:
    # Under a root server children are forked (and open their /proc files before taking
    # their uid); under nobody they start by exec, for the same reason.
    big = await target.run("peak", "a = bytearray(64 * 1024 * 1024)\ndel a")
    small = await target.run("peak", "c = 1")
    assert big["peakRssBytes"] > 64 * 1024 * 1024, big
    assert 0 < small["peakRssBytes"] < big["peakRssBytes"], (small, big)
