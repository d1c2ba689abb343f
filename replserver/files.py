"""Session files: read, write, list and delete below a session's working directory, never beyond.

The directory belongs to hostile code: it can plant symlinks and hard links, rename
directories while a request runs, fill its quota. So nothing here opens a path as a whole.
Every request walks from a descriptor of the working directory one component at a time,
`openat` with O_NOFOLLOW (a directory swapped for a link mid-walk fails the open instead of
being followed), and keeps working on the descriptors it opened: what it reads or writes is
in the session's own filesystem whatever the code renames meanwhile. Only regular files
owned by the session's uid are read (a hard link to anything else is refused); new files are
written beside their target and renamed over it, so a write never goes through an existing
inode. Blocking calls: the HTTP side runs them in threads.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ReplError

MAX_NAME_BYTES = 255  # NAME_MAX on Linux
MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_DEPTH = 32  # directory levels a path or a listing goes down
MAX_LISTED = 10_000  # files in one listing; more sets "truncated"
CHUNK_BYTES = 256 * 1024
UPLOAD_PREFIX = ".replserver-upload-"  # an upload in progress, renamed over its target at the end

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO the code planted must not wait for a writer.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class FileError(ReplError):
    """A file request that cannot be done; `status` is the HTTP status that says why."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


def split_path(raw: str) -> tuple[str, ...]:
    """The components of a (percent-decoded) relative path, or FileError 400."""
    if not raw:
        raise FileError("the file path is empty", status=400)
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise FileError(f"the file path is longer than {MAX_PATH_BYTES} bytes", status=400)
    if raw.startswith("/"):
        raise FileError("the file path must be relative to the session's directory", status=400)
    parts = tuple(raw.split("/"))
    if len(parts) > MAX_DEPTH:
        raise FileError(f"the file path is deeper than {MAX_DEPTH} directories", status=400)
    for part in parts:
        if part in ("", ".", ".."):
            raise FileError(
                "the file path has an empty, '.' or '..' component: name the file plainly",
                status=400,
            )
        # A backslash is an ordinary byte to Linux, but a client on Windows would read it
        # as a separator; control characters make names that cannot be shown.
        if "\\" in part or any(ord(c) < 0x20 or c == "\x7f" for c in part):
            raise FileError("the file path has a backslash or a control character", status=400)
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            raise FileError("the file path is not valid UTF-8", status=400) from None
        if size > MAX_NAME_BYTES:
            raise FileError(
                f"a name in the file path is longer than {MAX_NAME_BYTES} bytes", status=400
            )
    return parts


def _error(exc: OSError, what: str) -> FileError:
    """The FileError an OSError of a walk or open means, for the client."""
    code = exc.errno
    if code == errno.ENOENT:
        return FileError(f"no file {what!r} in the session's directory", status=404)
    if code == errno.ELOOP:
        return FileError(
            f"{what!r} is a symbolic link: file requests never follow links", status=403
        )
    if code == errno.ENOTDIR:
        return FileError(f"a component of {what!r} is not a directory", status=409)
    if code == errno.EISDIR:
        return FileError(f"{what!r} is a directory", status=409)
    if code == errno.ENOTEMPTY:
        return FileError(f"the directory {what!r} is not empty", status=409)
    if code in _NO_SPACE:
        return FileError("the session's disk quota is full (REPL_LIMIT_DISK_BYTES)", status=507)
    if code in (errno.EACCES, errno.EPERM):
        return FileError(f"{what!r} may not be accessed", status=403)
    if code == errno.ENAMETOOLONG:
        return FileError(f"{what!r} is too long a name", status=400)
    return FileError(f"{what!r}: {os.strerror(code or 0)}", status=409)


