"""sys.stdout and sys.stderr of a session: print() output buffered in write order, delivered
in bursts, and flushed before anything else can write to fds 1 and 2.

Both streams append to one Output, so stdout and stderr keep the order they were written in
(two pipes cannot: their reader sees two queues). The runner delivers the buffer as frames
straight onto the protocol pipe, after whatever fds 1 and 2 hold: at a size, a short delay
after the first write (the forwarder thread's timer), an explicit flush, a completion, and
before every writer that goes around Python's streams and that Python lets us see --
os.write and os.writev, subprocesses, os.system, spawns, forks, execs, os._exit, os.abort,
a kill of ourselves, a file opened on fd 1 or 2. C code writing to fd 1 or 2 by itself
(a ctypes call, an extension module) raises no event: its bytes keep their order with
print() output only to within that short delay.

Writes are lock-free under the GIL (list.append, a slice copy and a slice delete are each
atomic), so a print() costs a few attribute look-ups and no system call.
"""

from __future__ import annotations

import io
import os
import sys

from replchild.wire import T_STDOUT

TYPE_CHECKING = False  # typing costs ~10 ms to import; mypy honours this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

FLUSH_SIZE = 64 * 1024  # characters (or bytes) buffered before the writer delivers them itself
ENCODING = "utf-8"
ERRORS = "backslashreplace"  # never fails, so text can be encoded late, in one piece

# The functions that write to a descriptor around sys.stdout, and the ones that end the process
# without flushing: os and posix are wrapped so that pending output goes first.
WRAPPED = ("write", "writev", "sendfile", "splice", "_exit", "abort")
# Audit events after which another process (or a new program) may write to fds 1 and 2.
FLUSH_EVENTS = frozenset(
    (
        "subprocess.Popen",
        "os.system",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
    )
)

_write = os.write  # the real one, captured before install_flush_points wraps it


