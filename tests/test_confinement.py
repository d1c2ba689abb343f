"""Confinement, round two: private temporary directories, the disk quota, the seccomp deny-list.

Each test runs a real `python -m replserver` (tests/servers.py): as root (each child in its
own mount namespace, on its own tmpfs), as root without CAP_SYS_ADMIN (the shared-directory
fallback), as `nobody`, and under bubblewrap. What a flavour cannot do is skipped with the
reason, never passed blind.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from replserver.seccomp import CHECKED, DENIED
from replserver.sessionfs import BYTES_PER_INODE, MIN_INODES

from . import servers

MiB = 1024 * 1024
QUOTA = 8 * MiB
TEMP_DIRS = tuple(d for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(d))
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
NO_SYS_ADMIN = ("setpriv", "--bounding-set=-sys_admin")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these servers are started by root")


class Server:
    """A running server and an HTTP client for it."""

    def __init__(self, replica: servers.Replica, http: aiohttp.ClientSession) -> None:
        self.replica = replica
        self.http = http
        self.pid = replica.proc.pid

    async def run(self, sid: str, code: str) -> dict[str, Any]:
        async with self.http.post(
            f"{self.replica.base}/execute/{sid}", json={"code": code}
        ) as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
            return body

    async def out(self, sid: str, code: str) -> str:
        reply = await self.run(sid, code)
        assert reply["returnCode"] == 0, reply
        text: str = reply["output"]
        return text

    async def isolation(self) -> dict[str, Any]:
        async with self.http.get(f"{self.replica.base}/health") as resp:
            assert resp.status == 200
            layers: dict[str, Any] = (await resp.json())["isolation"]
            return layers

    async def delete(self, sid: str) -> None:
        async with self.http.delete(f"{self.replica.base}/sessions/{sid}") as resp:
            assert resp.status in (200, 204), await resp.text()


@asynccontextmanager
async def server(
    tmp_path: Path, *, prefix: tuple[str, ...] = (), **env: str
) -> AsyncIterator[Server]:
    env.setdefault("REPL_LIMIT_DISK_BYTES", str(QUOTA))
    log = tmp_path / f"server-{secrets.token_hex(3)}.log"
    # Through a Callable[..., ...]: mypy would match **env against start's typed keywords.
    start: Callable[..., Awaitable[servers.Replica]] = servers.start
    replica = await start(prefix=prefix, log=log, **env)
    try:
        await replica.wait_ready()
        async with aiohttp.ClientSession() as http:
            yield Server(replica, http)
    finally:
        await replica.stop()


async def readable_by_nobody() -> bool:
    probe = await asyncio.create_subprocess_exec(
        *NOBODY, sys.executable, "-c", "import replserver, runner_child", cwd="/"
    )
    return await probe.wait() == 0


def mountinfo(pid: int) -> str:
    return Path(f"/proc/{pid}/mountinfo").read_text()


async def poll(predicate: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


# --- private temporary directories -------------------------------------------------------


WRITE_EACH = (
    "import os\n"
    "for d in {dirs!r}:\n"
    "    with open(f'{{d}}/{name}', 'w') as f:\n"
    "        f.write('secret of ' + d)\n"
    "    print(oct(os.stat(f'{{d}}/{name}').st_mode & 0o777))"
)
READ_EACH = (
    "import os\n"
    "for d in {dirs!r}:\n"
    "    try:\n"
    "        print(open(f'{{d}}/{name}').read(), end=' ')\n"
    "    except OSError as exc:\n"
    "        print(type(exc).__name__, end=' ')\n"
    "    print({name!r} in os.listdir(d))"
)


async def test_each_session_has_its_own_tmp_var_tmp_and_dev_shm(tmp_path: Path) -> None:
    host_marker = Path("/tmp") / f"confine-host-{secrets.token_hex(4)}"
    host_marker.write_text("the host's")
    try:
        async with server(tmp_path) as srv:
            layers = await srv.isolation()
            assert layers["privateTmp"] is True, layers
            assert layers["diskQuota"] == QUOTA, layers
            name = f"notes-{secrets.token_hex(4)}.txt"
            await srv.out("a", WRITE_EACH.format(dirs=TEMP_DIRS, name=name))
            seen = (await srv.out("b", READ_EACH.format(dirs=TEMP_DIRS, name=name))).splitlines()
            assert seen == ["FileNotFoundError False"] * len(TEMP_DIRS), seen
            # The session keeps its own files, and the host never had them.
            own = (await srv.out("a", READ_EACH.format(dirs=TEMP_DIRS, name=name))).splitlines()
            assert own == [f"secret of {d} True" for d in TEMP_DIRS], own
            assert not any(Path(d, name).exists() for d in TEMP_DIRS)
            # Nor does a session reach what the host keeps in its /tmp.
            probe = f"import os\nprint(os.path.exists({str(host_marker)!r}))"
            assert await srv.out("a", probe) == "False\n"
            # A reset is a fresh child with fresh temporary directories.
            await srv.http.post(f"{srv.replica.base}/reset/a")
            again = (await srv.out("a", READ_EACH.format(dirs=TEMP_DIRS, name=name))).split()
            assert again[::2] == ["FileNotFoundError"] * len(TEMP_DIRS), again
    finally:
        host_marker.unlink()


ROUND_THE_COVER = """\
import os
other = {other!r}
# Other sessions' filesystems are named nowhere in this namespace's mount table...
print(any(other in line for line in open('/proc/self/mountinfo')))
# ...and, named anyway, reached from the working directory's parent or by absolute path?
base = os.path.dirname(os.getcwd())
for path in (f'../{{other}}/tmp/planted', f'{{base}}/{{other}}/tmp/planted'):
    try:
        open(path, 'w').write('x')
        print('WROTE', path)
    except OSError as exc:
        print(type(exc).__name__)
