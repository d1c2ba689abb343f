"""One replserver session: runs code in a persistent namespace, speaking frames over two pipes.

The server starts this script with its stdin and stdout as the protocol pipes. At start-up
they are moved to close-on-exec descriptors out of the user's reach; fd 0 becomes /dev/null,
and fds 1 and 2 become pipes whose other ends are read here and forwarded as frames. That
captures everything written to fd 1 and 2 -- print, os.write, C code, subprocesses -- and
keeps it from ever touching the protocol stream.

Stdlib only, and as few imports as possible: every session pays for them at start-up.
It must not import the server package (aiohttp and friends) into the user's process: the
frame format comes from replchild/wire.py, which replserver/protocol.py uses too, and main()
takes our modules out of sys.modules before any user code runs.

Beyond output, the runner gives user code what a REPL gives: the value of a final expression
(sys.displayhook, kept in `_`), rich displays of objects that follow IPython's `_repr_*_`
convention (`display()` is a builtin), input() and getpass answered through the stream, and
matplotlib figures as PNG displays. Those live in replchild/repl.py, built on this file's
frame channel.
"""

from __future__ import annotations

# The C modules, not `threading` and `signal`: those two pull in enum and friends, about
# 1.3 MB of memory in every session for nothing this file needs.
import _signal
import _thread
import ctypes
import fcntl
import os
import resource
import select
import sys

# The modules every child loads on its way to ready (REPL_PRELOAD and startup code aside)
# are imported here, at the top: a fork server that imports this file then holds them once
# for all its children (their pages shared until written) instead of each child loading
# its own copy. The AST node classes (about 180 KB, made by the first compile()) come
# with _ast.
from _ast import Expr, Interactive

import replchild as _PACKAGE
from replchild import output, repl, wire
from replchild.output import Output, TextWriter, install_flush_points, stdout_stream
from replchild.repl import Repl
from replchild.wire import (
    FLAG_INPUT,
    FLAG_REAP,
    HEADER,
    HEADER_SIZE,
    INPUT,
    INPUT_VALUE,
    PIECE_BYTES,
    REASON_EXCEPTION,
    REASON_EXIT,
    REASON_INTERRUPTED,
    REASON_MEMORY,
    REASON_OK,
    SAVE,
    T_ANSWER,
    T_EXEC,
    T_FATAL,
    T_INPUT_REPLY,
    T_LOAD,
    T_LOADED,
    T_PIECE,
    T_QUERY,
    T_READY,
    T_SAVE,
    T_SAVED,
    T_STARTUP,
    T_STDERR,
    T_STDOUT,
    encode,
    encode_done,
    encode_input_request,
)

TYPE_CHECKING = False  # typing costs ~10 ms to import; mypy honours this name
if TYPE_CHECKING:
    import traceback
    from collections.abc import Callable
    from types import ModuleType
    from typing import NoReturn

    Answer = Callable[[bytes, dict[str, object]], bytes]  # replchild.complete.answer

DEFAULT_MAX_FRAME = 8 * 1024 * 1024
DEFAULT_MAX_RESULT = 100_000
READ_CHUNK = 256 * 1024  # bytes of a pipe read, and the payload of an output frame at most
IOV_MAX = 1024  # buffers one writev takes (Linux's UIO_MAXIOV)
BULK_PIPE_SIZE = 1024 * 1024  # the protocol pipe's size once output flows in bulk
BURST_WINDOW_S = 0.002
BULK_BYTES = 64 * 1024  # a forward this large means output is flowing in bulk
# After the first print() into an empty buffer, the forwarder delivers what has gathered this
# much later: a loop of print() then sleep() still streams within milliseconds, and a tight
# print() loop sends at most ~1,000 frames a second (64 KiB ones, mostly: FLUSH_SIZE).
FLUSH_DELAY_S = 0.001
PyCF_ONLY_AST = 0x400  # compile() flag (ast.PyCF_ONLY_AST) without importing ast
PR_SET_DUMPABLE = 4  # prctl option, from <linux/prctl.h>
SMALL_WRITE = 4096

NO_INPUT_MESSAGE = (
    "input() is not available in /execute or a protocol 1 stream:"
    ' use /execute-stream with "protocol": 2 to answer it'
)

# Frames of these files are left out of the tracebacks user code sees.
RUNNER_FILES = frozenset((__file__, output.__file__, repl.__file__, wire.__file__))

_write_fd = os.write  # the real one: install_flush_points wraps os.write for user code
_writev_fd = os.writev  # and os.writev


