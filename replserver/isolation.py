"""Which isolation layers this server can apply, and one lease of them per child.

A lease is what one child runs under for its whole life: an unprivileged uid of its own
(when the server is root), a private working directory, a pids cgroup, a network
namespace and/or a seccomp filter. Leases are released only after every process of the
child is dead, so a uid or directory is never handed on while something still uses it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import py_compile
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cgroup import CgroupTree, ChildCgroup
from .errors import ChildStartError
from .sandbox import Confinement, make_undumpable
from .seccomp import SockFprog, compile_filter
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lease:
    """One child's share of the isolation layers."""

    uid: int | None
    workdir: Path
    cgroup: ChildCgroup | None
    confinement: Confinement


@dataclass
class Layers:
    """What is in force, as /health reports it (verified by a probe child at start-up)."""

    uid_separation: bool = False
    network_namespace: bool = False
    seccomp: bool = False
    bubblewrap: bool = False
    pids_cgroup: bool = False
    rlimits: bool = True
    non_dumpable: bool = False
    private_workdir: bool = True
    minimal_environment: bool = True
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "uidSeparation": self.uid_separation,
            "networkNamespace": self.network_namespace,
            "seccomp": self.seccomp,
            "bubblewrap": self.bubblewrap,
            "pidsCgroup": self.pids_cgroup,
            "rlimits": self.rlimits,
            "nonDumpable": self.non_dumpable,
            "privateWorkdir": self.private_workdir,
            "minimalEnvironment": self.minimal_environment,
            "notes": list(self.notes),
        }


class Isolation:
    """Hands out leases and knows which layers are configured and which are active."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.root = os.geteuid() == 0
        make_undumpable()
        first, last = settings.uids
        self._free_uids = list(range(last, first - 1, -1)) if self.root else []
        self._uid_locks: dict[int, int] = {}  # uid -> descriptor holding its host-wide lock
        self._uid_lock_dir = Path(tempfile.gettempdir()) / "replserver-uids"
        if self.root:
            self._uid_lock_dir.mkdir(mode=0o700, exist_ok=True)
        self._seccomp: SockFprog | None = None
        self.netns = False
        if settings.network == "none":
            self._seccomp = compile_filter()
            # unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN, which a container's root lacks
            # unless it is added: without it, seccomp alone keeps the network out.
            self.netns = self.root and has_capability(CAP_SYS_ADMIN)
        self.cgroups = CgroupTree.create() if settings.cgroups == "auto" else None
        self.bwrap = shutil.which(settings.bubblewrap_path) if settings.bubblewrap else None
        base = Path(settings.work_dir or tempfile.gettempdir())
        self.work_base = base / f"replserver-{os.getpid()}-{secrets.token_hex(4)}"
        # 0711: children may enter their own directory below but not list the others.
        self.work_base.mkdir(mode=0o711, parents=True)
        self.work_base.chmod(0o711)
        # What the children execute. Under a dropped uid the installed script may sit where
        # that uid cannot read (a checkout under /root, say): children get a copy here.
        self.python = settings.python
        self.runner_dir = self.work_base / "runner"
        self.runner_path = install_runner(settings.runner_path, self.runner_dir)
        self.layers = Layers(
            uid_separation=self.root,
            network_namespace=self.netns,
            seccomp=self._seccomp is not None,
            pids_cgroup=self.cgroups is not None,
        )
        if not self.root:
            self.layers.notes.append(
                "the server is not root: children run as the server's own user, so sessions"
                " are separated by processes and directories only, not by uid"
            )
        if settings.bubblewrap and self.bwrap is None:
            self.layers.notes.append(
                f"REPL_BUBBLEWRAP is on but {settings.bubblewrap_path} is missing"
            )
        if settings.network == "host":
            self.layers.notes.append("REPL_NETWORK=host: user code has the host's network")
        elif self.root and not self.netns:
            self.layers.notes.append(
                "no CAP_SYS_ADMIN: no network namespace per child; seccomp refuses sockets"
            )

    def fall_back_to_base_python(self) -> bool:
        """The children's uid cannot run the configured interpreter (a virtual environment
        under a private home, say): use the interpreter it links to, without the venv's
        packages. False if there is nothing else to try."""
        candidates = (self.python, getattr(sys, "_base_executable", ""))
        real = next((r for c in candidates if c and (r := os.path.realpath(c)) != self.python), "")
        if not real:
            return False
        log.warning(
            "children cannot run %s as their uid; using %s (without that environment's"
            " packages) -- install the server where other users can read it",
            self.python,
            real,
        )
        self.python = real
        self.layers.notes.append(f"children run {real}: the server's environment is unreadable")
        return True

    def __repr__(self) -> str:
        return f"<Isolation root={self.root} free_uids={len(self._free_uids)} {self.cgroups!r}>"

    def lease(self) -> Lease:
        """Everything one new child needs; raises ChildStartError when uids run out."""
        uid = self._take_uid() if self.root else None
        workdir = self.work_base / f"s-{secrets.token_hex(8)}"
        try:
            workdir.mkdir(mode=0o700)
            if uid is not None:
                os.chown(workdir, uid, uid)
        except OSError as exc:
            if uid is not None:
                self._give_back_uid(uid)
            raise ChildStartError(f"could not create the session's directory: {exc}") from exc
        cgroup = self.cgroups.new(self._settings.limit_processes) if self.cgroups else None
        confinement = Confinement(uid=uid, gid=uid, new_netns=self.netns, seccomp=self._seccomp)
        return Lease(uid=uid, workdir=workdir, cgroup=cgroup, confinement=confinement)

    def command(self, lease: Lease | None) -> list[str]:
        """The child's command line: the runner, inside bubblewrap when that is on."""
        child = [self.python, "-I", "-c", BOOTSTRAP, str(self.runner_dir)]
        if self.bwrap is None or lease is None:
            return child
        home = str(lease.workdir)
        # The interpreter's environment (a venv), if it lives under /tmp, must stay visible
        # through the private /tmp.
        env_root = os.path.realpath(Path(self.python).parent.parent)
        keep = ("--ro-bind", env_root, env_root) if env_root.startswith("/tmp/") else ()
        # Read-only root, private /tmp and /dev, its own /proc and pid namespace; only the
        # session's directory is writable. --die-with-parent and the pid namespace take
        # every process of the sandbox down with it.
        return [
            self.bwrap,
            *("--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"),
            *keep,
            *("--bind", home, home, "--ro-bind", str(self.runner_dir), str(self.runner_dir)),
            *("--unshare-pid", "--die-with-parent", "--chdir", home, "--"),
            *child,
        ]

    async def release(self, lease: Lease) -> None:
        """Give the lease back once the child's processes are gone (or make them so)."""
        if lease.cgroup is not None:
            await lease.cgroup.destroy()
        elif lease.uid is not None:
            # Without a cgroup, a process that left the child's process group (setsid)
            # could still run as this uid: kill everything of the uid before reusing it.
            await asyncio.to_thread(_kill_uid, lease.uid)
        await asyncio.to_thread(shutil.rmtree, lease.workdir, True)
        if lease.uid is not None:
            self._give_back_uid(lease.uid)

    def _take_uid(self) -> int:
        """A uid from the range that no server on this host is using.

        Every server of the host draws from the same REPL_UID_RANGE (replicas side by side,
        a test suite's servers), so a uid is also held by an flock on a file of the host:
        held while a child uses it, and released by the kernel if the server dies.
        """
        skipped = []
        try:
            while self._free_uids:
                uid = self._free_uids.pop()
                fd = os.open(
                    self._uid_lock_dir / str(uid), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600
                )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    skipped.append(uid)  # another server's child has it
                    continue
                self._uid_locks[uid] = fd
                return uid
        finally:
            self._free_uids[0:0] = skipped  # tried again last
        raise ChildStartError("no free uid left in REPL_UID_RANGE for a new session")

    def _give_back_uid(self, uid: int) -> None:
        fd = self._uid_locks.pop(uid, None)
        if fd is not None:
            os.close(fd)  # releases the flock
        self._free_uids.insert(0, uid)  # reused last: least recently used first

    async def close(self) -> None:
        for uid in list(self._uid_locks):
            self._give_back_uid(uid)
        if self.cgroups is not None:
            await self.cgroups.remove()
            self.cgroups = None
        await asyncio.to_thread(shutil.rmtree, self.work_base, True)


