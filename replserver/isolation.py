"""Which isolation layers this server can apply, and one lease of them per child.

A lease is what one child runs under for its whole life: an unprivileged uid of its own
(when the server is root), its own filesystem (working directory and temporary directories,
sessionfs.py), a pids cgroup, a network namespace and the seccomp filter. Leases are
released only after every process of the child is dead, so a uid or directory is never
handed on while something still uses it.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import py_compile
import secrets
import shutil
import signal
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import replchild
from replchild.confine import make_undumpable

from .cgroup import CgroupTree, ChildCgroup
from .errors import ChildStartError
from .forkserver import ForkServer
from .sandbox import Confinement
from .seccomp import BWRAP_NEEDS, SockFprog, compile_filter, filter_bytes
from .sessionfs import SessionFilesystems, SessionFs, enter_own_mount_namespace, remove_owned
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lease:
    """One child's share of the isolation layers."""

    uid: int | None
    fs: SessionFs
    cgroup: ChildCgroup | None
    confinement: Confinement

    @property
    def workdir(self) -> Path:
        """The session's working directory, as the server sees it (and the code does)."""
        return self.fs.workdir


@dataclass
class Layers:
    """What is in force, as /health reports it (verified by a probe child at start-up)."""

    uid_separation: bool = False
    network_namespace: bool = False
    seccomp: bool = False
    seccomp_mode: str = "off"
    private_tmp: bool = False
    disk_quota: int | None = None
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
            "seccompMode": self.seccomp_mode,
            "privateTmp": self.private_tmp,
            "diskQuota": self.disk_quota,
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
        # Whether each child gets a uid of its own: needs euid 0 (CAP_SETUID alone does not
        # make a server "root" here), and an interpreter that those uids can execute.
        self.separate_uids = self.root
        self.uid_separation_problem = "the server must run as root to drop privileges"
        make_undumpable()
        first, last = settings.uids
        self._free_uids = list(range(last, first - 1, -1)) if self.root else []
        self._uid_locks: dict[int, int] = {}  # uid -> descriptor holding its host-wide lock
        self._uid_lock_dir = Path(tempfile.gettempdir()) / "replserver-uids"
        if self.root:
            self._uid_lock_dir.mkdir(mode=0o700, exist_ok=True)
        self.cgroups = CgroupTree.create() if settings.cgroups == "auto" else None
        self.bwrap = shutil.which(settings.bubblewrap_path) if settings.bubblewrap else None
        # Every child, whatever the server runs as. bubblewrap builds its sandbox with mount
        # calls after the filter is in place: those stay open under it.
        self._seccomp: SockFprog | None = compile_filter(
            deny_sockets=settings.network == "none", relax=BWRAP_NEEDS if self.bwrap else ()
        )
        # Namespaces need CAP_SYS_ADMIN, which a container's root lacks unless it is added:
        # without it, seccomp alone keeps the network out, and temporary directories are
        # shared (see notes).
        self.has_seccomp = self._seccomp is not None
        self._seccomp_program = filter_bytes(self._seccomp) if self._seccomp else None
        self.may_mount = self.root and has_capability(CAP_SYS_ADMIN)
        self.netns = self.may_mount and settings.network == "none"
        # A security module (Docker's default AppArmor profile) may refuse mounts even so.
        mount_error: OSError | None = None
        own_namespace = False
        try:
            own_namespace = self.may_mount and enter_own_mount_namespace()
        except OSError as exc:
            mount_error = exc
        base = Path(settings.work_dir or tempfile.gettempdir())
        self.work_base = base / f"replserver-{os.getpid()}-{secrets.token_hex(4)}"
        # 0711: children may enter their own directory below but not list the others.
        self.work_base.mkdir(mode=0o711, parents=True)
        self.work_base.chmod(0o711)
        self._forks: ForkServer | None = None
        self._closed = False
        self._forks_lock = asyncio.Lock()
        # A forked child is watched through a pidfd (Linux 5.3 and later).
        self._pidfds = pidfds_work()
        try:
            self.fs = SessionFilesystems(
                self.work_base,
                private=self.may_mount and mount_error is None,
                size_bytes=settings.limit_disk_bytes,
            )
        except OSError as exc:
            mount_error = exc
            self.fs = SessionFilesystems(self.work_base, private=False, size_bytes=0)
        # Once the base is what it stays (a filesystem may have been mounted on it).
        # What the children execute. Under a dropped uid the installed script may sit where
        # that uid cannot read (a checkout under /root, say): children get a copy here.
        self.python = settings.python
        self.runner_dir = self.work_base / "runner"
        self.runner_path = install_runner(settings.runner_path, self.runner_dir)
        if self.fs.private and not own_namespace:
            log.info("the server has threads: session filesystems are mounted in its namespace")
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
        if mount_error is not None:
            log.warning("cannot mount session filesystems: %s", mount_error)
            self.layers.notes.append(f"cannot mount session filesystems: {mount_error}")
        if not self.fs.private and self.bwrap is None:  # bubblewrap has a /tmp of its own
            self.layers.notes.append(
                "shared temporary directories: /tmp, /var/tmp and /dev/shm are the host's,"
                " visible to every session (names of files, and their contents where their"
                " modes allow: sessions run with umask 077), and there is no disk quota;"
                " it takes root with CAP_SYS_ADMIN to give each session its own"
            )
            if _sysctl("fs/protected_symlinks") == "0":
                self.layers.notes.append(
                    "fs.protected_symlinks is 0 on this host: a symlink one session plants in"
                    " a shared temporary directory can redirect another's writes (set it to 1)"
                )

    @property
    def forks_children(self) -> bool:
        """Whether children are forked from a fork server (else started by exec).

        Only under a root server: the fork server is non-dumpable, and so is every child
        it forks, from birth; a child that is not root then cannot open its own
        /proc/self/clear_refs, which the per-execution peak memory needs. A root child
        opens it before it takes its uid; one started by exec, before it turns
        non-dumpable. Making the fork server dumpable instead would let every session of
        the server's uid ptrace its way into the sessions forked after it."""
        return self.root and self.bwrap is None and self._settings.fork_server and self._pidfds

    async def fork_server(self, env: dict[str, str]) -> ForkServer | None:
        """The fork server for children of the current interpreter, started with `env` if
        need be; None where children start by exec (bubblewrap, REPL_FORK_SERVER=0, or a
        fork server that cannot start here)."""
        if not self.forks_children:
            return None
        if self.separate_uids and closed_to_others(self.python):
            # A forked child would start, then fail to import anything as its uid; exec
            # fails at once with PermissionError, which the probe knows how to answer.
            return None
        async with self._forks_lock:
            if self._closed:
                raise ChildStartError("the server is shutting down")
            forks = self._forks
            if forks is not None and forks.alive and forks.python == self.python:
                return forks
            self._forks = None
            if forks is not None:
                # An interpreter the probe found unusable, or a fork server that died:
                # whatever children it still has go with it.
                await forks.close()
            forks = ForkServer(
                self.python,
                str(self.runner_dir),
                env=env,
                cwd=str(self.work_base),
            )
            await forks.start()  # OSError: the child's start fails and says why
            self._forks = forks
            return forks

    def fall_back_to_base_python(self) -> bool:
        """The children's uid cannot run the configured interpreter (a virtual environment
        under a private home, say): use the interpreter it links to, without the venv's
        packages, if other users can reach that one. False if there is nothing to try."""
        if not self.separate_uids:
            return False
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidates = (self.python, os.path.join(sys.base_prefix, "bin", version))
        for candidate in map(os.path.realpath, candidates):
            if candidate != self.python and not hidden_part(candidate):
                real = candidate
                break
        else:
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

    def run_children_as_server(self) -> bool:
        """The children's uid cannot run the interpreter at all (a Python under the 0700
        /root, as pyenv installs it): children run as the server's own uid from now on, as
        under a non-root server, and /health says why. False if they already do."""
        if not self.separate_uids:
            return False
        self.separate_uids = False
        self.uid_separation_problem = unreachable_interpreter(self.python)
        self.layers.uid_separation = False  # the probe's report says so, in its notes
        if not self._settings.require_isolation:  # else start-up fails with this reason
            log.warning("uid separation is off: %s", self.uid_separation_problem)
        return True

    def __repr__(self) -> str:
        return f"<Isolation root={self.root} free_uids={len(self._free_uids)} {self.cgroups!r}>"

    def lease(self) -> Lease:
        """Everything one new child needs; raises ChildStartError when uids run out."""
        uid = self._take_uid() if self.separate_uids else None
        try:
            # What the child must reach at the same path: the runner, and the interpreter's
            # environment (the current one: a fallback may have changed it).
            keep = [self.runner_dir, *python_environments(self.python)]
            fs = self.fs.create(secrets.token_hex(8), uid, keep=keep)
        except OSError as exc:
            if uid is not None:
                self._give_back_uid(uid)
            raise ChildStartError(f"could not create the session's directory: {exc}") from exc
        cgroup = self.cgroups.new(self._settings.limit_processes) if self.cgroups else None
        confinement = Confinement(
            uid=uid,
            gid=uid,
            new_netns=self.netns,
            seccomp=self._seccomp_program,
            mounts=fs.mounts,
            cwd=str(fs.workdir) if fs.mounts else "",
            detach=fs.detach,
        )
        return Lease(uid=uid, fs=fs, cgroup=cgroup, confinement=confinement)

    def command(self, lease: Lease | None) -> list[str]:
        """The child's command line: the runner, inside bubblewrap when that is on."""
        child = [self.python, "-I", "-c", BOOTSTRAP, str(self.runner_dir)]
        if self.bwrap is None or lease is None:
            return child
        home = str(lease.workdir)
        # The interpreter's environment (a venv), if it lives under /tmp, must stay visible
        # through the private /tmp.
        roots = [str(p) for p in python_environments(self.python) if str(p).startswith("/tmp/")]
        keep = tuple(arg for root in roots for arg in ("--ro-bind", root, root))
        if lease.fs.root is not None:
            # The child's mount namespace already has the session's own temporary
            # directories (inside its quota) in place: carry them into the sandbox.
            temp = tuple(arg for d in self.fs.targets for arg in ("--bind", d, d))
            keep = ()
        else:
            temp = ("--tmpfs", "/tmp")
        # Read-only root, private /tmp and /dev, its own /proc and pid namespace; only the
        # session's directory is writable. --die-with-parent and the pid namespace take
        # every process of the sandbox down with it.
        return [
            self.bwrap,
            *("--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *temp),
            *keep,
            *("--bind", home, home, "--ro-bind", str(self.runner_dir), str(self.runner_dir)),
            *("--unshare-pid", "--die-with-parent", "--chdir", home),
            # Our filter lets bubblewrap make namespaces; nothing inside may make another.
            *("--unshare-user", "--disable-userns", "--"),
            *child,
        ]

    async def release(self, lease: Lease, *, started: bool = True) -> None:
        """Give the lease back once the child's processes are gone (or make them so).
        `started`: False if no process ever ran under it (a start that failed before)."""
        uid_free = lease.uid is not None
        if lease.cgroup is not None:
            await lease.cgroup.destroy()
        elif lease.uid is not None and started:
            # Without a cgroup, a process that left the child's process group (setsid)
            # could still run as this uid: kill everything of the uid before reusing it.
            try:
                await asyncio.to_thread(_kill_uid, lease.uid)
            except OSError as exc:  # EMFILE: /proc cannot be read, the uid may be in use
                log.error(
                    "uid %d is not reused: its processes were not checked: %s", lease.uid, exc
                )
                uid_free = False
        await asyncio.to_thread(self.fs.remove, lease.fs)
        if uid_free and lease.uid is not None:
            if lease.fs.root is None:
                # Shared temporary directories: what this uid left there goes with it.
                await asyncio.to_thread(remove_owned, lease.uid)
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
                try:
                    fd = os.open(
                        self._uid_lock_dir / str(uid), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600
                    )
                except OSError as exc:  # EMFILE, say: the uid is not taken, nor lost
                    self._free_uids.append(uid)
                    raise ChildStartError(f"could not lock a uid for a new session: {exc}") from exc
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
        self._closed = True  # no fork server is started after this one is stopped
        forks, self._forks = self._forks, None
        if forks is not None:
            await forks.close()
        for uid in list(self._uid_locks):
            self._give_back_uid(uid)
        if self.cgroups is not None:
            await self.cgroups.remove()
            self.cgroups = None
        await asyncio.to_thread(self.fs.close)
        await asyncio.to_thread(shutil.rmtree, self.work_base, True)


# How a child starts: import the runner from its directory (so from its compiled .pyc: a
# script run by path is compiled afresh every time, which costs each session ~1 MB of
# memory and milliseconds of start-up), then leave sys.path as it was; runner_child.main()
# takes its own modules out of sys.modules.
BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop()); import runner_child; "
    "del sys.path[0]; runner_child.main()"
)


