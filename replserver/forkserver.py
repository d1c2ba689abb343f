"""The server's end of the fork server (replchild/forkserver.py): start it, ask it for
children, learn how they end.

A child forked there costs about a millisecond of the fork server's time and nothing of
ours, where a child started by exec costs a fork of this (large) process and an interpreter
start. Children forked there are not ours: their end is seen through a pidfd, and their
exit status comes from the fork server, which reaps them. ForkedProcess gives ChildProcess
the same transport it gets from asyncio for a child started by exec.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import marshal
import os
import select
import signal
import socket
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

REPLY_BYTES = 64 * 1024
# Once a child's pidfd says it has ended, its exit status from the fork server is waited
# for this long at most (it reaps at once; a fork server that died never tells).
STATUS_WAIT_S = 2.0
START_TIMEOUT_S = 20.0

# Imports the runner (from its compiled copy, as a child started by exec does), then serves.
BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop()); import runner_child; "
    "from replchild import forkserver; del sys.path[0]; "
    "forkserver.serve(runner_child)"
)


class ForkServerError(OSError):
    """The fork server could not start a child."""


class ForkServerGone(ForkServerError):
    """The fork server ended: a new one may be started."""


class ForkServer:
    """One fork server process and the requests in flight to it."""

    def __init__(self, python: str, runner_dir: str, env: dict[str, str], cwd: str) -> None:
        self.python = python
        self._argv = [python, "-I", "-c", BOOTSTRAP]
        self._runner_dir = runner_dir
        self._env = env
        self._cwd = cwd
        self._sock: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._forks: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._statuses: dict[int, asyncio.Future[int | None]] = {}
        self._lost = False
        self._writable: asyncio.Future[None] | None = None  # when the socket has room again

    @property
    def alive(self) -> bool:
        return self._sock is not None and not self._lost

    async def start(self) -> None:
        """Start the fork server process; raises OSError if it cannot be."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._argv,
                str(theirs.fileno()),
                str(os.getpid()),
                self._runner_dir,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=self._env,
                cwd=self._cwd,
                # Not in the server's process group: a Ctrl-C at the terminal is the
                # server's to handle, not something for every session to catch.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                hello = await loop.sock_recv(ours, REPLY_BYTES)
            if not hello:
                code = await self._process.wait()
                raise ForkServerError(f"the fork server exited with code {code} at start-up")
            if marshal.loads(hello) != {"ready": self._process.pid}:
                raise ForkServerError(f"the fork server began with {hello[:100]!r}")
        except BaseException as exc:
            ours.close()
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()
            if isinstance(exc, TimeoutError):
                message = f"the fork server did not start within {START_TIMEOUT_S} s"
                raise ForkServerError(message) from None
            raise
        self._sock = ours
        loop.add_reader(ours.fileno(), self._on_readable)

    async def fork(self, request: dict[str, Any], fds: Iterable[int]) -> tuple[int, int]:
        """(pid, pidfd) of a new child given `fds`; the pidfd is ours to close."""
        sock = self._sock
        if sock is None or self._lost:
            raise ForkServerGone("the fork server is not running")
        number = next(self._ids)
        reply: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._forks[number] = reply
        payload = marshal.dumps({**request, "id": number})
        try:
            # A few kilobytes each: a burst of starts can fill the socket, never for long.
            while True:
                try:
                    socket.send_fds(sock, [payload], list(fds))
                    break
                except BlockingIOError:
                    await self._until_writable(sock)
                if self._lost:
                    raise ConnectionResetError
            return await reply
        except ConnectionError:  # it died, and we have not read its end yet
            self._on_lost()
            raise ForkServerGone("the fork server ended") from None
        finally:
            self._forks.pop(number, None)

    async def _until_writable(self, sock: socket.socket) -> None:
        """Wait until the socket takes a message again (one waiter registers for all)."""
        if self._writable is None:
            loop = asyncio.get_running_loop()
            writable = self._writable = loop.create_future()

            def ready() -> None:
                loop.remove_writer(sock.fileno())
                self._writable = None
                if not writable.done():
                    writable.set_result(None)

            loop.add_writer(sock.fileno(), ready)
        await asyncio.shield(self._writable)

    def exit_status(self, pid: int) -> asyncio.Future[int | None]:
        """The exit status of child `pid` as a return code (negative: killed by a signal);
        None if the fork server ended before it could tell."""
        status = self._statuses.get(pid)
        if status is None:
            status = asyncio.get_running_loop().create_future()
            if self._lost:
                status.set_result(None)
            self._statuses[pid] = status
        return status

    def _on_readable(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(sock, REPLY_BYTES, 1)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("the fork server's socket failed: %s", exc)
                self._on_lost()
                return
            if not msg:
                self._on_lost()
                return
            try:
                self._on_message(marshal.loads(msg), fds)
            except (ValueError, TypeError, KeyError, EOFError) as exc:
                log.error("a message from the fork server that does not parse: %s", exc)
                for fd in fds:
                    os.close(fd)

    def _on_message(self, message: dict[str, Any], fds: list[int]) -> None:
        if "exit" in message:
            status = self.exit_status(int(message["exit"]))
            del self._statuses[int(message["exit"])]
            if not status.done():
                status.set_result(int(message["status"]))
            return
        reply = self._forks.get(int(message["id"]))
        if "pid" in message and len(fds) == 1:
            pid = int(message["pid"])
            self._statuses.setdefault(pid, asyncio.get_running_loop().create_future())
            if reply is not None and not reply.done():
                reply.set_result((pid, fds[0]))
                return
            os.close(fds[0])  # the request was given up on: the child is ended by its pipes
            return
        for fd in fds:
            os.close(fd)
        if reply is not None and not reply.done():
            reply.set_exception(ForkServerError(str(message.get("error", "no child"))))

    def _on_lost(self) -> None:
        if self._lost:
            return
        log.error("the fork server ended, and its children with it; the next start makes another")
        self._let_go()

    def _let_go(self) -> None:
        """No more messages either way: whoever waits on one is told so."""
        self._lost = True
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            asyncio.get_running_loop().remove_writer(self._sock.fileno())
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)  # its waiters find the fork server gone
        for reply in self._forks.values():
            if not reply.done():
                reply.set_exception(ForkServerGone("the fork server ended"))
        for status in self._statuses.values():
            if not status.done():
                status.set_result(None)

    async def close(self) -> None:
        """Stop the fork server (its children, if any are left, get SIGTERM)."""
        if self._sock is not None:
            self._let_go()
            self._sock.close()  # end of requests: it returns from serve() and exits
            self._sock = None
        if self._process is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self._process.wait()
            except TimeoutError:
                self._process.kill()
                await self._process.wait()


