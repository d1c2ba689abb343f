"""The confinement a session process puts itself under before any user code: namespaces,
mounts, uid, parent-death signal, no new privileges, the seccomp filter.

One definition for both ways a child starts: the server's Popen runs it between fork and
exec (replserver/sandbox.py), and the fork server runs it in each child it forks
(replchild/forkserver.py). Stdlib only: the fork server imports it.
"""

from __future__ import annotations

import _signal
import ctypes
import os

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
SOCK_FILTER_BYTES = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
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


class SockFprog(ctypes.Structure):
    """struct sock_fprog: the instruction count and where the instructions are."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _fail(step: str) -> None:
    # Between fork and exec the only way to report is an exception: Popen turns it into a
    # SubprocessError in the server, the fork server into the child's exit status.
    err = ctypes.get_errno()
    raise OSError(err, f"{step}: {os.strerror(err)}")


def make_undumpable() -> None:
    """PR_SET_DUMPABLE 0 for this process: processes of the same uid may not ptrace it or
    read its memory or environment through /proc."""
    if _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_DUMPABLE)")


def set_parent_death_signal(sig: int) -> None:
    """`sig` for this process when the thread that started it ends."""
    if _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_PDEATHSIG)")


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


class Confiner:
    """Confines the calling process when called; everything it needs (encoded paths, the
    filter in C memory) is made beforehand, so that it allocates little in a fork."""

    def __init__(
        self,
        *,
        uid: int | None,
        gid: int | None,
        new_netns: bool,
        seccomp: bytes | None,
        mounts: tuple[tuple[str, str, int], ...],
        cwd: str,
        parent: int,
        detach: str = "",
    ) -> None:
        """`parent`: the pid of the process that forks the one to confine. `detach`: a
        directory whose mounts go from this process's namespace once `mounts` are made."""
        self.uid, self.gid, self.cwd, self.parent = uid, gid, cwd, parent
        self._detach = detach.encode()
        self._program = ctypes.create_string_buffer(seccomp or b"", len(seccomp or b""))
        self._fprog = SockFprog(
            len(seccomp or b"") // SOCK_FILTER_BYTES, ctypes.addressof(self._program)
        )
        self._fprog_addr = ctypes.addressof(self._fprog) if seccomp else 0
        self._mounts = [(src.encode(), dst.encode(), flags) for src, dst, flags in mounts]
        self._namespaces = CLONE_NEWNET if new_netns else 0
        if self._mounts:
            # SysV IPC objects and POSIX message queues are shared places too, named by key.
            self._namespaces |= CLONE_NEWNS | CLONE_NEWIPC

    def __call__(self) -> None:
        # A network namespace of its own, with only a loopback that is down, a mount and
        # an IPC namespace: they need root, so before the privileges go; one call for all.
        namespaces, uid, gid = self._namespaces, self.uid, self.gid
        if namespaces and _unshare(namespaces) != 0:
            _fail(f"unshare({namespaces:#x})")
        if self._mounts:
            # Slave: nothing mounted here reaches the server; what the server unmounts (an
            # ended session's filesystem, copied into this namespace) goes here too.
            if _mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
                _fail("mount(/, MS_REC|MS_SLAVE)")
            # Held before the mounts cover the way to it, for the detach after them.
            held = os.open(self._detach, os.O_PATH | os.O_CLOEXEC) if self._detach else -1
            for src, dst, flags in self._mounts:
                if _mount(src, dst, None, flags, None) != 0:
                    _fail(f"mount({src!r}, {dst!r})")
            if held >= 0:
                if _umount2(f"/proc/self/fd/{held}".encode(), MNT_DETACH) != 0:
                    _fail(f"umount({self._detach!r})")
                os.close(held)
            if self.cwd:
                # The directory entered before lies in the covered tree, whose ".." leads
                # where the child has no business.
                os.chdir(self.cwd)
        # Files the session creates are its own alone, even where a directory is shared.
        os.umask(UMASK)
        if uid is not None and gid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        # After the uid change, which clears it: the parent's death (even by SIGKILL) is
        # signalled with SIGTERM, on which the child kills its whole process group.
        _prctl(PR_SET_PDEATHSIG, _signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self.parent:
            # The parent died before the line above: nobody would ever signal this one.
            raise OSError(f"the parent process {self.parent} ended while this one started")
        # Orphans of user code (a shell's background job, a stopped fork loop) are
        # re-parented to the child, which reaps them, instead of to a PID 1 that may not.
        _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        # No setuid binary run by user code gains privileges; also what seccomp requires.
        if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _fail("prctl(PR_SET_NO_NEW_PRIVS)")
        if self._fprog_addr and (
            _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._fprog_addr, 0, 0) != 0
        ):
            _fail("prctl(PR_SET_SECCOMP)")