CHILD_PACKAGE = Path(replchild.__file__).parent  # the child side's modules, beside the runner


def install_runner(source: str, directory: Path) -> str:
    """Copy the runner and the child package where every child's uid can read them, and
    compile them there; the path of the copied runner_child.py.

    The package is the one this server imports, so both ends use the same wire module.
    """
    directory.mkdir(mode=0o755)
    package = directory / CHILD_PACKAGE.name
    package.mkdir(mode=0o755)
    copies = [(Path(source), directory / "runner_child.py")]
    copies += [(module, package / module.name) for module in sorted(CHILD_PACKAGE.glob("*.py"))]
    for origin, copy in copies:
        shutil.copyfile(origin, copy)
        copy.chmod(0o644)
        py_compile.compile(str(copy), doraise=True)
    return str(directory / "runner_child.py")


def hidden_part(path: str) -> str:
    """The first directory on the way to `path` (or `path` itself) that an unprivileged
    user with no groups cannot search or execute; "" if there is none."""
    real = Path(os.path.realpath(path))
    for part in (*reversed(real.parents), real):
        try:
            mode = part.stat().st_mode
        except OSError:
            return str(part)
        if not mode & stat.S_IXOTH:
            return str(part)
    return ""


def pidfds_work() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


@functools.cache
def closed_to_others(path: str) -> bool:
    """Whether an unprivileged user with no groups cannot reach `path`, by the way it is
    given (a venv's interpreter under /root links to a readable one) or where it leads.
    Asked at every start: the answer for a path is kept, as for python_environments."""
    for part in Path(os.path.abspath(path)).parents:
        try:
            if not part.stat().st_mode & stat.S_IXOTH:
                return True
        except OSError:
            return True
    return bool(hidden_part(path))


def unreachable_interpreter(python: str) -> str:
    """Why children run without uid separation, and how to fix it (for /health and the log)."""
    blocker = hidden_part(python)
    where = f" ({blocker} is closed to other users)" if blocker else ""
    return (
        f"the children's uids cannot execute {python}{where}, so they run as the server's"
        " own user; to fix it, install replserver with a Python"
        " outside /root (e.g. /usr/bin/python3 -m venv /opt/replserver) or make this one"
        " readable and executable by other users"
    )


@functools.cache
def python_environments(python: str) -> tuple[Path, ...]:
    """The directories holding the interpreter's environment: a venv's root, and the
    prefix of the Python it links to (which the venv's pyvenv.cfg names). Kept per
    interpreter: resolving them took a tenth of the server's time in a burst of starts."""
    root = Path(os.path.realpath(Path(python).parent.parent))
    base = Path(os.path.realpath(python)).parent.parent
    return (root,) if base == root else (root, base)


CAP_SYS_ADMIN = 21


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return ""


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
