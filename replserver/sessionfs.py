"""Where a session's files live: its working directory and its own /tmp, /var/tmp, /dev/shm.

Where the server may mount (root with CAP_SYS_ADMIN), each session gets one filesystem, a
tmpfs of REPL_LIMIT_DISK_BYTES (a plain directory when that is 0), mounted by the server:

    <base>/fs-<id>/            the session's filesystem (the quota covers all of it)
        home/                  bind-mounted at <base>/s-<id>: cwd, HOME, TMPDIR
        tmp/ var-tmp/ shm/     the child's /tmp, /var/tmp, /dev/shm, and /run/lock (run-lock/)
                               where the host has it (1777, like the host's)

The server, and through it the files API and snapshots, sees at <base>/s-<id> exactly the
files the code sees in its cwd. In the child's mount namespace (sandbox.py makes it), the
three temporary directories are bind mounts of the session's own; the host's are covered.
Paths the child needs that lay below a covered directory (its working directory, the runner,
a virtual environment under /tmp) are bound again at the same path inside the cover.

The server keeps these mounts in a mount namespace of its own where it can (so they vanish
with it, whatever ends it), and <base> is a shared mount: when the server unmounts an ended
session's filesystem, the copies that other children's namespaces received go too, and the
memory comes back.

Where it may not mount, sessions share the host's temporary directories; what a session's
uid left there is removed when the uid is released.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from replchild.confine import (
    CLONE_NEWNS,
    MS_BIND,
    MS_PRIVATE,
    MS_REC,
    MS_SHARED,
    MS_SLAVE,
    mount,
    umount,
    unshare,
)

log = logging.getLogger(__name__)

# The host's shared temporary directories -> the session's own, by name inside its filesystem.
# (/var/lock is a link to /run/lock, the FHS's other directory anyone may write to.)
TEMP_DIRS = {"/tmp": "tmp", "/var/tmp": "var-tmp", "/dev/shm": "shm", "/run/lock": "run-lock"}
# Kernel memory for inodes is not counted in a tmpfs's size: bound their number too.
BYTES_PER_INODE = 16 * 1024
MIN_INODES = 4096


def enter_own_mount_namespace() -> bool:
    """Move the server into a mount namespace of its own, whose mounts vanish with it.

    Only while it has one thread: a thread that unshares moves alone, and the others
    (which remove session directories) would not see the mounts.
    """
    if len(os.listdir("/proc/self/task")) != 1:
        return False
    unshare(CLONE_NEWNS)
    # Slave: the host's later mounts still appear here, ours never reach the host.
    mount("none", "/", None, MS_REC | MS_SLAVE)
    return True


@dataclass(frozen=True, slots=True)
class SessionFs:
    """One session's filesystem: where the server sees it, and the child's mount plan."""

    workdir: Path
    root: Path | None  # the filesystem holding the workdir and temp dirs; None: shared temp
    mounts: tuple[tuple[str, str, int], ...] = ()
    # Detached in the child once its mounts are made: the base, with every other session's
    # filesystem below it ("": it holds the child's working directory, and stays).
    detach: str = ""


BASE_BYTES = 64 * 1024 * 1024  # the base's tmpfs: the runner's copy and empty directories


class SessionFilesystems:
    """Makes and removes the sessions' filesystems under one base directory."""

    def __init__(self, base: Path, *, private: bool, size_bytes: int) -> None:
        self._host_owners: dict[str, tuple[int, int, int]] = {}  # _make_chain's
        self.base = base
        self.private = private
        self.size_bytes = size_bytes if private else 0
        targets: dict[str, str] = {}
        for target in TEMP_DIRS:
            real = os.path.realpath(target)
            if os.path.isdir(real) and real not in targets.values():
                targets[target] = real
        # A covered directory holding the base is covered last: the sources of the others
        # are still reachable by their host paths until then.
        real_base = os.path.realpath(base)
        self._targets = sorted(targets.items(), key=lambda t: _below(real_base, t[1]))
        # Below a covered directory, the child reaches what it needs of the base through
        # binds inside the cover, so it can let go of the rest: the copies of every other
        # session's filesystem its namespace starts with. Then no mount or unmount the
        # server makes later has to reach it (each took O(live sessions) time).
        covered = any(_below(real_base, real) for _, real in self._targets)
        self._detach = str(base) if private and covered else ""
        if private:
            # A mount of its own, shared: the sessions' filesystems mounted below it reach
            # the children's namespaces (as slaves) and, above all, so do their unmounts.
            if self.size_bytes:
                # Only mount points, the runner and directories live here (a session's
                # files are in its own filesystem): in memory, a session's directories
                # are made in microseconds (a mkdir took 387 us on this VM's disk, 5 on
                # a tmpfs, and each start makes two).
                mount("tmpfs", str(base), "tmpfs", 0, f"mode=0711,size={BASE_BYTES}")
            else:
                mount(str(base), str(base), None, MS_BIND)
            mount("none", str(base), None, MS_PRIVATE)
            mount("none", str(base), None, MS_SHARED)

    @property
    def targets(self) -> list[str]:
        """The host's temporary directories that each child gets its own of."""
        return [target for target, _ in self._targets] if self.private else []

    def __repr__(self) -> str:
        return f"<SessionFilesystems {self.base} private={self.private} size={self.size_bytes}>"

    def create(self, name: str, uid: int | None, *, keep: Sequence[Path] = ()) -> SessionFs:
        """A new session's filesystem, owned by `uid`; raises OSError. `keep`: paths the
        child must still reach where they lie below a covered directory."""
        workdir = self.base / f"s-{name}"
        workdir.mkdir(mode=0o700)
        if not self.private:
            if uid is not None:
                os.chown(workdir, uid, uid)
            return SessionFs(workdir, None)
        root = self.base / f"fs-{name}"
        root.mkdir(mode=0o700)
        try:
            if self.size_bytes:
                inodes = max(MIN_INODES, self.size_bytes // BYTES_PER_INODE)
                # 0700, root's: the child never walks through it by path (its directories
                # are bound where it uses them), and no other session may either.
                options = f"size={self.size_bytes},nr_inodes={inodes},mode=0700"
                mount("tmpfs", str(root), "tmpfs", 0, options)
            home = root / "home"
            home.mkdir(mode=0o700)
            if uid is not None:
                os.chown(home, uid, uid)
            mounts: list[tuple[str, str, int]] = []
            covers: list[tuple[str, str, int]] = []
            reals = [(path, os.path.realpath(path)) for path in (workdir, *keep)]
            for target, real in self._targets:
                inside = root / TEMP_DIRS[target]
                inside.mkdir()
                inside.chmod(0o1777)  # sticky: a session cannot move what the server made
                for path, path_real in reals:
                    if _below(path_real, real):
                        point = inside / os.path.relpath(path, real)
                        self._make_chain(inside, point, real)
                        mounts.append((str(path), str(point), MS_BIND))
                covers.append((str(inside), target, MS_BIND | MS_REC))
            mount(str(home), str(workdir), None, MS_BIND)
        except BaseException:
            self._remove(workdir, root)
            raise
        return SessionFs(workdir, root, tuple(mounts + covers), self._detach)

    def _make_chain(self, top: Path, point: Path, host: str) -> None:
        """Directories from `top` down to `point` (mount points to bind on), each with the
        owner and mode of its counterpart below `host`: the same path, the same
        permissions, so no directory the host keeps closed opens up inside the cover.
        The host's directories are looked at once: they are the server's own and the
        interpreter's, which do not change under it."""
        current, counterpart = str(top), host
        for part in point.relative_to(top).parts:
            current, counterpart = os.path.join(current, part), os.path.join(counterpart, part)
            owner = self._host_owners.get(counterpart)
            if owner is None:
                st = os.stat(counterpart)
                owner = self._host_owners[counterpart] = (
                    st.st_uid,
                    st.st_gid,
                    stat.S_IMODE(st.st_mode),
                )
            try:
                os.mkdir(current, 0o700)
            except FileExistsError:
                continue  # on the way to another path kept: made and set already
            os.chown(current, owner[0], owner[1])
            os.chmod(current, owner[2])

    def remove(self, fs: SessionFs) -> None:
        """Unmount and delete a session's filesystem (blocking: run it in a thread)."""
        self._remove(fs.workdir, fs.root)

    def _remove(self, workdir: Path, root: Path | None) -> None:
        paths = [workdir] if root is None else [workdir, root]
        if root is not None:
            for path in paths:
                _unmount(path)
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
            # rmtree needs a descriptor per level; out of them (EMFILE, the very reason a
            # spawn may have failed), an empty directory still goes with rmdir.
            with contextlib.suppress(OSError):
                path.rmdir()

    def close(self) -> None:
        """Unmount the base (blocking); the sessions' filesystems are gone by now."""
        if self.private:
            _unmount(self.base)


def _unmount(path: Path) -> None:
    # Not os.path.ismount: a bind mount from the same filesystem looks like a directory.
    try:
        umount(str(path))
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a mount point
            log.warning("could not unmount %s: %s", path, exc)


def _below(real: str, directory: str) -> bool:
    """Whether the resolved path `real` is `directory` or lies below it."""
    return real == directory or real.startswith(directory.rstrip("/") + "/")


def remove_owned(uid: int) -> int:
    """Remove what `uid` owns in the shared temporary directories; the count removed.

    Only directories anyone may write to can hold a session's files, so only those are
    searched. Run once no process of `uid` is left (it cannot race us); another session can,
    so nothing here follows a symlink: fwalk and rmtree work on directory descriptors.
    """
    removed = 0
    for top in TEMP_DIRS:
        if not os.path.isdir(top):
            continue
        for _, dirnames, filenames, dirfd in os.fwalk(top):
            for name in list(dirnames) + filenames:
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                except OSError:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if is_dir and (st.st_uid == uid or not st.st_mode & stat.S_IWOTH):
                    dirnames.remove(name)  # removed whole, or cannot hold the session's files
                if st.st_uid != uid:
                    continue
                try:
                    if is_dir:
                        shutil.rmtree(name, dir_fd=dirfd)
                    else:
                        os.unlink(name, dir_fd=dirfd)
                    removed += 1
                except OSError as exc:
                    log.warning("could not remove %s of uid %d in %s: %s", name, uid, top, exc)
    return removed