@dataclass(frozen=True, slots=True)
class SessionDir:
    """A session's working directory as the server sees it, and the uid its files belong to."""

    path: Path
    uid: int | None  # None: the children run as the server's own uid

    @property
    def owner(self) -> int:
        return os.geteuid() if self.uid is None else self.uid

    def _top(self) -> int:
        # The directory itself is the server's to name (<base>/s-<id>, in the server's 0711
        # base): the session cannot replace it, only what is inside.
        return os.open(self.path, _DIR_FLAGS)

    def _parent(self, parts: tuple[str, ...], *, create: bool) -> int:
        """A descriptor of the directory holding parts[-1], walked without following links."""
        fd = self._top()
        depth = 0
        try:
            for name in parts[:-1]:
                depth += 1
                try:
                    nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    nxt = self._make_dir(fd, name)
                os.close(fd)
                fd = nxt
        except OSError as exc:
            what = "/".join(parts[:depth])
            if exc.errno == errno.ENOTDIR and _is_link(fd, parts[depth - 1]):
                exc = OSError(errno.ELOOP, "a symbolic link")
            os.close(fd)
            raise _error(exc, what) from None
        return fd

    def _make_dir(self, parent: int, name: str) -> int:
        """Make a directory for an upload, the session's and 0700 like one it made itself."""
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            # Made meanwhile (by the code, say): opened like any other, left as it is.
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            if self.uid is not None:
                os.fchown(fd, self.uid, self.uid)
            os.fchmod(fd, 0o700)  # mkdir's mode went through the server's umask
        except BaseException:
            os.close(fd)
            raise
        return fd

    # --- reading ------------------------------------------------------------------------------
    def open_read(self, parts: tuple[str, ...]) -> tuple[int, os.stat_result]:
        """A descriptor of a regular file the session owns, and its stat; FileError else."""
        what = "/".join(parts)
        parent = self._parent(parts, create=False)
        try:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _error(exc, what) from None
        finally:
            os.close(parent)
        try:
            st = os.fstat(fd)
            self._check_readable(st, what)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _check_readable(self, st: os.stat_result, what: str) -> None:
        if stat.S_ISDIR(st.st_mode):
            raise FileError(f"{what!r} is a directory", status=409)
        if not stat.S_ISREG(st.st_mode):
            raise FileError(f"{what!r} is not a regular file", status=403)
        # Files the session made, or the server made for it, are the session's uid's. Any
        # other (a hard link to a root-owned file, where the filesystem allows linking one
        # in) is not the session's to hand out.
        if st.st_uid != self.owner:
            raise FileError(f"{what!r} belongs to another user (a hard link?)", status=403)

    # --- writing ------------------------------------------------------------------------------
    def begin_upload(self, parts: tuple[str, ...]) -> Upload:
        """A new hidden file beside the target, owned by the session, mode 0600."""
        what = "/".join(parts)
        parent = self._parent(parts, create=True)
        temp = f"{UPLOAD_PREFIX}{secrets.token_hex(8)}"
        try:
            # What is there now is refused as a read would refuse it (a link, a hard link
            # to another user's file). The rename at the end replaces a directory entry and
            # never writes through one, so what the code swaps in meanwhile stays untouched.
            try:
                st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISLNK(st.st_mode):
                    raise FileError(
                        f"{what!r} is a symbolic link: file requests never follow links",
                        status=403,
                    )
                self._check_readable(st, what)
            fd = os.open(temp, _CREATE_FLAGS, 0o600, dir_fd=parent)
        except OSError as exc:
            os.close(parent)
            raise _error(exc, what) from None
        except BaseException:
            os.close(parent)
            raise
        try:
            if self.uid is not None:
                os.fchown(fd, self.uid, self.uid)
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            _unlink_quietly(temp, parent)
            os.close(parent)
            raise
        return Upload(parts, parent, fd, temp)

    # --- deleting and listing -------------------------------------------------------------------
    def delete(self, parts: tuple[str, ...]) -> None:
        """Remove a file, link or empty directory (the entry, never what a link points to)."""
        what = "/".join(parts)
        parent = self._parent(parts, create=False)
        try:
            try:
                os.unlink(parts[-1], dir_fd=parent)
            except IsADirectoryError:
                os.rmdir(parts[-1], dir_fd=parent)
        except OSError as exc:
            raise _error(exc, what) from None
        finally:
            os.close(parent)

    def listing(self, *, limit: int = MAX_LISTED) -> tuple[list[dict[str, Any]], bool]:
        """The regular files below the directory (path, size, modified), sorted, and whether
        the listing stopped at `limit` files or MAX_DEPTH levels (which files it then has is
        the walk's order, not the first by name)."""
        files: list[dict[str, Any]] = []
        truncated = False
        top = self._top()
        try:
            for prefix, names, dirfd in self._walk(top):
                for name in names:
                    if name.startswith(UPLOAD_PREFIX):
                        continue
                    try:
                        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != self.owner:
                        continue  # links, and what is not the session's to hand out
                    if len(files) == limit:
                        truncated = True
                        break
                    files.append(
                        {"path": prefix + name, "size": st.st_size, "modified": _iso(st.st_mtime)}
                    )
                if truncated:
                    break
        except _TooDeep:
            truncated = True
        finally:
            os.close(top)
        files.sort(key=lambda f: str(f["path"]))
        return files, truncated

    def _walk(self, top: int) -> Iterator[tuple[str, list[str], int]]:
        """(path prefix, non-directory names, directory fd) for each directory, depth first,
        entering subdirectories with O_NOFOLLOW; fds live until the caller moves on."""
        stack: list[tuple[str, int, int]] = [("", os.dup(top), 0)]
        try:
            while stack:
                prefix, fd, depth = stack.pop()
                try:
                    names: list[str] = []
                    subdirs: list[str] = []
                    with os.scandir(fd) as entries:
                        for entry in entries:
                            if entry.is_dir(follow_symlinks=False):
                                subdirs.append(entry.name)
                            else:
                                names.append(entry.name)
                    yield prefix, names, fd
                    for name in subdirs:
                        if depth + 1 >= MAX_DEPTH:
                            raise _TooDeep
                        try:
                            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                        except OSError:
                            continue  # replaced by a link, or gone
                        stack.append((f"{prefix}{name}/", sub, depth + 1))
                finally:
                    os.close(fd)
        finally:
            for _, fd, _ in stack:
                os.close(fd)


