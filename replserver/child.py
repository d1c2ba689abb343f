"""One runner_child.py process: spawn it, send it code, route its frames, end it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from replchild.forkserver import CHILD_FDS

from . import protocol
from .errors import ChildStartError, ProtocolError
from .execution import Execution, Failure
from .forkserver import ForkedProcess, ForkServer, ForkServerGone
from .isolation import Isolation, Lease
from .sandbox import Confinement, make_preexec
from .settings import Settings
from .startup import StartupReport, startup_environment

log = logging.getLogger(__name__)

EndOutcome = Literal["exited", "terminated", "killed", "already-gone"]

# After the process exits, at most this much is read from its protocol pipe.
DRAIN_BYTES = 4 * 1024 * 1024
# A protocol pipe closed while the process runs: this long to exit before it is killed.
PIPE_LOST_GRACE_S = 0.2
FATAL_TEXT_BYTES = 1000  # of a FATAL frame's text, quoted in the error message

# The output pipes' descriptors in a forked child, as the fork server lays them out.
CHILD_OUTPUT_FDS = CHILD_FDS[2:]
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def child_environment(
    settings: Settings, output_fds: tuple[int, ...] = (), home: str = "/tmp", python: str = ""
) -> dict[str, str]:
    """A small explicit environment: nothing of the server's own variables reaches user code.

    `output_fds` (read and write ends of the fd 1 and fd 2 pipes) are made by the server;
    without them the child makes its own pipes.
    """
    bin_dir = os.path.dirname(python or settings.python)
    return {
        "REPL_OUTPUT_FDS": ",".join(map(str, output_fds)),
        "PATH": f"{bin_dir}:{_SAFE_PATH}",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        # matplotlib draws without a display; the child turns plt.show() into image output.
        "MPLBACKEND": "Agg",
        "REPL_MAX_FRAME_BYTES": str(settings.max_frame_bytes),
        "REPL_MAX_RESULT_CHARS": str(settings.max_result_chars),
        "REPL_RLIMITS": ",".join(f"{name}={value}" for name, value in settings.rlimits.items()),
        **startup_environment(settings),
    }


def describe_exit(returncode: int | None) -> str:
    """A readable account of how a process ended, for error messages."""
    if returncode is None:
        return "ended for an unknown reason"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class ChildProcess:
    """A live runner_child.py: one execution at a time, frames in and out over its pipes."""

    def __init__(
        self, settings: Settings, isolation: Isolation | None = None, lease: Lease | None = None
    ) -> None:
        self._settings = settings
        self._isolation = isolation
        self._lease = lease
        self._cgroup = lease.cgroup if lease is not None else None
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._stdout: asyncio.ReadTransport | None = None
        self._ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._gone: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._parser = protocol.FrameParser(settings.max_frame_bytes)
        self.current: Execution | None = None
        self._leftover_fds: tuple[int, ...] = ()  # read ends of the child's fd 1/2 pipes
        self._reap = False  # we killed processes the child may have to wait for
        self.pid = 0
        self.error: str | None = None  # why the child is unusable, once it is
        self._distrusted = False  # it broke the protocol: nothing more it sends is read
        self._sent = 0  # executions sent: the count the next completion record must carry
        self._interactive = False  # the execution in flight can have its input() answered
        self._input_number = 0  # the last input request's number (the child counts up)
        self._ending = False  # end() has begun: it closes the request pipe itself
        self._queries: deque[asyncio.Future[bytes]] = deque()  # awaiting answers, oldest first
        self.startup: StartupReport | None = None  # what its preloads and startup code did
        self._forks: ForkServer | None = None  # the fork server that forked it, if one did
        # Takes the frames of a snapshot being saved or restored (replserver/snapshots).
        self.snapshot_sink: Callable[[int, bytes], None] | None = None

    def __repr__(self) -> str:
        state = "gone" if self._gone.done() else ("busy" if self.current else "idle")
        return f"<ChildProcess pid={self.pid} {state}>"

    @property
    def lease(self) -> Lease | None:
        """The isolation layers this child runs under (its uid, its working directory)."""
        return self._lease

    @property
    def alive(self) -> bool:
        return not self._gone.done() and self.error is None

    @classmethod
    async def spawn(cls, settings: Settings, *, isolation: Isolation | None = None) -> ChildProcess:
        """Start a child under its share of the isolation layers; wait until it is ready."""
        try:
            return await cls._spawn(settings, isolation)
        except _ForkServerDied:
            # It took the child with it (a killed fork server): once more, from a new one.
            return await cls._spawn(settings, isolation)

    @classmethod
    async def _spawn(cls, settings: Settings, isolation: Isolation | None) -> ChildProcess:
        lease = isolation.lease() if isolation is not None else None
        child = cls(settings, isolation, lease)
        home = str(lease.workdir) if lease is not None else "/tmp"
        pipes: list[int] = []
        try:
            for _ in range(2):
                pipes.extend(os.pipe())
        except OSError as exc:  # EMFILE: neither these descriptors nor the lease may leak
            for fd in pipes:
                os.close(fd)
            await child._release()
            raise ChildStartError(f"could not start the Python process: {exc}") from exc
        out_r, out_w, err_r, err_w = pipes
        os.set_blocking(out_r, False)  # the draining after a death must never wait
        os.set_blocking(err_r, False)
        fds = (out_r, out_w, err_r, err_w)
        # Before the start: a process that exits at once is noticed (process_exited) before
        # this coroutine resumes, and its exit drains these.
        child._leftover_fds = (out_r, err_r)
        try:
            transport = await child._start(home, fds)
        except BaseException as exc:  # cancelled too: nothing of the start may leak
            child._leftover_fds = ()
            os.close(out_r)
            os.close(err_r)
            await asyncio.shield(child._release())
            if isinstance(exc, (OSError, subprocess.SubprocessError)):
                raise ChildStartError(f"could not start the Python process: {exc}") from exc
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        if child._transport is None:
            child._attach(transport)
        try:
            if child._cgroup is not None:
                # Before any user code: the child only forks once it runs an execution.
                try:
                    await child._cgroup.add(child.pid)
                except OSError as exc:
                    raise ChildStartError(f"could not confine the Python process: {exc}") from exc
            async with asyncio.timeout(settings.spawn_timeout_s):
                waiters: list[asyncio.Future[Any]] = [child._ready, child._gone]
                await asyncio.wait(waiters, return_when="FIRST_COMPLETED")
        except TimeoutError:
            await child.end()
            raise ChildStartError(
                f"the Python process did not start within {settings.spawn_timeout_s} s"
            ) from None
        except BaseException:
            await asyncio.shield(child.end())
            raise
        if not child._ready.done():
            code = child._gone.result()
            await child.end(0)
            message = f"the Python process {describe_exit(code)} while starting"
            if child._forks is not None and not child._forks.alive:
                raise _ForkServerDied(message + " (its fork server ended)")
            raise ChildStartError(message)
        return child

    async def _start(self, home: str, output_fds: tuple[int, ...]) -> asyncio.SubprocessTransport:
        """Fork this child from the fork server, or start it by exec where there is none."""
        isolation, lease = self._isolation, self._lease
        python = isolation.python if isolation is not None else self._settings.python
        if isolation is None:
            argv = [python, "-I", self._settings.runner_path]
            return await self._exec(argv, Confinement(), home, python, output_fds)
        # Its environment is what a child's is before the child's own is set.
        env = child_environment(self._settings, python=python)
        forks = await isolation.fork_server(env)
        if forks is not None:
            try:
                return await self._fork(forks, lease, home, python, output_fds)
            except ForkServerGone:
                forks = await isolation.fork_server(env)  # a new one, once
                if forks is not None:
                    return await self._fork(forks, lease, home, python, output_fds)
        confinement = lease.confinement if lease is not None else Confinement()
        return await self._exec(isolation.command(lease), confinement, home, python, output_fds)

    async def _exec(
        self,
        argv: list[str],
        confinement: Confinement,
        home: str,
        python: str,
        output_fds: tuple[int, ...],
    ) -> asyncio.SubprocessTransport:
        """Start this child as a new interpreter (Popen confines it between fork and exec)."""
        transport, _ = await asyncio.get_running_loop().subprocess_exec(
            lambda: _ChildProtocol(self),
            *argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # start-up failures land in the server's log
            env=child_environment(self._settings, output_fds, home, python),
            cwd=home,
            pass_fds=output_fds,
            start_new_session=True,  # own process group: killpg reaches grandchildren
            preexec_fn=make_preexec(confinement),
        )
        return transport

    async def _fork(
        self,
        forks: ForkServer,
        lease: Lease | None,
        home: str,
        python: str,
        output_fds: tuple[int, ...],
    ) -> asyncio.SubprocessTransport:
        """Have the fork server fork this child; its transport (ChildProcess pipes)."""
        confinement = lease.confinement if lease is not None else Confinement()
        request = {
            "env": child_environment(self._settings, CHILD_OUTPUT_FDS, home, python),
            "cwd": home,
            "confine": {
                "uid": confinement.uid,
                "gid": confinement.gid,
                "new_netns": confinement.new_netns,
                "seccomp": confinement.seccomp,
                "mounts": confinement.mounts,
                "cwd": confinement.cwd,
                "detach": confinement.detach,
            },
        }
        request_r, request_w = os.pipe()
        try:
            protocol_r, protocol_w = os.pipe()
        except OSError:
            os.close(request_r)
            os.close(request_w)
            raise
        self._forks = forks
        try:
            pid, pidfd = await forks.fork(request, (request_r, protocol_w, *output_fds))
        except BaseException:
            os.close(request_w)
            os.close(protocol_r)
            raise
        finally:
            os.close(request_r)
            os.close(protocol_w)
        return await ForkedProcess.connect(
            _ChildProtocol(self), pid, pidfd, forks.exit_status(pid), request_w, protocol_r
        )

    def _attach(self, transport: asyncio.SubprocessTransport) -> None:
        self._transport = transport
        self.pid = transport.get_pid()
        stdin = transport.get_pipe_transport(0)
        stdout = transport.get_pipe_transport(1)
        assert isinstance(stdin, asyncio.WriteTransport)
        assert isinstance(stdout, asyncio.ReadTransport)
        self._stdin, self._stdout = stdin, stdout

    # --- work -----------------------------------------------------------------------------
    def start(self, code: str, execution: Execution, *, interactive: bool = False) -> None:
        """Send `code`; frames from now on belong to `execution` until its completion.
        `interactive`: a client can answer input(); otherwise input() raises EOFError."""
        if not self.alive or self._stdin is None:
            raise ProtocolError("the session's Python process is not running")
        assert self.current is None, "one execution at a time"
        self.current = execution
        self._sent += 1
        self._interactive = interactive
        flags = (protocol.FLAG_REAP if self._reap else 0) | (
            protocol.FLAG_INPUT if interactive else 0
        )
        self._reap = False
        self._stdin.write(protocol.encode_exec(code, flags))

    def reply_input(self, number: int, value: str | None) -> None:
        """Answer the child's input request `number` (None: end of input)."""
        if self.alive and self._stdin is not None and not self._stdin.is_closing():
            self._stdin.write(protocol.encode_input_reply(number, value))

    def query(self, frame: bytes) -> asyncio.Future[bytes]:
        """Send a completion or inspection query frame; the future gets the answer."""
        if not self.alive or self._stdin is None:
            raise ProtocolError("the session's Python process is not running")
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # An answer nobody waits for any more (the client left) must not log an error.
        answer.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queries.append(answer)
        self._stdin.write(frame)
        return answer

    def send_frames(self, frames: list[bytes]) -> None:
        """Write request frames other than an execution's (a snapshot's, say)."""
        if not self.alive or self._stdin is None or self._stdin.is_closing():
            raise ProtocolError("the session's Python process is not running")
        self._stdin.writelines(frames)

    @property
    def ended(self) -> asyncio.Future[int | None]:
        """Done when the process has exited (its return code)."""
        return self._gone

    def pause_reading(self) -> None:
        if self._stdout is not None and not self._stdout.is_closing():
            self._stdout.pause_reading()

    def resume_reading(self) -> None:
        if self._stdout is not None and not self._stdout.is_closing():
            self._stdout.resume_reading()

    # --- frames from the child (called by _ChildProtocol) -----------------------------------
    # Every byte comes from a process that runs user code, which can write to the protocol
    # pipe: each frame is checked (layout, and whether it may come now) before it is used,
    # and anything wrong ends the child instead of leaving the session waiting.
    def _on_data(self, data: bytes) -> None:
        if self._distrusted:
            return
        try:
            for kind, payload in self._parser.feed(data):
                self._on_frame(kind, payload)
                if self._distrusted:
                    return
        except (protocol.FrameTooLarge, protocol.Malformed, ProtocolError) as exc:
            self._broken(str(exc))
        except Exception as exc:
            log.exception("child %s: error handling its frames", self.pid)
            self._broken(f"a frame the server could not handle ({type(exc).__name__})")

    def _on_frame(self, kind: int, payload: bytes) -> None:
        current = self.current
        if kind in _OUTPUT_FRAMES:
            if not payload:
                raise protocol.Malformed("an empty output frame")
            if kind == protocol.T_DISPLAY:
                protocol.check_display(payload)
            if current is not None:
                current.push(kind, payload)
            # Output with no execution in flight (a background thread, a subprocess
            # outliving its cell) is dropped: see the README's "Stray output".
        elif kind == protocol.T_DONE:
            self._on_done(protocol.Done.decode(payload))
        elif kind == protocol.T_INPUT_REQUEST:
            self._on_input_request(protocol.InputRequest.decode(payload), payload)
        elif kind == protocol.T_READY:
            pid = protocol.decode_ready(payload)
            if self._ready.done():
                raise ProtocolError("a second ready frame")
            self._ready.set_result(pid)
        elif kind == protocol.T_FATAL:
            text = payload[:FATAL_TEXT_BYTES].decode("utf-8", "replace")
            self._broken(text, how="reported a protocol error")
        elif kind == protocol.T_ANSWER:
            self._on_answer(payload)
        elif kind == protocol.T_STARTUP:
            self._on_startup(payload)
        elif kind in protocol.SNAPSHOT_FRAMES and self.snapshot_sink is not None:
            self.snapshot_sink(kind, payload)  # a snapshot's, to the transfer that asked
        else:
            raise ProtocolError(f"a frame of unknown type {kind:#x}")

    def _on_answer(self, payload: bytes) -> None:
        """A query's answer (its layout is checked by whoever asked)."""
        if not self._queries:
            raise ProtocolError("an answer to no query")
        answer = self._queries.popleft()
        if not answer.done():
            answer.set_result(payload)

    def _on_startup(self, payload: bytes) -> None:
        """The report of its preloads and startup code, once, before it is ready."""
        if self.startup is not None or self._ready.done():
            raise ProtocolError("a second start-up report")
        try:
            self.startup = StartupReport.decode(payload)
        except ValueError as exc:
            raise protocol.Malformed(f"a start-up report that does not parse ({exc})") from None

    def _on_done(self, done: protocol.Done) -> None:
        current = self.current
        if current is None:
            raise ProtocolError("a completion record with no execution running")
        if done.execution_count != self._sent or done.return_code not in (0, 1):
            raise ProtocolError(
                f"a completion record for execution {done.execution_count} with return"
                f" code {done.return_code}, while execution {self._sent} runs"
            )
        self.current = None
        current.finish(done)

    def _on_input_request(self, request: protocol.InputRequest, payload: bytes) -> None:
        current = self.current
        if current is None or not self._interactive:
            raise ProtocolError("an input request where no client can answer one")
        expected = (self._input_number + 1) & 0xFFFFFFFF
        if request.number != expected:
            raise ProtocolError(f"input request {request.number}, not {expected}")
        self._input_number = expected
        current.request_input(request, payload)

    def _broken(self, detail: str, how: str = "broke the protocol") -> None:
        """The stream can no longer be trusted: fail the execution and kill the process."""
        log.error("child %s %s: %s", self.pid, how, detail)
        self._distrusted = True
        if self.error is None:
            self.error = (
                f"The session's Python process {how} ({detail}), so it was ended;"
                " its state was lost."
            )
        self._fail_current(self.error)
        self._signal_group(signal.SIGKILL)

    def abandon(self, execution: Execution, message: str) -> None:
        """Give up on the child: `execution` fails with `message` now, and every process of
        the session is killed, whether or not its end is ever seen."""
        self._distrusted = True
        if self.error is None:
            self.error = message
        if self.current is execution:
            self.current = None
        execution.finish(Failure(message))
        try:
            self._signal_group(signal.SIGKILL)
        except OSError as exc:
            log.error("child %s: could not kill its processes: %s", self.pid, exc)

    def _on_pipe_lost(self, fd: int) -> None:
        """A protocol pipe closed while the process may still run (user code closed or
        replaced our descriptor): it gets a moment to exit, then it is ended."""
        if self._gone.done() or self._distrusted or self._ending:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(PIPE_LOST_GRACE_S, self._pipe_lost_expired, fd, 1)

    def _pipe_lost_expired(self, fd: int, tries: int) -> None:
        if self._gone.done() or self._distrusted or self._ending:
            return
        if self._has_exited():
            # It did exit, and a loaded machine is slow to tell us: that news is coming
            # (and if it never does, the exit is taken as it is).
            if tries < 25:
                loop = asyncio.get_running_loop()
                loop.call_later(PIPE_LOST_GRACE_S, self._pipe_lost_expired, fd, tries + 1)
            else:
                self._on_exit()
            return
        self._broken(f"its {'request' if fd == 0 else 'event'} pipe closed while it ran")

    def _has_exited(self) -> bool:
        """Whether the process has ended, looked at without reaping it (WNOWAIT)."""
        if isinstance(self._transport, ForkedProcess):  # not ours to wait for
            return self._transport.has_exited()
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self.pid, flags) is not None
        except ChildProcessError:
            return True

    def _fail_current(self, message: str) -> None:
        while self._queries:
            answer = self._queries.popleft()
            if not answer.done():
                answer.set_exception(ProtocolError(message))
        current, self.current = self.current, None
        if current is not None:
            current.finish(Failure(message))

    def _drain_leftovers(self) -> None:
        """Deliver what the dead child's forwarder never read from its output pipes."""
        fds, self._leftover_fds = self._leftover_fds, ()
        for fd, kind in zip(fds, (protocol.T_STDOUT, protocol.T_STDERR), strict=True):
            try:
                # Bounded: a pipe holds at most its capacity (1 MiB), and the child, whose
                # copy of the write end just closed, can add no more; a grandchild could.
                for _ in range(64):
                    data = os.read(fd, 1 << 16)
                    if not data:
                        break
                    if self.current is not None:
                        self.current.push(kind, data)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)

    def _on_exit(self) -> None:
        """The process exited: what it wrote is in the pipes already, so take that and
        end now. Its descendants may hold the pipes open for as long as they like."""
        self._drain_protocol()
        self._on_gone()

    def _drain_protocol(self) -> None:
        stdout = self._stdout
        if stdout is None or stdout.is_closing():
            return
        fd = stdout.get_extra_info("pipe").fileno()  # non-blocking: asyncio set it so
        taken = 0
        # Bounded: the dead process left at most a pipe's capacity; a descendant still
        # writing gets no more than this before the pipe is closed on it.
        while taken < DRAIN_BYTES and not self._distrusted:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:  # BlockingIOError: nothing more is there now
                break
            if not data:
                break
            taken += len(data)
            self._on_data(data)

    def _on_gone(self) -> None:
        if self._gone.done():
            return
        if self._transport is not None:
            self._transport.close()
        self._drain_leftovers()
        returncode = self._transport.get_returncode() if self._transport else None
        if self.error is None:
            how = describe_exit(returncode)
            if returncode == -signal.SIGKILL:
                how += " (perhaps by the kernel, out of memory)"
            self.error = f"The session's Python process {how}; its state was lost."
        self._fail_current(self.error)
        self._gone.set_result(returncode)

    # --- ending -----------------------------------------------------------------------------
    def _signal_group(self, sig: signal.Signals) -> bool:
        """Signal the child's process group; False if it no longer exists."""
        if not self.pid:
            return False
        if sig == signal.SIGKILL and self._cgroup is not None:
            self._cgroup.kill_all()
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:  # a dropped-privilege group we can no longer signal as a whole
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return False
        return True

    def usage(self) -> tuple[int, float]:
        """(RSS bytes, CPU seconds) of the child process and the children it has waited for."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return 0, 0.0
        # Fields after the command name, 0-based: 11-14 utime stime cutime cstime, 21 rss.
        ticks = sum(int(x) for x in fields[11:15])
        return int(fields[21]) * _PAGE_SIZE, round(ticks / _CLOCK_TICKS, 3)

    def kill_others(self) -> None:
        """SIGKILL every process of the session but the child itself (after a stop)."""
        self._reap = True
        if self._cgroup is not None:
            self._cgroup.kill_all(spare=self.pid)
            return
        # A scan of all /proc (milliseconds per hundred processes): in a thread, off the loop.
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(_kill_group_members, self.pid)
        )
        _background.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(_background.discard)

    def kill(self, message: str) -> None:
        """Kill the whole process group now; the execution in flight fails with `message`."""
        if self.error is None:
            self.error = message
        self._signal_group(signal.SIGKILL)

    def interrupt(self) -> bool:
        """SIGINT the child (KeyboardInterrupt in user code); False if it is gone."""
        return self.alive and self._signal_group(signal.SIGINT)

    async def end(self, grace_s: float | None = None) -> EndOutcome:
        """The termination ladder: close stdin, wait; SIGTERM the group, wait; SIGKILL."""
        grace = self._settings.shutdown_grace_s if grace_s is None else grace_s
        if self._gone.done():
            self._signal_group(signal.SIGKILL)  # grandchildren may outlive the child itself
            await self._release()
            return "already-gone"
        outcome: EndOutcome = "exited"
        if self._stdin is not None:
            self._ending = True  # the request pipe closing now is our doing
            self._stdin.close()  # EOF: the child exits by itself when idle
        for sig, next_outcome in ((signal.SIGTERM, "terminated"), (signal.SIGKILL, "killed")):
            try:
                async with asyncio.timeout(grace / 2):
                    await asyncio.shield(self._gone)
                break
            except TimeoutError:
                outcome = next_outcome  # type: ignore[assignment]
                self._signal_group(sig)
        else:
            await asyncio.shield(self._gone)
        self._signal_group(signal.SIGKILL)
        if self._transport is not None:
            self._transport.close()
        await self._release()
        return outcome

    async def _release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None and self._isolation is not None:
            await self._isolation.release(lease, started=self.pid != 0)


class _ForkServerDied(ChildStartError):
    """The child ended while starting because its fork server did."""


_OUTPUT_FRAMES = frozenset(
    (protocol.T_STDOUT, protocol.T_STDERR, protocol.T_RESULT, protocol.T_DISPLAY)
)


_background: set[asyncio.Task[None]] = set()


def _kill_group_members(pgid: int) -> None:
    """SIGKILL every process of group `pgid` but its leader."""
    for pid in _group_members(pgid):
        if pid != pgid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _group_members(pgid: int) -> list[int]:
    """Pids whose process group is `pgid` (a /proc scan: only used after a stop)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class _ChildProtocol(asyncio.SubprocessProtocol):
    """Forwards pipe events to the ChildProcess that owns them."""

    def __init__(self, child: ChildProcess) -> None:
        self._child = child

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called before any other callback, which may come before spawn() resumes.
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._child._attach(transport)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._child._on_data(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._child._on_pipe_lost(fd)

    def process_exited(self) -> None:
        # The end is the process's exit (a pidfd, or waitpid), not its pipes closing:
        # a descendant can hold those open for ever.
        self._child._on_exit()

    def connection_lost(self, exc: Exception | None) -> None:
        # The process exited and every pipe closed (usually _on_exit came first).
        self._child._on_gone()