"""


async def test_no_way_round_the_cover_into_another_sessions_tmp(tmp_path: Path) -> None:
    async with server(tmp_path) as srv:
        cwd = (await srv.out("b", "import os\nprint(os.getcwd())")).strip()
        other = os.path.basename(cwd).replace("s-", "fs-")  # how the server names it
        out = (await srv.out("a", ROUND_THE_COVER.format(other=other))).split()
        assert out[0] == "False", out  # not in A's mount table
        assert "WROTE" not in out and set(out[1:]) <= {"FileNotFoundError", "PermissionError"}
        assert "planted" not in await srv.out("b", "import os\nprint(os.listdir('/tmp'))")
        # Nor any other session's: A's namespace holds its own filesystem alone.
        mine = (await srv.out("a", MOUNTED_SESSIONS)).split()
        assert len(mine) == 1 and mine[0].endswith(
            os.path.basename((await srv.out("a", "import os\nprint(os.getcwd())")).strip())
        ), mine


MOUNTED_SESSIONS = """\
print(*sorted({l.split()[4] for l in open('/proc/self/mountinfo') if '/s-' in l.split()[4]}))
"""


SHM = """\
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
key = 0x5e551011
ident = libc.shmget(key, 4096, {flags})
print(ident >= 0, ctypes.get_errno())
"""


async def test_sysv_ipc_is_private_to_each_session(tmp_path: Path) -> None:
    ipc_creat, ipc_rmid = 0o1000, 0
    async with server(tmp_path) as srv:
        made = await srv.out("a", SHM.format(flags=ipc_creat | 0o666))
        try:
            assert made.split()[0] == "True", made
            enoent = 2
            assert (await srv.out("b", SHM.format(flags=0))).split() == ["False", str(enoent)]
        finally:
            remove = SHM.format(flags=0) + f"libc.shmctl(ident, {ipc_rmid}, None)"
            await srv.out("a", remove)


async def test_without_cap_sys_admin_temp_files_are_private_by_mode_and_removed(
    tmp_path: Path,
) -> None:
    async with server(tmp_path, prefix=NO_SYS_ADMIN) as srv:
        layers = await srv.isolation()
        assert layers["uidSeparation"] is True and layers["privateTmp"] is False, layers
        assert layers["diskQuota"] is None
        assert any("shared temporary directories" in note for note in layers["notes"]), layers
        # Where the host lets symlinks in sticky directories be followed, the notes say so.
        unprotected = Path("/proc/sys/fs/protected_symlinks").read_text().strip() == "0"
        warned = any("protected_symlinks is 0" in note for note in layers["notes"])
        assert warned == unprotected, layers
        name = f"notes-{secrets.token_hex(4)}.txt"
        modes = await srv.out("a", WRITE_EACH.format(dirs=TEMP_DIRS, name=name))
        assert modes.split() == ["0o600"] * len(TEMP_DIRS)  # umask 077
        assert all(Path(d, name).exists() for d in TEMP_DIRS)  # shared: the host's
        seen = (await srv.out("b", READ_EACH.format(dirs=TEMP_DIRS, name=name))).splitlines()
        assert seen == ["PermissionError True"] * len(TEMP_DIRS), seen  # names, not contents
        # What the session's uid left in the shared directories goes when the uid does.
        await srv.delete("a")
        await poll(lambda: not any(Path(d, name).exists() for d in TEMP_DIRS))
        # The server's own lock directory cannot be replaced by a session's symlink.
        plant = (
            "import os\n"
            "try:\n"
            "    os.symlink(os.getcwd(), '/tmp/replserver-uids')\n"
            "    print('PLANTED')\n"
            "except OSError as exc:\n"
            "    print(type(exc).__name__)"
        )
        assert await srv.out("b", plant) == "FileExistsError\n"


async def test_nobody_server_says_temp_dirs_are_shared(tmp_path: Path) -> None:
    if not await readable_by_nobody():
        pytest.skip("this checkout or its venv is not readable by nobody")
    async with server(tmp_path, prefix=NOBODY) as srv:
        layers = await srv.isolation()
        assert layers["privateTmp"] is False and layers["diskQuota"] is None, layers
        assert any("shared temporary directories" in note for note in layers["notes"]), layers
        assert layers["seccompMode"] == "deny-list", layers
        name = f"notes-{secrets.token_hex(4)}.txt"
        try:
            modes = await srv.out("a", WRITE_EACH.format(dirs=TEMP_DIRS, name=name))
            assert modes.split() == ["0o600"] * len(TEMP_DIRS)  # umask 077
        finally:
            for d in TEMP_DIRS:
                Path(d, name).unlink(missing_ok=True)


async def test_require_isolation_names_private_temp_dirs(tmp_path: Path) -> None:
    if not await readable_by_nobody():
        pytest.skip("this checkout or its venv is not readable by nobody")
    log = tmp_path / "refused.log"
    replica = await servers.start(prefix=NOBODY, log=log, REPL_REQUIRE_ISOLATION="1")
    assert await asyncio.wait_for(replica.proc.wait(), 30) == 1
    assert "private temporary directories" in log.read_text()


async def test_bubblewrap_keeps_dev_shm_and_tmp_private_and_in_the_quota(tmp_path: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed here")
    async with server(tmp_path, REPL_BUBBLEWRAP="1", REPL_REQUIRE_ISOLATION="1") as srv:
        layers = await srv.isolation()
        assert layers["bubblewrap"] and layers["privateTmp"], layers
        assert layers["diskQuota"] == QUOTA and layers["seccompMode"] == "deny-list", layers
        name = f"notes-{secrets.token_hex(4)}.txt"
        await srv.out("a", WRITE_EACH.format(dirs=TEMP_DIRS[::2], name=name))
        seen = (await srv.out("b", READ_EACH.format(dirs=TEMP_DIRS[::2], name=name))).splitlines()
        assert seen == ["FileNotFoundError False"] * 2, seen
        # /dev/shm is the session's, inside its quota.
        size = "import os\nv = os.statvfs('/dev/shm')\nprint(v.f_blocks * v.f_frsize)"
        assert await srv.out("a", size) == f"{QUOTA}\n"


# --- the disk quota ------------------------------------------------------------------------

FILL = (
    "import errno, os\n"
    "def fill(path):\n"
    "    written, chunk = 0, b'x' * 65536\n"
    "    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n"
    "    try:\n"
    "        while True:\n"
    "            written += os.write(fd, chunk)\n"
    "    except OSError as exc:\n"
    "        return written, errno.errorcode[exc.errno]\n"
    "    finally:\n"
    "        os.close(fd)\n"
)


async def test_a_full_quota_is_the_sessions_problem_alone(tmp_path: Path) -> None:
    async with server(tmp_path) as srv:
        reply = await srv.out("a", FILL + "print(*fill('fill.bin'))")
        written, error = int(reply.split()[0]), reply.split()[1]
        assert error in ("ENOSPC", "EDQUOT")
        assert QUOTA - MiB <= written <= QUOTA
        # Inodes, whose kernel memory the size does not count, are bounded too.
        inodes = await srv.out("a", "import os\nprint(os.statvfs('.').f_files)")
        assert int(inodes) == max(MIN_INODES, QUOTA // BYTES_PER_INODE)
        # Its temporary directories are inside the same quota.
        more = "for d in ('/tmp', '/var/tmp', '/dev/shm'):\n    print(*fill(d + '/more'))"
        lines = (await srv.out("a", FILL + more)).splitlines()
        assert [line.split()[1] for line in lines] == [error] * 3, lines
        assert all(int(line.split()[0]) < MiB for line in lines), lines
        # The server, a bystander and the host are untouched.
        assert (await srv.isolation())["privateTmp"] is True
        bystander = "open('f', 'w').write('ok')\nprint(open('f').read())"
        assert await srv.out("bystander", bystander) == "ok\n"
        host = os.statvfs("/tmp")
        assert host.f_bavail * host.f_frsize > QUOTA
        # Deleting files makes room again.
        room = "import os\nos.remove('fill.bin')\nprint(*fill('again.bin'))"
        assert (await srv.out("a", FILL + room)).split()[0] != "0"


async def test_the_quotas_space_comes_back_when_the_session_ends(tmp_path: Path) -> None:
    async with server(tmp_path) as srv:
        where = "import os\nprint(os.getpid(), os.getcwd())"
        pid_a, cwd_a = (await srv.out("a", FILL + "fill('/dev/shm/big')\n" + where)).split()
        pid_b = int((await srv.out("b", where)).split()[0])
        fs_a = str(Path(cwd_a).parent / Path(cwd_a).name.replace("s-", "fs-", 1))
        assert f" {fs_a} " in mountinfo(srv.pid)
        # In the server's own mount namespace: never on the host's (this process's).
        assert f" {fs_a} " not in mountinfo(os.getpid())
        # The bystander's namespace holds no copy of it that could keep it alive.
        assert f" {fs_a} " not in mountinfo(pid_b)
        # Seen as the server sees them (its root, in its mount namespace).
        seen = [Path(f"/proc/{srv.pid}/root{path}") for path in (cwd_a, fs_a)]
        assert all(path.exists() for path in seen)
        await srv.delete("a")
        await poll(lambda: f" {fs_a} " not in mountinfo(srv.pid))
        await poll(lambda: not any(path.exists() for path in seen))
        assert int(pid_a) > 0 and await srv.out("b", "print('alive')") == "alive\n"


async def test_without_a_quota_the_private_dirs_live_on_disk(tmp_path: Path) -> None:
    async with server(tmp_path, REPL_LIMIT_DISK_BYTES="0") as srv:
        layers = await srv.isolation()
        assert layers["privateTmp"] is True and layers["diskQuota"] is None, layers
        name = f"notes-{secrets.token_hex(4)}.txt"
        await srv.out("a", WRITE_EACH.format(dirs=TEMP_DIRS, name=name))
        seen = (await srv.out("b", READ_EACH.format(dirs=TEMP_DIRS, name=name))).splitlines()
        assert seen == ["FileNotFoundError False"] * len(TEMP_DIRS), seen
        cwd = (await srv.out("a", "import os\nprint(os.getcwd())")).strip()
        disk = os.statvfs(Path(cwd).parent.parent)  # the work directory's filesystem
        assert await srv.out("a", "import os\nprint(os.statvfs('/tmp').f_blocks)") == (
            f"{disk.f_blocks}\n"
        )
        await srv.delete("a")
        await poll(lambda: f" {cwd} " not in mountinfo(srv.pid))
        assert not Path(cwd).exists()


# --- symlinks planted in shared places -----------------------------------------------------


async def test_a_planted_symlink_redirects_no_one_elses_writes(tmp_path: Path) -> None:
    async with server(tmp_path) as srv:
        own = "import os\nopen('data.txt', 'w').write('original')\nprint(os.getcwd())"
        home_b = (await srv.out("b", own)).strip()
        plant = (
            "import os\n"
            f"os.symlink({home_b + '/data.txt'!r}, '/tmp/report.txt')\n"
            "os.symlink(os.getcwd(), '/tmp/replserver-uids')\n"
            "os.symlink('/etc/passwd', '/dev/shm/passwd')\n"
            "print('planted')"
        )
        assert await srv.out("a", plant) == "planted\n"
        victim = (
            "import os\n"
            "open('/tmp/report.txt', 'w').write('clobbered')\n"
            "open('/dev/shm/passwd', 'w').write('mine')\n"
            "print(open('data.txt').read(), os.path.islink('/tmp/report.txt'))"
        )
        assert await srv.out("b", victim) == "original False\n"
        # A second server on the host takes its uid locks in the host's /tmp, not through
        # the link the session planted in its own.
        async with server(tmp_path) as other:
            assert await other.out("c", "print(1)") == "1\n"
        assert await srv.out("a", "import os\nprint(os.listdir('.'))") == "[]\n"
        locks = Path("/tmp/replserver-uids")
        assert locks.is_dir() and not locks.is_symlink()


# --- the seccomp deny-list -----------------------------------------------------------------

SYSCALLS = """\
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    # In a fork: a call that is let through must change nothing of the caller.
    pid = os.fork()
    if pid == 0:
        r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        os._exit(0 if r >= 0 else min(ctypes.get_errno(), 255))
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
seen = {name: call(nr, 0, 0, 0, 0, 0, 0) for name, nr in TABLE.items()}
seen["unshare(CLONE_NEWUSER)"] = call(CHECKED["unshare"], 0x10000000)
seen["unshare(CLONE_NEWNS)"] = call(CHECKED["unshare"], 0x20000)
seen["unshare(CLONE_FILES)"] = call(CHECKED["unshare"], 0x400)
seen["clone(CLONE_NEWUSER)"] = call(CHECKED["clone"], 0x10000000 | 17, 0, 0, 0, 0)
seen["clone3"] = call(CHECKED["clone3"], 0, 0)
seen["personality(ADDR_NO_RANDOMIZE)"] = call(CHECKED["personality"], 0x0040000)
seen["personality(query)"] = call(CHECKED["personality"], 0xFFFFFFFF)
print(json.dumps(seen))
"""


def syscall_probe() -> str:
    column = {"x86_64": 0, "aarch64": 1}.get(platform.machine())
    if column is None:
        pytest.skip(f"no syscall table for {platform.machine()}")
    table = {name: nrs[column] for name, nrs in DENIED.items() if nrs[column] is not None}
    checked = {name: nrs[column] for name, nrs in CHECKED.items()}
    return f"TABLE = {table!r}\nCHECKED = {checked!r}\n" + SYSCALLS


async def unfiltered(code: str) -> dict[str, int]:
    """The same calls by an unprivileged process without our filter: what the kernel says."""
    proc = await asyncio.create_subprocess_exec(
        *NOBODY, sys.executable, "-I", "-c", code, cwd="/", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    seen: dict[str, int] = json.loads(out)
    return seen


@pytest.mark.parametrize("flavour", ["root", "nobody"])
async def test_session_code_is_refused_what_a_container_is_refused(
    tmp_path: Path, flavour: str
) -> None:
    if flavour == "nobody" and not await readable_by_nobody():
        pytest.skip("this checkout or its venv is not readable by nobody")
    code = syscall_probe()
    baseline = await unfiltered(code)
    prefix = NOBODY if flavour == "nobody" else ()
    async with server(tmp_path, prefix=prefix) as srv:
        assert (await srv.isolation())["seccompMode"] == "deny-list"
        seen: dict[str, int] = json.loads(await srv.out("a", code))
    eperm, enosys = 1, 38
    refused = [name for name in seen if name not in ("clone3", "personality(query)")]
    refused.remove("unshare(CLONE_FILES)")
    assert {name: seen[name] for name in refused} == dict.fromkeys(refused, eperm), seen
    assert seen["clone3"] == enosys  # glibc then falls back to clone, whose flags we see
    assert seen["personality(query)"] == 0 and seen["unshare(CLONE_FILES)"] == 0
    # Without the filter the kernel lets an unprivileged process make a user namespace
    # and answers many of these calls otherwise: the refusals above are the filter's.
    assert baseline["unshare(CLONE_NEWUSER)"] == 0, baseline
    assert baseline["clone3"] != enosys
    observable = [name for name in refused if baseline[name] != eperm]
    assert len(observable) >= 10, baseline


async def test_ordinary_programs_still_work_under_the_filter(tmp_path: Path) -> None:
    code = (
        "import multiprocessing, os, socket, subprocess, tempfile, threading\n"
        "shell = subprocess.run(['sh', '-c', 'echo shell'], capture_output=True, text=True)\n"
        "print(shell.stdout, end='')\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        # close and join, not the with-block: its terminate() SIGTERMs forked workers, which
        # carry the runner's SIGTERM handler and take the session down (seen on main too).
        "for method, n in (('fork', 2), ('spawn', 1)):\n"
        "    pool = multiprocessing.get_context(method).Pool(n)\n"
        "    print(sum(pool.map(abs, range(-3, 0))))\n"
        "    pool.close()\n"
        "    pool.join()\n"
        "a, b = socket.socketpair(); a.send(b'unix'); print(b.recv(4).decode())\n"
        "with tempfile.TemporaryFile() as f:\n"
        "    print(f.write(b'temp'))\n"
        "lock = multiprocessing.Lock()  # a POSIX semaphore in /dev/shm\n"
        "print(lock.acquire())\n"
    )
    async with server(tmp_path) as srv:
        out = await srv.out("a", code)
    assert out == "shell\nthread\n6\n6\nunix\n4\nTrue\n", out