class Output:
    """What print() and friends wrote and nobody has delivered yet, in write order.

    Items are str (stdout text in the default encoding: the fast path) or (kind, bytes).
    `flush` delivers everything (the runner sets it); `arm` asks for a flush soon.
    """

    def __init__(self, wake_fd: int) -> None:
        self.parts: list[str | tuple[int, bytes]] = []
        self.size = 0  # roughly what parts hold; races between threads only make it early
        self.armed = False  # a delayed flush is asked for; only its taker resets this
        self.wake_fd = wake_fd
        self.flush: Callable[[], None] = self.flush_to_fds
        self._fd_lock: Any = None

    def __repr__(self) -> str:
        return f"<Output items={len(self.parts)} size={self.size} armed={self.armed}>"

    def arm(self) -> None:
        """Ask the forwarder thread for a flush after a short delay."""
        self.armed = True
        try:
            _write(self.wake_fd, b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed by user code
            pass

    def append(self, kind: int, data: bytes) -> None:
        """Buffer bytes for stream `kind`."""
        self.parts.append((kind, data))
        self.size += len(data)
        if self.size >= FLUSH_SIZE:
            self.flush()
        elif not self.armed:
            self.arm()

    def take(self) -> list[tuple[int, bytes]]:
        """Remove what is buffered and return it as (kind, data) runs; the caller delivers
        them before any later take() is delivered."""
        parts = self.parts
        n = len(parts)
        if not n:
            return []
        chunk = parts[:n]
        del parts[:n]  # items appended since len() stay, for the next take
        self.size = 0
        try:
            return [(T_STDOUT, "".join(chunk).encode(ENCODING, ERRORS))]  # type: ignore[arg-type]
        except TypeError:  # not only default stdout text: group item by item
            pass
        runs: list[tuple[int, bytes]] = []
        text: list[str] = []
        for item in chunk:
            if item.__class__ is str:
                text.append(item)
                continue
            if text:
                _add_run(runs, T_STDOUT, "".join(text).encode(ENCODING, ERRORS))
                text = []
            _add_run(runs, *item)
        if text:
            _add_run(runs, T_STDOUT, "".join(text).encode(ENCODING, ERRORS))
        return runs

    def flush_to_fds(self) -> None:
        """Write what is buffered to fds 1 and 2 (a process without the protocol: a fork)."""
        if self._fd_lock is None:
            import _thread

            self._fd_lock = _thread.allocate_lock()
        with self._fd_lock:
            for kind, data in self.take():
                view = memoryview(data)
                fd = 1 if kind == T_STDOUT else 2
                while view:
                    try:
                        view = view[_write(fd, view) :]
                    except InterruptedError:
                        continue
                    except OSError:  # fd closed or broken: nowhere left to write
                        break

    def forked(self) -> None:
        """In a copy made by os.fork(): what is buffered is the parent's to deliver; from now
        on every write goes straight to fds 1 and 2."""
        import _thread

        self.parts.clear()
        self.size = 0
        self._fd_lock = _thread.allocate_lock()  # the parent's may have been held at the fork
        self.flush = self.flush_to_fds
        self.arm = self.flush_to_fds  # type: ignore[method-assign]


def _add_run(runs: list[tuple[int, bytes]], kind: int, data: bytes) -> None:
    if runs and runs[-1][0] == kind:
        runs[-1] = (kind, runs[-1][1] + data)
    else:
        runs.append((kind, data))


class TextWriter(io.TextIOBase):
    """sys.stdout or sys.stderr: text into the session's Output."""

    def __init__(self, output: Output, kind: int, *, line_buffering: bool = False) -> None:
        self._out = output
        self._kind = kind
        self._fd = 1 if kind == T_STDOUT else 2
        self._encoding = ENCODING
        self._errors = ERRORS
        self._line_buffering = line_buffering
        self._write_through = False
        self._closed = False
        self._detached = False
        self._fast = False
        self._update_fast()
        self.buffer = BinaryWriter(self)

    def __repr__(self) -> str:
        name = "<stdout>" if self._kind == T_STDOUT else "<stderr>"
        return f"<replchild.output.TextWriter name='{name}' encoding='{self._encoding}'>"

    def _update_fast(self) -> None:
        # Only stdout text in the default codec, with no flush per line or write, is kept as
        # str and encoded late; anything else is encoded (and fails, if it must) right here.
        self._fast = (
            self._kind == T_STDOUT
            and not (self._closed or self._detached or self._line_buffering)
            and not self._write_through
            and (self._encoding, self._errors) == (ENCODING, ERRORS)
        )

    def write(self, s: str) -> int:
        """Buffer `s`; return its length."""
        if self._fast and s.__class__ is str:
            out = self._out
            n = len(s)
            out.parts.append(s)
            out.size += n
            if out.size >= FLUSH_SIZE:
                out.flush()
            elif not out.armed:
                out.arm()
            return n
        return self._write_slow(s)

    def _write_slow(self, s: str) -> int:
        self._check_open()
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self._out.append(self._kind, s.encode(self._encoding, self._errors))
        if self._write_through or (self._line_buffering and ("\n" in s or "\r" in s)):
            self._out.flush()
        return len(s)

    def _check_open(self) -> None:
        if self._detached:
            raise ValueError("underlying buffer has been detached")
        if self._closed:
            raise ValueError("I/O operation on closed file.")

    def flush(self) -> None:
        """Deliver everything buffered, of both streams (they share one order)."""
        self._check_open()
        self._out.flush()

    def close(self) -> None:
        if not self._closed:
            try:
                self._out.flush()
            finally:
                self._closed = True
                self._update_fast()

    @property
    def closed(self) -> bool:
        return self._closed or self._detached

    def detach(self) -> BinaryWriter:  # type: ignore[override]
        """Hand over the binary stream; this text layer is unusable afterwards."""
        self.flush()
        self._detached = True
        self._update_fast()
        return self.buffer

    def reconfigure(
        self,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        line_buffering: bool | None = None,
        write_through: bool | None = None,
    ) -> None:
        """As TextIOWrapper.reconfigure; only the newline of the default ("\\n") is kept."""
        if newline not in (None, "", "\n"):
            raise io.UnsupportedOperation(f"newline={newline!r} is not supported here")
        if encoding is not None:
            import codecs

            encoding = codecs.lookup(encoding).name
        self.flush()
        if encoding is not None:
            self._encoding = encoding
            self._errors = errors or "strict"
        elif errors is not None:
            self._errors = errors
        if line_buffering is not None:
            self._line_buffering = bool(line_buffering)
        if write_through is not None:
            self._write_through = bool(write_through)
        self._update_fast()

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        self._check_open()
        return False

    def writable(self) -> bool:
        self._check_open()
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding

    @property
    def errors(self) -> str:  # type: ignore[override]
        return self._errors

    @property
    def newlines(self) -> None:  # type: ignore[override]
        return None

    @property
    def line_buffering(self) -> bool:
        return self._line_buffering

    @property
    def write_through(self) -> bool:
        return self._write_through

    @property
    def name(self) -> str:
        return "<stdout>" if self._kind == T_STDOUT else "<stderr>"

    @property
    def mode(self) -> str:
        return "w"


class BinaryWriter(io.BufferedIOBase):
    """sys.stdout.buffer: bytes into the same Output, in order with the text."""

    def __init__(self, text: TextWriter) -> None:
        self._text = text

    def __repr__(self) -> str:
        return f"<replchild.output.BinaryWriter name={self._text.name!r}>"

    def write(self, b: Any) -> int:
        """Buffer a bytes-like object; return its size in bytes."""
        if self._text._closed:
            raise ValueError("write to closed file")
        data = memoryview(b).tobytes()
        self._text._out.append(self._text._kind, data)
        return len(data)

    def flush(self) -> None:
        if self._text._closed:
            raise ValueError("flush of closed file")
        self._text._out.flush()

    def close(self) -> None:
        self._text.close()

    @property
    def closed(self) -> bool:
        return self._text._closed

    def fileno(self) -> int:
        return self._text._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return self._text.name

    @property
    def mode(self) -> str:
        return "wb"


def install_flush_points(output: Output) -> None:
    """Flush pending output before anything that can write around it or end the process."""
    import posix

    def flushing(function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if output.parts:
                output.flush()
            return function(*args, **kwargs)

        wrapper.__name__ = wrapper.__qualname__ = function.__name__
        wrapper.__module__ = function.__module__
        wrapper.__doc__ = function.__doc__
        wrapper.__wrapped__ = function  # type: ignore[attr-defined]
        return wrapper

    for name in WRAPPED:
        function = getattr(posix, name, None)
        if function is not None:
            wrapped = flushing(function)
            setattr(posix, name, wrapped)
            setattr(os, name, wrapped)

    flush_events = FLUSH_EVENTS

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if output.parts and (
            event in flush_events or (event == "open" and args[0].__class__ is int)
        ):
            output.flush()

    sys.addaudithook(audit)