class Runner:
    """The session's interpreter state and the loop serving execute requests."""

    def __init__(
        self,
        proto_in: int,
        proto_out: int,
        max_frame: int,
        usage: Usage,
        output_fds: str = "",
        max_result: int = DEFAULT_MAX_RESULT,
    ) -> None:
        self.proto_in = proto_in
        self.proto_out = proto_out
        self.max_frame = max_frame
        self.count = 0
        self.running = False  # SIGINT raises KeyboardInterrupt only while user code runs
        # While the main thread moves a frame in or out, a SIGINT is held back (a frame cut
        # in half would desynchronise the protocol) and raised right after.
        self.deferring = False
        self.interrupted = False
        self.forked = False  # True in a process user code made with os.fork()
        self.usage = usage
        self.main_thread = _thread.get_ident()
        self.inbuf = bytearray()  # request bytes read but not yet consumed
        self.input_allowed = False  # FLAG_INPUT of the execution in progress
        self.input_number = 0
        self.executing = False  # from an execution's start to its completion frame
        os.register_at_fork(after_in_child=self._after_fork)
        self.sources: dict[str, str] = {}
        self.answer: Answer | None = None  # replchild.complete.answer, loaded by the first query
        self.startup_error = ""  # the startup code's traceback, for the first execution
        self.workdir = os.getcwd()  # whose files a snapshot carries
        self.pieces: list[bytes] = []  # of a snapshot to restore, as the server sends them
        self.lock = _thread.allocate_lock()  # one writer of frames at a time, and drain order
        self.lock_owner = 0  # thread holding self.lock, so that a write made meanwhile waits
        self.module = type(sys)("__main__")
        self.module.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = self.module
        if output_fds:
            # The server made the output pipes and keeps a copy of their read ends, so
            # that what is still in them when this process dies (os._exit, a crash) can
            # be delivered all the same.
            self.out_r, self.out_w, self.err_r, self.err_w = map(int, output_fds.split(","))
            for fd in (self.out_r, self.out_w, self.err_r, self.err_w):
                os.set_inheritable(fd, False)
            self._tune(self.out_r, self.out_w)
            self._tune(self.err_r, self.err_w)
        else:
            self.out_r, self.out_w = self._tune(*os.pipe())
            self.err_r, self.err_w = self._tune(*os.pipe())
        # What fds 1 and 2 hold is delivered before buffered print() output: one poll says
        # whether there is any.
        self.pending_fds = select.poll()
        self.pending_fds.register(self.out_r, select.POLLIN)
        self.pending_fds.register(self.err_r, select.POLLIN)
        self.wake_r, self.wake_w = os.pipe()  # close-on-exec; a write asks for a flush
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.output = Output(self.wake_w)
        self.output.flush = self.flush_output
        import fcntl

        self._ioctl = fcntl.ioctl
        self._fionread = 0  # termios.FIONREAD, imported by the first delivery
        self.pipe_grown = False  # see _grow_pipe
        try:
            self.pipe_size = fcntl.fcntl(proto_out, fcntl.F_GETPIPE_SZ)
        except OSError:  # not a pipe: any write may block
            self.pipe_size = 0
        self._install_std_fds()
        self.repl = Repl(
            self.module,
            send=self.send_in_order,
            ask=self.read_input,
            report=self.report,
            write_stderr=self.write_stderr,
            max_frame=max_frame,
            max_result=max_result,
        )
        self.repl.install_hooks()

    # --- descriptors ------------------------------------------------------------------------
    @staticmethod
    def _tune(r: int, w: int) -> tuple[int, int]:
        # Both ends close-on-exec; fds 1/2 get inheritable copies via dup2.
        os.set_blocking(r, False)
        try:  # a larger pipe means fewer stalls of a writing loop between forwarder wake-ups
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError:
            pass
        return r, w

    def _install_std_fds(self) -> None:
        """Point fds 0/1/2 at /dev/null and the output pipes; rebuild sys.std* on them."""
        self.null_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(self.null_r, 0)
        os.dup2(self.out_w, 1)
        os.dup2(self.err_w, 2)
        # print() output is buffered and goes to the protocol pipe, not to fds 1 and 2: see
        # replchild/output.py for how it keeps its order with what is written to them.
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = self.stdout = stdout_stream(self.output)
        sys.stderr = self.stderr = TextWriter(self.output)
        # sys.__stdout__ and friends are what code restores after redirecting: make them ours.
        sys.__dict__.update(__stdin__=sys.stdin, __stdout__=sys.stdout, __stderr__=sys.stderr)
        self.std_targets = [
            (fd, target, _identity(target))
            for fd, target in ((0, self.null_r), (1, self.out_w), (2, self.err_w))
        ]

    def _restore_std_fds(self) -> None:
        """Undo what user code did to fds 0/1/2 and sys.std* (closed them, say): exit()
        closes sys.stdin, and input() must still fail with EOFError afterwards."""
        # One fstat per descriptor against identities taken at start-up (sameopenfile would
        # stat both sides each time): the targets are ours and never change.
        for fd, target, identity in self.std_targets:
            try:
                st = os.fstat(fd)
                same = (st.st_dev, st.st_ino) == identity
            except OSError:
                same = False
            if not same:
                os.dup2(target, fd)
        if _unusable(sys.stdin):
            sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        if _unusable(sys.stdout):
            sys.stdout = self.stdout = stdout_stream(self.output)
        if _unusable(sys.stderr):
            sys.stderr = self.stderr = TextWriter(self.output)

    # --- frames out -------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        # A write the pipe has no room for waits until the server reads: print() calls are
        # told to wait too meanwhile (Output.throttle), rather than buffer without bound. A
        # small write of the main thread is not checked (it is the one printing, and the
        # syscall would cost every execution's completion).
        self._writev([data], len(data))

    def _writev(self, pieces: list[bytes | memoryview], size: int) -> None:
        """Write `pieces` (`size` bytes in all) in order, without joining them (see _write)."""
        small = size <= SMALL_WRITE and _thread.get_ident() == self.main_thread
        if size >= READ_CHUNK and not self.pipe_grown:
            self._grow_pipe()
        blocks = not small and size > self._pipe_room()
        if blocks:
            self.output.throttle(True)
        try:
            first = 0
            while first < len(pieces):
                batch = pieces[first : first + IOV_MAX]
                written = _writev_fd(self.proto_out, batch)
                for piece in batch:  # skip what went out; the rest of a piece stays
                    if written < len(piece):
                        pieces[first] = memoryview(piece)[written:]
                        break
                    written -= len(piece)
                    first += 1
        finally:
            if blocks:
                self.output.throttle(False)

    def _grow_pipe(self) -> None:
        """Output flows in bulk: a larger protocol pipe lets the server read it in fewer,
        larger reads. Done at the first bulk delivery only, so that sessions that never
        print much do not hold pipe memory (a user's pipes share one budget of pages)."""
        import fcntl

        self.pipe_grown = True  # tried, at least: not again
        try:
            self.pipe_size = fcntl.fcntl(self.proto_out, fcntl.F_SETPIPE_SZ, BULK_PIPE_SIZE)
        except OSError:  # over the user's budget, or not a pipe: it keeps the size it has
            pass

    def _pipe_room(self) -> int:
        """Bytes the protocol pipe takes now without blocking (its size less what it holds)."""
        if not self._fionread:
            from termios import FIONREAD

            self._fionread = FIONREAD
        queued = bytearray(4)
        try:
            self._ioctl(self.proto_out, self._fionread, queued)
        except OSError:
            return 0
        return self.pipe_size - int.from_bytes(queued, sys.byteorder)

    def send(self, kind: int, payload: bytes) -> None:
        with self.lock:
            self._write(encode(kind, payload))

    def send_in_order(self, kind: int, payload: bytes) -> bool:
        """Send a frame from user code: after all output written before it, and whole.
        False in a copy made by os.fork(), which has no protocol pipes."""
        return self._send_frame_in_order(encode(kind, payload))

    def _send_frame_in_order(self, frame: bytes) -> bool:
        self._flush_replaced_streams()
        if self.forked:
            self.output.flush()
            return False
        self._deliver(frame)
        return True

    def flush_output(self) -> None:
        """Deliver buffered print() output, after what fds 1 and 2 hold: from any thread."""
        self._deliver(b"")

    def _deliver(self, frame: bytes, *, ending: bool = False) -> None:
        """Under the lock: forward the pipes, then the buffered output, then `frame`; with
        `ending`, the execution ends before `frame` (its completion). Output is dropped
        between executions, as _forward_available drops it."""
        me = _thread.get_ident()
        if self.lock_owner == me:
            # A write made while this thread delivers (a __del__, a signal handler): it
            # stays buffered for the next delivery rather than deadlock on our own lock.
            return
        main = me == self.main_thread
        was_deferring = self.deferring
        if main:
            self.deferring = True
        try:
            with self.lock:
                self.lock_owner = me
                try:
                    self._forward_available(check=True)
                    runs = self.output.take()
                    # Frames of at most READ_CHUNK bytes whose payloads are the buffered
                    # pieces themselves: written with writev, never copied here.
                    pieces: list[bytes | memoryview] = []
                    size = 0
                    for kind, chunks in runs if self.executing else ():
                        size += _frame_pieces(pieces, kind, chunks)
                    if ending:
                        self.executing = False
                    if frame:
                        pieces.append(frame)
                        size += len(frame)
                    if pieces:
                        self._writev(pieces, size)
                finally:
                    self.lock_owner = 0
        finally:
            if main:
                self.deferring = was_deferring
        if main and not was_deferring:
            self._raise_deferred()

    def _flush_replaced_streams(self) -> None:
        # Streams user code put in place of ours (a file opened on fd 1, say) write to the fds.
        for stream in (sys.stdout, sys.stderr):
            if stream is not self.stdout and stream is not self.stderr:
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001 - user may have replaced or closed it
                    pass

    def _raise_deferred(self) -> None:
        if self.interrupted:
            self.interrupted = False
            if self.running:
                raise KeyboardInterrupt

    def _forward_available(self, *, check: bool = False) -> int:
        """Forward what the output pipes hold now; caller holds the lock. Bytes moved.
        With `check`, one poll first spares the reads of two empty pipes.

        Between executions it is read and dropped instead: the server takes every output
        frame after it sent an execution for that execution's output (README: Stray output).
        """
        moved = 0
        if check and not self.pending_fds.poll(0):
            return 0
        for fd, kind in ((self.out_r, T_STDOUT), (self.err_r, T_STDERR)):
            while True:
                try:
                    data = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    break
                if not data:
                    break
                if self.executing:
                    self._write(encode(kind, data))
                moved += len(data)
                if len(data) < READ_CHUNK:
                    break
        return moved

    def forwarder(self) -> None:
        """Thread: wait for output and forward it; exit the process when the server is gone."""
        from time import monotonic, sleep

        poller = select.poll()
        poller.register(self.out_r, select.POLLIN)
        poller.register(self.err_r, select.POLLIN)
        # Event mask 0 still reports POLLHUP: the server's end of our request pipe closed.
        poller.register(self.proto_in, 0)
        poller.register(self.wake_r, select.POLLIN)
        invalid = select.POLLERR | select.POLLNVAL
        last = 0.0
        moved = 0
        output = self.output
        while True:
            events = poller.poll()
            woken = piped = False
            for fd, mask in events:
                # Our request pipe hung up (the server is gone), or user code closed one of
                # our descriptors: either way this process can no longer do its job.
                hung_up = mask & select.POLLHUP and not mask & select.POLLIN
                if fd == self.proto_in or mask & invalid or hung_up:
                    self.server_gone()
                if fd == self.wake_r:
                    woken = True
                else:
                    piped = True
            if woken:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                sleep(FLUSH_DELAY_S)  # what is printed meanwhile goes in the same frame
                output.disarm()  # before the take: a write after it arms again
                self.flush_output()  # the pipes' bytes first
                last = monotonic()
                continue
            if not piped:
                continue
            # A write after a quiet spell goes out at once (no added latency); during a
            # burst, wait a moment so that one frame -- and one GIL hand-over -- carries
            # the output of many small writes instead of each of them.
            # Bulk output (big reads) coalesces by itself and must not depend on how soon
            # a sleep ends: only a burst of small writes waits.
            if moved < BULK_BYTES and monotonic() - last < BURST_WINDOW_S:
                sleep(BURST_WINDOW_S / 2)
            with self.lock:
                moved = self._forward_available()
            last = monotonic()

    @staticmethod
    def server_gone() -> None:
        """The server died or closed our pipe: take our whole process group with us."""
        try:
            os.killpg(0, 9)
        finally:
            os._exit(0)

    # --- frames in --------------------------------------------------------------------------
    def read_frame(self) -> tuple[int, bytes]:
        """The next request frame. While user code runs (an input wait) a SIGINT cuts the
        wait, and the bytes of a half-read frame stay in the buffer for the next call."""
        buf = self.inbuf
        while True:
            if len(buf) >= HEADER_SIZE:
                kind, size = HEADER.unpack_from(buf)
                if size > self.max_frame:
                    self.fatal(f"request frame of {size} bytes exceeds {self.max_frame}")
                end = HEADER_SIZE + size
                if len(buf) >= end:
                    payload = bytes(buf[HEADER_SIZE:end])
                    del buf[:end]
                    return kind, payload
                wanted = end - len(buf)
            else:
                wanted = HEADER_SIZE - len(buf)
            self._fill(max(wanted, 65536))

    def _fill(self, size: int) -> None:
        if not self.running:  # between executions: SIGINT does nothing, just block
            data = os.read(self.proto_in, size)
            if not data:
                self.server_gone()
            self.inbuf += data
            return
        select.select([self.proto_in], [], [])  # a KeyboardInterrupt may end the wait here
        self.deferring = True
        try:
            data = os.read(self.proto_in, size)  # readable: does not block
            self.inbuf += data
        finally:
            self.deferring = False
        if not data:
            self.server_gone()
        self._raise_deferred()

    def fatal(self, message: str) -> NoReturn:
        """Tell the server the protocol broke, and exit."""
        self.send(T_FATAL, message.encode())
        os._exit(2)

    def warm_up(self) -> None:
        """One execution through the whole path before reporting ready, leaving no trace.

        A fresh process's first execution pays ~1 ms of first-use costs (the parser's
        tables, page faults in the interpreter's code); a warm pool child should not hand
        them to the first request of a session. It sends no frame.
        """
        self.count = -1  # execute() makes it 0: finish() sends no completion frame for it
        self.execute("def _warm():\n    return repr(1)\n_warm()\ndel _warm", 0)
        self.sources.clear()

    def serve(self) -> None:
        self.warm_up()
        self.prepare_namespace()
        # What start-up wrote (fds 1 and 2, print()) goes before READY: dropped.
        self._deliver(encode(T_READY, str(os.getpid()).encode()))
        while True:
            kind, payload = self.read_frame()
            if kind == T_INPUT_REPLY:
                continue  # an answer that came after its execution ended (a stop): stale
            if kind == T_QUERY:
                self.answer_query(payload)
                continue
            if kind == T_PIECE:
                self.pieces.append(payload)
                continue
            if kind in (T_SAVE, T_LOAD):
                self.save(payload) if kind == T_SAVE else self.load()
                continue
            if kind != T_EXEC or not payload:
                self.fatal(f"unexpected frame type {kind:#x}")
            if payload[0] & FLAG_REAP:
                self.reap_zombies()
            self.execute(payload[1:].decode("utf-8", "surrogatepass"), payload[0])

    def prepare_namespace(self) -> None:
        """REPL_PRELOAD and REPL_STARTUP (replchild/startup.py), when the server set them."""
        preload = os.environ.pop("REPL_PRELOAD", "")
        startup = os.environ.pop("REPL_STARTUP_CODE", "")
        name = os.environ.pop("REPL_STARTUP", "") or "<startup>"
        if preload or startup:
            prepare = import_later("startup").prepare

            report, self.startup_error = prepare(preload, name, startup, self.module.__dict__)
            self.send(T_STARTUP, report)

    def answer_query(self, payload: bytes) -> None:
        """Answer a completion or inspection query (replchild/complete.py) from the namespace.
        It may run user code (__dir__, properties): a stop from the server interrupts it."""
        if self.answer is None:
            self.answer = import_later("complete").answer
        self.input_allowed = False  # no client could answer an input() of a query
        try:
            self.running = True
            try:
                reply = self.answer(payload, self.module.__dict__)
            finally:
                self.running = False
        except KeyboardInterrupt:
            reply = b'{"error": "interrupted"}'
        except Exception as exc:  # noqa: BLE001 - a broken query must not end the session
            import json

            reply = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
        self._deliver(encode(T_ANSWER, reply))  # output the query caused first (dropped)

    # --- snapshots (replchild/snapshot.py) --------------------------------------------------
    def save(self, payload: bytes) -> None:
        """Send a snapshot of the namespace and the working directory, then its summary.
        Pickling can run the session's code (__reduce__): its output is dropped, and it
        cannot ask for input."""
        self.input_allowed = False
        try:
            (limit,) = SAVE.unpack(payload)
            snapshot = import_later("snapshot")  # its cost only for sessions that are saved
            blob, summary = snapshot.save(self.module.__dict__, self.workdir, limit)
        except BaseException as exc:  # noqa: BLE001 - reported to the server, never fatal
            blob, summary = b"", {"error": f"{type(exc).__name__}: {exc}"}
        with self.lock:
            for start in range(0, len(blob), PIECE_BYTES):
                self._write(encode(T_PIECE, blob[start : start + PIECE_BYTES]))
            self._write(encode(T_SAVED, json_bytes(summary)))

    def load(self) -> None:
        """Restore the snapshot sent in pieces; report what came back and what did not."""
        self.input_allowed = False
        blob, self.pieces = b"".join(self.pieces), []
        snapshot = import_later("snapshot")
        try:
            report = snapshot.restore(blob, self.module.__dict__, self.workdir)
        except snapshot.Unusable as exc:
            report = {"error": f"the snapshot cannot be used: {exc}"}
        except BaseException as exc:  # noqa: BLE001 - reported to the server, never fatal
            report = {"error": f"{type(exc).__name__}: {exc}"}
        self.send(T_LOADED, json_bytes(report))

    @staticmethod
    def reap_zombies() -> None:
        """Collect our dead children that nobody waited for (a stopped fork loop leaves
        dozens): each zombie holds a slot of the session's process limit."""
        me = str(os.getpid()).encode()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if fields[:2] == [b"Z", me]:
                try:
                    os.waitpid(int(name), os.WNOHANG)
                except ChildProcessError:
                    pass

    # --- execution --------------------------------------------------------------------------
    def _after_fork(self) -> None:
        # A bare os.fork() copies this runner. The copy must never touch the protocol (a
        # second DONE frame, a second reader of requests): it loses the pipes now, and it
        # exits when the user code it is running finishes (see execute).
        self.forked = True
        self.output.forked()
        for fd in (self.proto_in, self.proto_out, self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def on_sigint(self, signum: int, frame: object) -> None:
        # Between executions an interrupt (a timeout racing the completion) has nothing to
        # stop; raising it then would break the serve loop instead of user code.
        if self.running:
            if self.deferring:
                self.interrupted = True
            else:
                raise KeyboardInterrupt

    def execute(self, code: str, flags: int = 0) -> None:
        with self.lock:
            # What was written while no execution ran (a background thread, a leftover
            # subprocess) is dropped now, before it could pass for this execution's output.
            # One poll instead of two reads of (usually) empty pipes.
            self._forward_available(check=True)
            self.output.take()  # print() output of the same kind: dropped too
            self.executing = True
        self.count += 1
        self.input_allowed = bool(flags & FLAG_INPUT)
        self.interrupted = False
        self._restore_std_fds()
        name = f"<cell-{self.count}>"
        if self.startup_error:  # REPL_STARTUP raised: the first reply's error says so
            self.write_stderr(self.startup_error.encode("utf-8", "backslashreplace"))
            self.startup_error = ""
        self.sources[name] = code
        return_code, reason, note = self._run(self._run_cell, code, name)
        if "matplotlib.pyplot" in sys.modules and not self.forked:
            # Figures the code left open are shown and closed, as in a notebook.
            flushed = self._run(self.repl.flush_figures)
            if return_code == 0:
                return_code, reason, note = flushed
        if self.forked:
            self._exit_forked(return_code)
        self.finish(return_code, reason, note)

    def _run(self, function: Callable[..., None], *args: str) -> tuple[int, int, str]:
        """Call user-facing work with SIGINT armed; report what it raised."""
        return_code, reason, note = 0, REASON_OK, ""
        self.usage.start()
        try:
            self.running = True
            try:
                function(*args)
            finally:
                self.running = False
        except SystemExit as exc:
            status = exc.code
            if status is not None and status != 0:
                return_code, reason = 1, REASON_EXIT
                note = f"SystemExit: {status}"
                self.write_stderr(f"{note}\n".encode("utf-8", "backslashreplace"))
        except BaseException as exc:  # noqa: BLE001 - everything user code raises is reported
            return_code = 1
            if isinstance(exc, KeyboardInterrupt):
                reason = REASON_INTERRUPTED
            elif isinstance(exc, MemoryError):
                reason = REASON_MEMORY
            else:
                reason = REASON_EXCEPTION
            self.report(exc)
        return return_code, reason, note

    def _run_cell(self, code: str, name: str) -> None:
        """Run `code` as a module body; a final expression statement goes to sys.displayhook,
        as in Python's REPL. Both parts are compiled before either runs."""
        namespace = self.module.__dict__
        tree = compile(code, name, "exec", PyCF_ONLY_AST, dont_inherit=True)
        body = tree.body
        if not body or type(body[-1]) is not Expr:
            exec(compile(tree, name, "exec", dont_inherit=True), namespace)
            return
        # 'single' mode is the REPL's: it calls sys.displayhook with the expression's value.
        last = compile(Interactive(body=[body.pop()]), name, "single", dont_inherit=True)
        if body:
            exec(compile(tree, name, "exec", dont_inherit=True), namespace)
        exec(last, namespace)

    def _exit_forked(self, status: int) -> None:
        self._flush_replaced_streams()
        self.output.flush()
        os._exit(status)

    def report(self, exc: BaseException) -> None:
        """Write the traceback to fd 2 without the runner's own frames."""
        import linecache
        import traceback

        for name, source in self.sources.items():
            if name not in linecache.cache:
                linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        try:
            summary = traceback.TracebackException(type(exc), exc, exc.__traceback__)
            _strip_runner_frames(summary, traceback.StackSummary)
            # With no user frame left (a SyntaxError from compile) format() prints no
            # "Traceback" header: exactly what Python's REPL shows, caret included.
            text = "".join(summary.format())
        except BaseException as fmt_exc:  # noqa: BLE001 - a broken __str__ must not kill us
            text = f"{type(exc).__name__} (traceback unavailable: {type(fmt_exc).__name__})\n"
        self.write_stderr(text.encode("utf-8", "backslashreplace"))

    def write_stderr(self, data: bytes) -> None:
        """Our own messages (tracebacks, notes) on the user's stderr, in order with it."""
        self._flush_replaced_streams()
        self.output.append(T_STDERR, data)
        self.output.flush()

    def read_input(self, prompt: bytes, password: bool) -> str:
        """Send an input request and wait for its answer (a stop ends the wait)."""
        if not self.input_allowed:
            raise EOFError(NO_INPUT_MESSAGE)
        if self.forked or _thread.get_ident() != self.main_thread:
            raise EOFError("input() can only be answered in the main thread of the session")
        self.input_number = number = (self.input_number + 1) & 0xFFFFFFFF
        self._send_frame_in_order(encode_input_request(number, prompt, password=password))
        while True:
            kind, payload = self.read_frame()
            if kind != T_INPUT_REPLY:
                self.fatal(f"unexpected frame type {kind:#x} while waiting for input")
            if len(payload) < INPUT.size:
                self.fatal(f"input reply of {len(payload)} bytes is too short")
            answered, status = INPUT.unpack_from(payload)
            if answered == number:
                break  # otherwise the answer to an earlier, interrupted request: stale
        if status != INPUT_VALUE:
            raise EOFError("no input: the client that could answer it went away")
        return payload[INPUT.size :].decode("utf-8", "surrogatepass")

    def finish(self, return_code: int, reason: int, note: str) -> None:
        """Forward every byte written so far, then the completion frame, in that order."""
        self._flush_replaced_streams()
        cpu_us, peak_rss = self.usage.stop()
        frame = encode_done(
            return_code,
            self.count,
            reason,
            cpu_us,
            peak_rss,
            note.encode("utf-8", "backslashreplace"),
        )
        # Not the warm-up's frame (count 0): the server's first frame is READY.
        self._deliver(frame if self.count else b"", ending=True)


def _frame_pieces(pieces: list[bytes | memoryview], kind: int, chunks: list[bytes]) -> int:
    """Append output frames of `kind` carrying `chunks` to `pieces` (a header, then the
    payload's pieces, slices of the chunks where a frame ends inside one); bytes added."""
    added = 0
    body: list[bytes | memoryview] = []
    size = 0
    for chunk in chunks:
        at, end = 0, len(chunk)
        while at < end:
            take = min(READ_CHUNK - size, end - at)
            body.append(chunk if take == end else memoryview(chunk)[at : at + take])
            size += take
            at += take
            if size == READ_CHUNK:
                pieces.append(HEADER.pack(kind, size))
                pieces.extend(body)
                added += HEADER_SIZE + size
                body, size = [], 0
    if size:  # never an empty frame: the server refuses those
        pieces.append(HEADER.pack(kind, size))
        pieces.extend(body)
        added += HEADER_SIZE + size
    return added


def _unusable(stream: object) -> bool:
    """Whether a sys.std* stream was removed or closed (or cannot even say)."""
    try:
        return stream is None or bool(getattr(stream, "closed", False))
    except Exception:  # noqa: BLE001 - whatever user code put there
        return True


def _strip_runner_frames(
    summary: traceback.TracebackException, stack_summary: type[traceback.StackSummary]
) -> None:
    """Remove the runner's frames (exec's caller, the SIGINT handler, the display hook) from
    a traceback, including those of chained exceptions and exception groups."""
    pending, seen = [summary], set[int]()
    while pending:
        te = pending.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        te.stack = stack_summary.from_list([f for f in te.stack if f.filename not in RUNNER_FILES])
        pending.extend(x for x in (te.__cause__, te.__context__) if x is not None)
        pending.extend(getattr(te, "exceptions", None) or ())


def _identity(fd: int) -> tuple[int, int]:
    """What makes an open file the same file: its device and inode."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def apply_limits(spec: str) -> None:
    """Set resource limits ("as=1073741824,nofile=1024,...") as both soft and hard limits."""
    if not spec:
        return
    for item in spec.split(","):
        name, _, value = item.partition("=")
        limit = int(value)
        resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (limit, limit))


class Usage:
    """CPU time and peak memory of one execution, for the completion frame (~8 us).

    The /proc/self files are opened before the process turns non-dumpable, after which they
    belong to root and could not be opened for writing.
    """

    def __init__(self) -> None:
        self._getrusage = resource.getrusage
        self._self, self._children = resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN
        try:
            self._status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
            self._clear_refs = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            self._status = self._clear_refs = -1
        self._cpu0 = 0.0

    def _cpu(self) -> float:
        mine, kids = self._getrusage(self._self), self._getrusage(self._children)
        return mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime

    def start(self) -> None:
        self._cpu0 = self._cpu()
        if self._clear_refs >= 0:
            try:
                os.write(self._clear_refs, b"5")  # reset the peak RSS (VmHWM) to now
            except OSError:
                pass

    def stop(self) -> tuple[int, int]:
        """(CPU microseconds, peak RSS bytes) since start()."""
        cpu_us = max(0, int((self._cpu() - self._cpu0) * 1e6))
        peak = 0
        if self._status >= 0:
            try:
                data = os.pread(self._status, 4096, 0)
                at = data.index(b"VmHWM:")
                peak = int(data[at + 6 : data.index(b"kB", at)]) * 1024
            except (OSError, ValueError):
                pass
        return cpu_us, peak


def make_undumpable() -> None:
    """PR_SET_DUMPABLE 0: no other process of our uid may ptrace us or read our memory or
    environment through /proc. execve resets it, so only the child itself can set it.

    ctypes is the stdlib's only way to call prctl. It costs each child ~1.4 ms, about 230 KB
    of private memory and 340 KB of RSS (measured on idle children; private CPython entry
    points cost a third of that but break on upgrade); it stays loaded, as the stdlib module
    that user code (numpy, for one) would import anyway.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE): {os.strerror(err)}")


