"""sys.stdout and sys.stderr of a session: print() output buffered in write order, delivered
in bursts, and flushed before anything else can write to fds 1 and 2.

sys.stdout is an io.TextIOWrapper, as in any Python, whose pending text is handed down in
chunks with C's list.append into one Output: a print() costs what it costs in Python (C
code, no Python frame, no system call). sys.stderr is a text writer of ours that appends to
the same Output after draining what the wrapper still holds, so stdout and stderr keep the
order they were written in (two pipes cannot: their reader sees two queues). The runner
delivers the Output as frames straight onto the protocol pipe, after whatever fds 1 and 2
hold: a short delay after the first write (the forwarder thread's timer), at 64 KiB of
big writes (counted: see StdoutText), on an explicit flush, a completion, and before every
writer that goes around Python's streams and that
Python lets us see -- os.write and os.writev, subprocesses, os.system, spawns, forks,
execs, os._exit, os.abort, a kill of ourselves, a file opened on fd 1 or 2. While a
delivery waits for the server to read (backpressure), every write checks the size of what
is buffered and, past a bound, waits for that delivery.

No Python code runs inside the wrapper's own write (its chunks go to a C method): CPython
3.11's TextIOWrapper.write corrupts its buffer when a write re-enters it from there (a
signal handler that prints while the chunk is handed down).

Two limits, both of timing, never of order within Python's streams: C code writing to fd 1
or 2 by itself (a ctypes call, an extension module) raises no event, so its bytes keep
their order with print() output only to within that short delay; and the delay is started
by the first write after a delivery, which goes through a Python-level `write` put in front
of the wrapper's: a `write = sys.stdout.write` saved while output was already waiting
bypasses it, and what it writes then goes out with the next print(), flush point or the
completion.

Writes are lock-free under the GIL (list.append, a slice copy and a slice delete are each
atomic).
"""

from __future__ import annotations

import io
import os
import sys
from _thread import get_ident

from replchild.wire import T_STDERR, T_STDOUT

TYPE_CHECKING = False  # typing costs ~10 ms to import; mypy honours this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

FLUSH_SIZE = 64 * 1024  # bytes of big or Python-level writes before the writer delivers them
# A write of at least this many characters is counted (and delivered at FLUSH_SIZE) by the
# Python-level write in front of the wrapper, which then stays: only smaller writes run at
# the wrapper's C speed, and what those buffer between two delayed flushes is bounded by
# the time they take (see StdoutText).
BIG_WRITE = 256
# While a delivery waits for the server, a write waits too once this many chunks (the
# wrapper hands down about 8 KiB at a time) are buffered.
THROTTLE_CHUNKS = 32
ENCODING = "utf-8"
ERRORS = "backslashreplace"  # never fails, as Python's own stdout and stderr

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
_text_write = io.TextIOWrapper.write
_text_flush = io.TextIOWrapper.flush