class _TooDeep(Exception):
    """The listing reached MAX_DEPTH."""


class Upload:
    """A file being uploaded: written to a hidden name, then renamed over its target."""

    def __init__(self, parts: tuple[str, ...], parent: int, fd: int, temp: str) -> None:
        self.parts = parts
        self._parent = parent
        self._fd = fd
        self._temp = temp
        self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            raise _error(exc, "/".join(self.parts)) from None

    def set_times(self, st: os.stat_result) -> None:
        """Keep the access and modification times of the file this one copies."""
        os.utime(self._fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def commit(self) -> None:
        """Put the file in place (replacing an older file, never writing through it)."""
        try:
            os.close(self._fd)
            self._fd = -1
            os.rename(self._temp, self.parts[-1], src_dir_fd=self._parent, dst_dir_fd=self._parent)
        except OSError as exc:
            self.abort()
            raise _error(exc, "/".join(self.parts)) from None
        os.close(self._parent)
        self._parent = -1

    def abort(self) -> None:
        """Remove the partial file; safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._parent >= 0:
            _unlink_quietly(self._temp, self._parent)
            os.close(self._parent)
            self._parent = -1


def copy_files(source: SessionDir, target: SessionDir) -> int:
    """Copy the session's regular files (not links, not empty directories) from one working
    directory to another, owned by the target's uid; the number of files copied.

    A reset gives the session a new child with a new directory: this is how its files
    follow. The source is walked like any request walks it, so what the code planted there
    is not followed out.
    """
    copied = 0
    top = source._top()
    try:
        for prefix, names, dirfd in source._walk(top):
            for name in names:
                if name.startswith(UPLOAD_PREFIX):
                    continue
                try:
                    fd = os.open(name, _READ_FLAGS, dir_fd=dirfd)
                except OSError:
                    continue  # a link, or gone
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != source.owner:
                        continue
                    os.set_blocking(fd, True)
                    upload = target.begin_upload(tuple(f"{prefix}{name}".split("/")))
                    try:
                        while chunk := os.read(fd, CHUNK_BYTES):
                            upload.write(chunk)
                        upload.set_times(st)
                        upload.commit()
                    except BaseException:
                        upload.abort()
                        raise
                    copied += 1
                finally:
                    os.close(fd)
    except _TooDeep:
        pass
    finally:
        os.close(top)
    return copied


def has_entries(directory: SessionDir) -> bool:
    """Whether the directory holds anything at all (cheap: one scandir step)."""
    top = directory._top()
    try:
        with os.scandir(top) as entries:
            return next(iter(entries), None) is not None
    finally:
        os.close(top)


def read_chunk(fd: int, size: int = CHUNK_BYTES) -> bytes:
    """Up to `size` bytes from `fd` (for a thread)."""
    return os.read(fd, size)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
