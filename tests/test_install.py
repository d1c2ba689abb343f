"""Installs anywhere: a root server whose interpreter the session uids cannot run still
starts and works, says why; and a child that fails to start leaks nothing.

The unreadable interpreter is built here as pyenv leaves one under /root: a Python (a copy
of this one) and a virtual environment on it, both inside a 0700 directory.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from replserver.child import ChildProcess
from replserver.errors import ChildStartError
from replserver.isolation import Isolation, hidden_part

from . import servers
from .conftest import MakeClient, execute
from .conftest import test_settings as settings_for_test

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="uids are dropped only by a root server; this run is not root"
)


@pytest.fixture(scope="module")
def hidden_python() -> Iterator[Path]:
    """A venv python with this test run's packages, whose base Python is a copy: both
    reached only through a 0700 directory, as /root/.pyenv/... is. That directory sits
    in /tmp, which everyone may search: it is the one thing in the way."""
    private = Path(tempfile.mkdtemp(prefix="replserver-private-"))  # mode 0700
    assert private.stat().st_mode & 0o777 == 0o700
    base = private / "base"
    (base / "bin").mkdir(parents=True)
    real = os.path.realpath(sys.executable)
    shutil.copy2(real, base / "bin" / Path(real).name)
    # The copy finds its standard library (its "prefix") through this link.
    (base / "lib").symlink_to(Path(sys.base_prefix) / "lib")
    env = private / "venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(base / "bin" / Path(real).name)
    (env / "lib").symlink_to(Path(sys.prefix) / "lib")  # this run's site-packages
    (env / "pyvenv.cfg").write_text(
        f"home = {base / 'bin'}\ninclude-system-site-packages = false\n"
    )
    yield env / "bin" / "python"
    shutil.rmtree(private)


def held_uids(first: int, last: int) -> list[int]:
    """The uids of the range whose host-wide lock some server holds (flock them to see)."""
    held = []
    for uid in range(first, last + 1):
        path = Path("/tmp/replserver-uids") / str(uid)
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(uid)
        finally:
            os.close(fd)
    return held


def leftovers(isolation: Isolation) -> dict[str, Any]:
    """What the server holds for children: their directories and cgroups."""
    cgroups = (
        sorted(p.name for p in isolation.cgroups.base.iterdir() if p.is_dir())
        if (isolation.cgroups)
        else []
    )
    return {
        "dirs": sorted(p.name for p in isolation.work_base.iterdir() if p.name != "runner"),
        "cgroups": cgroups,
    }


@needs_root
async def test_unrunnable_interpreter_runs_children_as_the_server(
    hidden_python: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    server = await servers.start(python=str(hidden_python), log=log, REPL_LOG_LEVEL="info")
    try:
        await server.wait_ready()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.base}/health") as resp:
                layers = (await resp.json())["isolation"]
            code = "import os, sys\nprint(os.getuid(), sys.executable)"
            async with http.post(f"{server.base}/execute/s1", json={"code": code}) as resp:
                reply = await resp.json()
    finally:
        await server.stop()
    assert layers["uidSeparation"] is False
    note = next(n for n in layers["notes"] if "cannot execute" in n)
    assert str(hidden_python) in note and "outside /root" in note, note
    assert f"({hidden_python.parents[2]} is closed to other users)" in note, note
    # As for a non-root server: children run as the server's own user, with its Python.
    assert reply["output"] == f"0 {hidden_python}\n", reply
    text = log.read_text()
    assert "uid separation is off: the children's uids cannot execute" in text
    assert "Traceback" not in text


@needs_root
async def test_unrunnable_interpreter_with_required_isolation_refuses_cleanly(
    hidden_python: Path, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    server = await servers.start(python=str(hidden_python), log=log, REPL_REQUIRE_ISOLATION="1")
    async with asyncio.timeout(30):
        status = await server.proc.wait()
    text = log.read_text()
    assert status == 1, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert "required isolation layers are not in force: uid separation (the children's" in text
    assert "outside /root" in text and "REPL_REQUIRE_ISOLATION=1" in text
    assert not list(Path("/tmp").glob(f"replserver-{server.proc.pid}-*"))  # tidied up


async def test_probe_that_dies_ends_start_up_with_one_line_and_nothing_left(
    tmp_path: Path,
) -> None:
    log = tmp_path / "server.log"
    server = await servers.start(log=log, REPL_PYTHON="/bin/false")
    async with asyncio.timeout(30):
        status = await server.proc.wait()
    text = log.read_text()
    assert status == 1 and "Traceback" not in text, text
    assert text.count("\n") == 1 and "cannot start a confined child" in text, text
    assert not list(Path("/tmp").glob(f"replserver-{server.proc.pid}-*"))


@needs_root
async def test_unreadable_venv_falls_back_to_a_readable_base(
    make_client: MakeClient, hidden_python: Path
) -> None:
    # The venv is hidden, but the server's own base Python is readable: children keep
    # their own uids and run that one (without the venv's packages, which they need not).
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = os.path.realpath(f"{sys.base_prefix}/bin/{version}")
    if hidden_part(base):
        pytest.skip(f"this run's own base Python ({base}) is closed to other users too")
    client = await make_client(python=str(hidden_python))
    layers = (await (await client.get("/health")).json())["isolation"]
    assert layers["uidSeparation"] is True, layers
    assert any("environment is unreadable" in note for note in layers["notes"]), layers
    reply = await execute(client, "base", "import os, sys\nprint(os.getuid(), sys.executable)")
    uid, executable = reply["output"].split()
    assert uid != "0" and executable == base


UID_RANGE = (63970, 63972)
SETTINGS = settings_for_test(uid_range=f"{UID_RANGE[0]}-{UID_RANGE[1]}", limit_processes=16)


@pytest.fixture
async def isolation() -> AsyncIterator[Isolation]:
    iso = Isolation(SETTINGS)
    yield iso
    await iso.close()


async def assert_nothing_leaked(isolation: Isolation, before: dict[str, Any]) -> None:
    assert leftovers(isolation) == before
    assert held_uids(*UID_RANGE) == []
    if isolation.root:
        # Every uid of the range can still be leased: none was lost on the way.
        leases = [isolation.lease() for _ in range(UID_RANGE[1] - UID_RANGE[0] + 1)]
        for lease in leases:
            await isolation.release(lease)


@pytest.mark.parametrize("python", ["/nonexistent/python3", "/bin/false"])
async def test_failed_spawn_leaks_nothing(isolation: Isolation, python: str) -> None:
    isolation.python = python  # missing, or exits at once
    before = leftovers(isolation)
    for _ in range(3):
        with pytest.raises(ChildStartError):
            await ChildProcess.spawn(SETTINGS, isolation=isolation)
    await assert_nothing_leaked(isolation, before)


async def test_spawn_out_of_descriptors_leaks_nothing(isolation: Isolation) -> None:
    """EMFILE at every step of a start (uid lock, pipes, the process's own pipes, the
    cgroup): each failure gives everything back."""
    before = leftovers(isolation)
    # One start and end with room to spare first, as a running server has done: what is
    # loaded lazily (the thread pool, modules) is then not what runs out of descriptors.
    await (await ChildProcess.spawn(SETTINGS, isolation=isolation)).end()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    failures: set[str] = set()
    started = 0
    for spare in range(16):
        # A limit that leaves exactly `spare` descriptors free (numbers below it).
        lowest = os.open("/dev/null", os.O_RDONLY)
        os.close(lowest)  # the number the listing's own descriptor takes, free again after
        used = {int(fd) for fd in os.listdir("/proc/self/fd")} - {lowest}
        limit = [n for n in range(len(used) + spare + 1) if n not in used][spare]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            child = await ChildProcess.spawn(SETTINGS, isolation=isolation)
        except ChildStartError as exc:
            failures.add(str(exc).split(":")[0])
            assert not started, f"failed with {spare} free descriptors after a success: {exc}"
            continue
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        started += 1
        await child.end()
    assert started, "no limit let a child start: the sweep did not reach success"
    assert len(failures) >= 2, failures  # more than one step was made to fail
    await assert_nothing_leaked(isolation, before)