def json_bytes(value: object) -> bytes:
    """Compact JSON as UTF-8 (a frame's payload)."""
    import json

    return json.dumps(value, separators=(",", ":")).encode()


def import_later(name: str) -> ModuleType:
    """A module of the child package imported after start-up (completion on the first
    query, say), when the package is out of sys.modules and its directory off sys.path:
    the package goes back for the import, which finds the module through its __path__,
    and leaves again with it."""
    sys.modules["replchild"] = _PACKAGE
    try:
        __import__(f"replchild.{name}")
        return sys.modules[f"replchild.{name}"]
    finally:
        forget_our_modules()


def forget_our_modules() -> None:
    """Take this file and the child package out of sys.modules: user code sees none of
    ours. Their code lives on in the functions and objects that use it."""
    ours = [n for n in sys.modules if n.partition(".")[0] in ("runner_child", "replchild")]
    for name in ours:
        del sys.modules[name]


def on_sigterm(signum: int, frame: object) -> None:
    """The runner's SIGTERM: the server is gone, end the session's whole group. In a forked
    copy (a multiprocessing worker that its pool terminates) it ends that copy alone, as
    SIGTERM does. Checked here rather than by resetting the handler after a fork: a
    SIGTERM caught between the fork and that reset would be dropped by the interpreter."""
    if os.getpid() != RUNNER_PID[0]:
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGTERM)
        return
    Runner.server_gone()


