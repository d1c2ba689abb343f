"""What happens between fork and exec of a child: the confinement it runs under for life.

These attributes have to be set by the new process itself, and the child script should not
pay for importing ctypes at every start, so the server's already-loaded libc does it in the
fork. Everything here survives execve; the one thing that does not (non-dumpable) the child
sets itself at start-up.

Where the server may mount (root with CAP_SYS_ADMIN), the child also gets a mount namespace
of its own, in which /tmp, /var/tmp and /dev/shm are bind mounts of its session's private
directories (isolation.py prepares them and the list of mounts).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from .seccomp import SockFprog

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MNT_DETACH = 2
UMASK = 0o077

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
# A second function object (indexing is not cached): this one passes a pointer.
_prctl_seccomp = _libc["prctl"]
_prctl_seccomp.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_prctl_seccomp.restype = ctypes.c_int
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int
_mount = _libc.mount
_mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_mount.restype = ctypes.c_int
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int


@dataclass(frozen=True, slots=True)
class Confinement:
    """How one child is confined; None/False where a layer is off or unavailable."""

    uid: int | None = None
    gid: int | None = None
    new_netns: bool = False
    seccomp: SockFprog | None = None
    # Bind mounts (source, target, flags) made in a new mount namespace, in order; none:
    # the child shares the server's mounts.
    mounts: tuple[tuple[str, str, int], ...] = ()
    # The working directory, entered again once the mounts are made: the one Popen entered
    # lies in the covered tree, whose ".." leads where the child has no business.
    cwd: str = ""


def make_undumpable() -> None:
    """PR_SET_DUMPABLE 0 for this process: children running as our own uid (a non-root
    server) must not read our memory or environment through /proc, nor ptrace us."""
    if _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_DUMPABLE)")


def unshare(flags: int) -> None:
    """unshare(2) for this process (the server: call it while it has a single thread)."""
    if _unshare(flags) != 0:
        _fail(f"unshare({flags:#x})")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2); raises OSError."""
    fs = fstype.encode() if fstype else None
    if _mount(source.encode(), target.encode(), fs, flags, data.encode() or None) != 0:
        _fail(f"mount {target}")


def umount(target: str) -> None:
    """Detach `target` (lazily: it goes once nothing uses it); raises OSError."""
    if _umount2(target.encode(), MNT_DETACH) != 0:
        _fail(f"umount {target}")


def _fail(step: str) -> None:
    # In the fork, before exec: the only way to report is the exit status, and Popen turns
    # an exception raised here into a SubprocessError in the server.
    err = ctypes.get_errno()
    raise OSError(err, f"{step}: {os.strerror(err)}")


def make_preexec(confinement: Confinement) -> Callable[[], None]:
    """The function Popen runs in the forked child; everything it needs is prepared here."""
    uid, gid = confinement.uid, confinement.gid
    new_netns = confinement.new_netns
    seccomp = confinement.seccomp
    seccomp_addr = ctypes.addressof(seccomp) if seccomp is not None else 0
    mounts = [(src.encode(), dst.encode(), flags) for src, dst, flags in confinement.mounts]
    namespaces = CLONE_NEWNET if new_netns else 0
    if mounts:
        # SysV IPC objects and POSIX message queues are shared places too, named by key.
        namespaces |= CLONE_NEWNS | CLONE_NEWIPC
    cwd = confinement.cwd

    def prepare() -> None:
        # A network namespace of its own, with only a loopback that is down, a mount and
        # an IPC namespace: they need root, so before the privileges go; one call for all.
        if namespaces and _unshare(namespaces) != 0:
            _fail(f"unshare({namespaces:#x})")
        if mounts:
            # Slave: nothing mounted here reaches the server; what the server unmounts (an
            # ended session's filesystem, copied into this namespace) goes here too.
            if _mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
                _fail("mount(/, MS_REC|MS_SLAVE)")
            for src, dst, flags in mounts:
                if _mount(src, dst, None, flags, None) != 0:
                    _fail(f"mount({src!r}, {dst!r})")
            if cwd:
                os.chdir(cwd)
        # Files the session creates are its own alone, even where a directory is shared.
        os.umask(UMASK)
        if uid is not None and gid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        # After the uid change, which clears it: the server's death (even by SIGKILL) is
        # signalled with SIGTERM, on which the child kills its whole process group.
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # Orphans of user code (a shell's background job, a stopped fork loop) are
        # re-parented to the child, which reaps them, instead of to a PID 1 that may not.
        _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        # No setuid binary run by user code gains privileges; also what seccomp requires.
        if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _fail("prctl(PR_SET_NO_NEW_PRIVS)")
        if (
            seccomp_addr
            and _prctl_seccomp(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, seccomp_addr, 0, 0) != 0
        ):
            _fail("prctl(PR_SET_SECCOMP)")

    return prepare