class ForkedProcess(asyncio.SubprocessTransport):
    """A child forked by the fork server, as the transport asyncio gives for a child it
    started: its request pipe as pipe 0, its protocol pipe as pipe 1, and a protocol whose
    process_exited is called when the pidfd says it has ended."""

    def __init__(
        self,
        protocol: asyncio.SubprocessProtocol,
        pid: int,
        pidfd: int,
        status: asyncio.Future[int | None],
    ) -> None:
        super().__init__()
        self._protocol = protocol
        self._pid = pid
        self._pidfd = pidfd
        self._status = status
        self._returncode: int | None = None
        self._exited = False  # the pidfd said so
        self._reported = False  # process_exited() was called
        self._pipes: dict[int, asyncio.BaseTransport] = {}
        self._lost: set[int] = set()
        self._closed = False
        self._finished = False

    @classmethod
    async def connect(
        cls,
        protocol: asyncio.SubprocessProtocol,
        pid: int,
        pidfd: int,
        status: asyncio.Future[int | None],
        request_w: int,
        protocol_r: int,
    ) -> ForkedProcess:
        """The transport over the server's ends of the child's pipes (it owns them now)."""
        loop = asyncio.get_running_loop()
        self = cls(protocol, pid, pidfd, status)
        request = os.fdopen(request_w, "wb", buffering=0)
        replies = os.fdopen(protocol_r, "rb", buffering=0)
        stdin: asyncio.BaseTransport | None = None
        try:
            stdin, _ = await loop.connect_write_pipe(lambda: _PipeProtocol(self, 0), request)
            stdout, _ = await loop.connect_read_pipe(lambda: _PipeProtocol(self, 1), replies)
        except BaseException:
            # Cancelled, say: a child nobody will watch must not run on, and its protocol
            # hears nothing of it (it never had a transport).
            self._finished = True
            if stdin is not None:
                stdin.close()
            request.close()  # closing a file twice is harmless; its descriptor goes once
            replies.close()
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
            raise
        self._pipes = {0: stdin, 1: stdout}
        protocol.connection_made(self)
        loop.add_reader(pidfd, self._on_pidfd)
        return self

    def get_pid(self) -> int:
        return self._pid

    def get_returncode(self) -> int | None:
        return self._returncode

    def get_pipe_transport(self, fd: int) -> asyncio.BaseTransport | None:
        return self._pipes.get(fd)

    def has_exited(self) -> bool:
        """Whether the process has ended (its pidfd is readable), without waiting."""
        if self._exited:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pipe in self._pipes.values():
            pipe.close()

    def send_signal(self, sig: int) -> None:
        os.kill(self._pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _on_pidfd(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._exited = True
        task = asyncio.get_running_loop().create_task(self._exit())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _exit(self) -> None:
        try:
            async with asyncio.timeout(STATUS_WAIT_S):
                self._returncode = await asyncio.shield(self._status)
        except TimeoutError:
            log.error("child %s ended; the fork server did not say how", self._pid)
        self._reported = True
        self._protocol.process_exited()
        self._try_finish()

    def _pipe_lost(self, fd: int, exc: Exception | None) -> None:
        if self._finished:
            return
        self._lost.add(fd)
        self._protocol.pipe_connection_lost(fd, exc)
        self._try_finish()

    def _try_finish(self) -> None:
        if self._finished or not self._reported or len(self._lost) < len(self._pipes):
            return
        self._finished = True
        self._protocol.connection_lost(None)


class _PipeProtocol(asyncio.Protocol):
    """One pipe of a ForkedProcess: what it reads and its end go to the process's protocol."""

    def __init__(self, process: ForkedProcess, fd: int) -> None:
        self._process = process
        self._fd = fd

    def data_received(self, data: bytes) -> None:
        self._process._protocol.pipe_data_received(self._fd, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._process._pipe_lost(self._fd, exc)


_background: set[asyncio.Task[None]] = set()