RUNNER_PID = [0]  # the runner's own pid, set by main()


def main(usage: Usage | None = None) -> None:
    """Serve the session on fds 0 and 1. `usage`: made already (by the fork server, before
    this process took its uid); else made here, while its /proc/self files are ours."""
    RUNNER_PID[0] = os.getpid()
    forget_our_modules()
    usage = usage or Usage()
    make_undumpable()
    # Move the protocol pipes above the user's fds; os.dup gives close-on-exec copies, so
    # subprocesses of user code never inherit them.
    proto_in, proto_out = os.dup(0), os.dup(1)
    max_frame = int(os.environ.pop("REPL_MAX_FRAME_BYTES", DEFAULT_MAX_FRAME))
    max_result = int(os.environ.pop("REPL_MAX_RESULT_CHARS", DEFAULT_MAX_RESULT))
    apply_limits(os.environ.pop("REPL_RLIMITS", ""))
    output_fds = os.environ.pop("REPL_OUTPUT_FDS", "")
    runner = Runner(proto_in, proto_out, max_frame, usage, output_fds, max_result)
    install_flush_points(runner.output)
    _signal.signal(_signal.SIGINT, runner.on_sigint)
    # SIGTERM comes from the server's shutdown ladder or, as the parent-death signal, from
    # the kernel when the server dies: either way, end everything this session started.
    _signal.signal(_signal.SIGTERM, on_sigterm)
    _thread.start_new_thread(runner.forwarder, ())
    try:
        runner.serve()
    except BrokenPipeError:
        runner.server_gone()


if __name__ == "__main__":
    main()