class Output:
    """What print() and friends wrote and nobody has delivered yet, in write order.

    Items are bytes (stdout) or (kind, bytes). `flush` delivers everything (the runner sets
    it); `arm` asks for a flush soon. What sys.stdout's wrapper still holds is part of it:
    every reader drains the wrapper first.
    """

    def __init__(self, wake_fd: int) -> None:
        # Never rebound: the stdout wrapper appends to this very list.
        self.parts: list[bytes | tuple[int, bytes]] = []
        self.size = 0  # roughly what writes around the wrapper added since the last take
        self.armed = False  # a delayed flush is asked for; only its taker resets this
        self.throttled = False  # a delivery waits for the server: writes check the size
        self.wake_fd = wake_fd
        self.flush: Callable[[], None] = self.flush_to_fds
        self.stdout: StdoutText | None = None  # the session's current sys.stdout
        self._fd_lock: Any = None
        self._fd_owner = 0  # thread holding _fd_lock

    def __repr__(self) -> str:
        return (
            f"<Output items={len(self.parts)} size={self.size} armed={self.armed}"
            f" throttled={self.throttled}>"
        )

    def flush_pending(self) -> None:
        """Deliver what is buffered, if anything is: a flush point's check. Not armed, the
        wrapper may still hold text (its own write, called directly, arms nothing)."""
        if not self.armed:
            self.drain()
            if not self.parts:
                return
        self.flush()

    def arm(self) -> None:
        """Ask the forwarder thread for a flush after a short delay."""
        self.armed = True
        try:
            _write(self.wake_fd, b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed by user code
            pass

    def disarm(self) -> None:
        """The delayed flush is being taken: the next write asks for another one."""
        self.armed = False
        if self.stdout is not None:
            self.stdout.watch()

    def throttle(self, on: bool) -> None:
        """A delivery waits for the server (on), or no longer does."""
        self.throttled = on
        if on and self.stdout is not None:
            self.stdout.watch()

    def drain(self) -> None:
        """Move what sys.stdout's wrapper holds into parts, without delivering it."""
        if self.stdout is not None:
            self.stdout.drain()

    def append(self, kind: int, data: bytes) -> None:
        """Buffer bytes for stream `kind`, after what stdout's wrapper holds."""
        self.drain()
        self.parts.append(data if kind == T_STDOUT else (kind, data))
        self.size += len(data)
        if self.size >= FLUSH_SIZE:
            self.flush()
        elif not self.armed:
            self.arm()

    def take(self) -> list[tuple[int, list[bytes]]]:
        """Remove what is buffered and return it as runs of one stream, (kind, its pieces);
        the caller delivers them before any later take() is delivered."""
        self.drain()
        parts = self.parts
        n = len(parts)
        if not n:
            return []
        chunk = parts[:n]
        del parts[:n]  # items appended since len() stay, for the next take
        self.size = 0
        runs: list[tuple[int, list[bytes]]] = []
        current = -1
        for item in chunk:
            if isinstance(item, tuple):
                kind, data = item
            else:
                kind, data = T_STDOUT, item
            if kind != current:
                runs.append((kind, []))
                current = kind
            runs[-1][1].append(data)
        return runs

    def flush_to_fds(self) -> None:
        """Write what is buffered to fds 1 and 2 (a process without the protocol: a fork)."""
        me = get_ident()
        if self._fd_owner == me:  # a write made while this thread flushes: it waits
            return
        if self._fd_lock is None:
            import _thread

            self._fd_lock = _thread.allocate_lock()
        with self._fd_lock:
            self._fd_owner = me
            try:
                for kind, chunks in self.take():
                    view = memoryview(b"".join(chunks))
                    fd = 1 if kind == T_STDOUT else 2
                    while view:
                        try:
                            view = view[_write(fd, view) :]
                        except InterruptedError:
                            continue
                        except OSError:  # fd closed or broken: nowhere left to write
                            break
            finally:
                self._fd_owner = 0

    def forked(self) -> None:
        """In a copy made by os.fork(): what is buffered is the parent's to deliver; from now
        on every write goes straight to fds 1 and 2."""
        import _thread

        self.flush = self.arm = _nothing  # type: ignore[method-assign]
        self.drain()  # the parent's, as the rest
        self.parts.clear()
        self.size = 0
        self.throttled = False
        self._fd_lock = _thread.allocate_lock()  # the parent's may have been held at the fork
        self._fd_owner = 0
        self.flush = self.flush_to_fds
        self.arm = self._flush_and_watch  # type: ignore[method-assign]
        self.disarm()

    def _flush_and_watch(self) -> None:
        self.flush_to_fds()
        self.disarm()


def _nothing() -> None:
    pass


class _Sink:
    """What the stdout wrapper writes to: its chunks go into the Output with C's
    list.append (no Python frame, so no signal handler, runs inside the wrapper's write);
    flush delivers, except while the Output drains the wrapper."""

    def __init__(self, output: Output) -> None:
        self.write = output.parts.append
        self.closed = False
        self.draining = 0  # thread draining the wrapper: its flush of us must not deliver
        self._out = output

    def flush(self) -> None:
        if self.draining != get_ident() and not self.closed:
            self._out.flush()

    def close(self) -> None:
        self.closed = True

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return False

    name = "<stdout>"


class StdoutText(io.TextIOWrapper):
    """sys.stdout: Python's TextIOWrapper over the session's Output.

    `watch` puts a Python-level write in front of the wrapper's own (an instance attribute
    wins over the type's method): the first small write after a delayed flush arms the next
    one and removes it again, so that the small writes after it cost only the wrapper's C
    code. It stays for big writes (counting them) and while a delivery waits for the server
    (`Output.throttled`, checking how much is buffered).

    How much the small writes buffer is bounded by time: the forwarder takes it at its next
    delayed flush, which waits at most for the interpreter's switch interval (5 ms) when the
    printing thread holds the GIL -- measured, a stalled client and 400,000 100-byte
    print()s took the child's peak RSS from 10.3 to 13.5-17.2 MB, where the Python-level
    writer of before kept it at 10.3 (1 KB lines and 1 MB strings, which are counted: 10.3
    and 12.2 MB, against 10.3 and 14.6 before).
    """

    def __init__(self, output: Output) -> None:
        self._sink = _Sink(output)
        super().__init__(self._sink, encoding=ENCODING, errors=ERRORS, newline="\n")  # type: ignore[arg-type]
        self._out = output
        self._binary = StdoutBuffer(self, output, self._sink)
        self.mode = "w"  # type: ignore[misc]  # as Python sets it on its own std streams

    @property
    def buffer(self) -> StdoutBuffer:  # type: ignore[override]
        """The binary layer user code sees: its writes come after the wrapper's text."""
        return self._binary

    def detach(self) -> StdoutBuffer:  # type: ignore[override]
        """Hand over the binary stream; this text layer is unusable afterwards."""
        super().detach()
        return self._binary

    def drain(self) -> None:
        """Have the wrapper hand its pending text to the Output, without delivering it."""
        sink = self._sink
        holder, sink.draining = sink.draining, get_ident()
        try:
            _text_flush(self)
        except ValueError:  # closed or detached: it holds nothing
            pass
        finally:
            sink.draining = holder

    def watch(self) -> None:
        """Have the next write arm a delayed flush (and check the size, while throttled)."""
        self.__dict__["write"] = self._checked_write

    def _checked_write(self, s: str) -> int:
        out = self._out
        n = _text_write(self, s)
        if n >= BIG_WRITE:
            out.size += n
            if out.size >= FLUSH_SIZE:
                out.flush()
        elif out.throttled:
            if len(out.parts) >= THROTTLE_CHUNKS:
                out.flush()  # waits for the delivery under way, then delivers these
        elif s != "\n":  # print()'s second write: the first one decided
            self.__dict__.pop("write", None)
        if not out.armed:
            out.arm()
        return n


class StdoutBuffer(io.BufferedIOBase):
    """sys.stdout.buffer: bytes into the same Output, after the wrapper's text."""

    def __init__(self, text: StdoutText, output: Output, sink: _Sink) -> None:
        self._text = text
        self._out = output
        self._sink = sink

    def __repr__(self) -> str:
        return "<replchild.output.StdoutBuffer name='<stdout>'>"

    def write(self, b: Any) -> int:
        """Buffer a bytes-like object; return its size in bytes."""
        if self._sink.closed:
            raise ValueError("write to closed file")
        data = memoryview(b).tobytes()
        self._out.append(T_STDOUT, data)
        return len(data)

    def flush(self) -> None:
        if self._sink.closed:
            raise ValueError("flush of closed file")
        self._out.flush()

    def close(self) -> None:
        if not self._sink.closed:
            try:
                self._out.flush()
            finally:
                self._sink.close()

    @property
    def closed(self) -> bool:
        return self._sink.closed

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return "<stdout>"

    @property
    def mode(self) -> str:
        return "wb"


def stdout_stream(output: Output) -> StdoutText:
    """A new sys.stdout writing into `output`, and the one the Output drains from now on."""
    text = StdoutText(output)
    output.stdout = text
    text.watch()
    return text


class TextWriter(io.TextIOBase):
    """sys.stderr: text into the session's Output, after what stdout holds. Line-buffered,
    as Python's: a line is delivered as soon as it is written."""

    def __init__(self, output: Output) -> None:
        self._out = output
        self._encoding = ENCODING
        self._errors = ERRORS
        self._line_buffering = True
        self._write_through = False
        self._closed = False
        self._detached = False
        self.buffer = BinaryWriter(self)

    def __repr__(self) -> str:
        return f"<replchild.output.TextWriter name='<stderr>' encoding='{self._encoding}'>"

    def write(self, s: str) -> int:
        """Buffer `s`; return its length."""
        self._check_open()
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self._out.append(T_STDERR, s.encode(self._encoding, self._errors))
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

    @property
    def closed(self) -> bool:
        return self._closed or self._detached

    def detach(self) -> BinaryWriter:  # type: ignore[override]
        """Hand over the binary stream; this text layer is unusable afterwards."""
        self.flush()
        self._detached = True
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

    def fileno(self) -> int:
        return 2

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
        return "<stderr>"

    @property
    def mode(self) -> str:
        return "w"


class BinaryWriter(io.BufferedIOBase):
    """sys.stderr.buffer: bytes into the same Output, in order with the text."""

    def __init__(self, text: TextWriter) -> None:
        self._text = text

    def __repr__(self) -> str:
        return "<replchild.output.BinaryWriter name='<stderr>'>"

    def write(self, b: Any) -> int:
        """Buffer a bytes-like object; return its size in bytes."""
        if self._text._closed:
            raise ValueError("write to closed file")
        data = memoryview(b).tobytes()
        self._text._out.append(T_STDERR, data)
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
        return 2

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
            output.flush_pending()
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
        if event in flush_events or (event == "open" and args[0].__class__ is int):
            output.flush_pending()

    sys.addaudithook(audit)