# How a child starts: import the runner from its directory (so from its compiled .pyc: a
# script run by path is compiled afresh every time, which costs each session ~1 MB of
# memory and milliseconds of start-up), then leave sys.path and sys.modules as they were.
BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop()); import runner_child; "
    "del sys.path[0], sys.modules['runner_child']; runner_child.main()"
)


RUNNER_MODULES = (  # the others are loaded by the first
    "runner_child.py",
    "runner_repl.py",
    "runner_complete.py",
    "runner_startup.py",
)


def install_runner(source: str, directory: Path) -> str:
    """Copy the runner (and its sibling) where every child's uid can read them, and
    compile them there; the path of the copied runner_child.py."""
    directory.mkdir(mode=0o755)
    origin = Path(source).parent
    for name in RUNNER_MODULES:
        copy = directory / name
        shutil.copyfile(origin / name if name != "runner_child.py" else source, copy)
        copy.chmod(0o644)
        py_compile.compile(str(copy), doraise=True)
    return str(directory / "runner_child.py")


CAP_SYS_ADMIN = 21


def has_capability(cap: int) -> bool:
    """Whether this process holds capability number `cap` in its effective set."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> cap & 1)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (a /proc scan; bounded)."""
    for _ in range(10):
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                # The real uid from status: /proc/<pid> itself is root's for a
                # non-dumpable process, which would hide it from a stat().
                with open(f"/proc/{entry.name}/status") as f:
                    line = next(line for line in f if line.startswith("Uid:"))
                if int(line.split()[1]) != uid:
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
                found = True
            except (OSError, StopIteration, ValueError):
                continue
        if not found:
            return
