"""The fork server: one interpreter that has imported the runner and forks a session child
on each request, so that a new session costs a fork instead of an interpreter start.

The server starts it once (replserver/forkserver.py) with a SOCK_SEQPACKET socket. Each
request is one message: a marshalled dict (the child's environment, working directory and
confinement, see replchild/confine.py) with the child's six descriptors attached. The child
is forked at once; it lays out its descriptors, confines itself and runs runner_child.main(),
exactly what a child started by exec runs. The answer is {"id", "pid"} with a pidfd of the
child attached, or {"id", "error"}. When a child ends, this process reaps it and sends
{"exit": pid, "status": code} (a negative code: killed by that signal).

It runs no user code and takes requests only from the server, which alone holds the other
end of the socket; every child closes its copy before anything else.
"""

from __future__ import annotations

import _signal
import _socket
import fcntl
import gc
import marshal
import os
import select
import sys

from replchild.confine import Confiner, make_undumpable, set_parent_death_signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

    from runner_child import Usage

REQUEST_BYTES = 1 << 20  # one request's largest size (an environment and a filter)
# What each child gets, in this order: its request pipe, its protocol pipe, the read and
# write ends of its fd 1 pipe and of its fd 2 pipe; they become these descriptors.
CHILD_FDS = (0, 1, 3, 4, 5, 6)
FIRST_FREE_FD = 7
FD_BYTES = 4  # an int in SCM_RIGHTS data


def serve(runner: ModuleType) -> None:
    """Serve until the server closes its end of the socket (see _serve)."""
    try:
        _serve(runner)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server went while we answered: nobody is left to serve


def _serve(runner: ModuleType) -> None:
    """Serve requests on the socket whose number is sys.argv[1] until the server closes it.

    `runner` is runner_child: each child runs its main() with a Usage made before the uid
    changes (it opens /proc/self files that are root's afterwards). In a forked child this
    returns once main() has returned, so that the interpreter ends the way it does after a
    script (atexit handlers of user code run)."""
    run: Callable[[Usage], None] = runner.main
    usage: Callable[[], Usage] = runner.Usage
    # What each child's main() would do first, done once: fewer pages for it to copy.
    runner.forget_our_modules()
    control, server_pid = int(sys.argv[1]), int(sys.argv[2])
    del sys.argv[1:]  # children see the argv of a child started by exec
    # Ours dies with the server: the children, whose parent we are, then get SIGTERM.
    set_parent_death_signal(_signal.SIGKILL)
    if os.getppid() != server_pid:
        os._exit(1)  # the server died before the line above took effect
    make_undumpable()  # a child of the server's uid may not ptrace its way into the next ones
    gc.freeze()  # what is here now is shared with every child: the collector leaves it be
    sock = _socket.socket(fileno=control)
    _send(sock, {"ready": os.getpid()})
    poller = select.poll()
    poller.register(control, select.POLLIN)
    children: dict[int, int] = {}  # pidfd -> pid
    me = os.getpid()
    while True:
        for fd, _ in poller.poll():
            if fd != control:
                _reap(sock, poller, children, fd)
                continue
            request, fds = _receive(sock)
            if request is None:
                return  # the server closed its end
            pid = _fork(sock, request, fds)
            if pid == 0:
                run(_become_session(sock, children, request, fds, usage, me))
                return
            if pid > 0:
                pidfd = os.pidfd_open(pid)
                children[pidfd] = pid
                poller.register(pidfd, select.POLLIN)
                _send(sock, {"id": request["id"], "pid": pid}, pidfd)


def _receive(sock: _socket.socket) -> tuple[dict[str, object] | None, list[int]]:
    msg, ancdata, _flags, _addr = sock.recvmsg(
        REQUEST_BYTES, _socket.CMSG_SPACE(len(CHILD_FDS) * FD_BYTES)
    )
    fds = []
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % FD_BYTES
            fds += [
                int.from_bytes(data[i : i + FD_BYTES], sys.byteorder)
                for i in range(0, usable, FD_BYTES)
            ]
    if not msg:
        return None, fds
    request = marshal.loads(msg)
    return request, fds


def _fork(sock: _socket.socket, request: dict[str, object], fds: list[int]) -> int:
    """The child's pid, 0 in the child, -1 when it could not be forked (the server is told)."""
    error = "" if len(fds) == len(CHILD_FDS) else f"{len(fds)} descriptors, not 6"
    pid = -1
    if not error:
        try:
            pid = os.fork()
        except OSError as exc:
            error = f"fork: {exc}"
    if pid == 0:
        return 0
    for fd in fds:
        os.close(fd)
    if error:
        _send(sock, {"id": request["id"], "error": error})
    return pid


def _reap(sock: _socket.socket, poller: select.poll, children: dict[int, int], pidfd: int) -> None:
    poller.unregister(pidfd)
    pid = children.pop(pidfd)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    _send(sock, {"exit": pid, "status": os.waitstatus_to_exitcode(status)})


def _send(sock: _socket.socket, message: dict[str, object], fd: int = -1) -> None:
    ancdata = []
    if fd >= 0:
        ancdata = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(FD_BYTES, sys.byteorder))]
    sock.sendmsg([marshal.dumps(message)], ancdata)


def _become_session(
    sock: _socket.socket,
    children: dict[int, int],
    request: dict[str, object],
    fds: list[int],
    usage: Callable[[], Usage],
    forker: int,
) -> Usage:
    """In the forked child: take the descriptors, confine this process, set its environment;
    its Usage, made while its /proc files are still its own to open."""
    try:
        os.close(sock.detach())  # detached: its finaliser must not close a reused number
        for pidfd in children:
            os.close(pidfd)
        os.setsid()  # its own session and group: killpg reaches what it starts
        # Above the numbers they take, then into place; everything else goes.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FIRST_FREE_FD) for fd in fds]
        for fd, target in zip(high, CHILD_FDS, strict=True):
            os.dup2(fd, target)
        os.closerange(FIRST_FREE_FD, os.sysconf("SC_OPEN_MAX"))
        made = usage()
        os.chdir(str(request["cwd"]))
        Confiner(**request["confine"], parent=forker)()  # type: ignore[arg-type]
        os.environ.clear()
        os.environ.update(request["env"])  # type: ignore[call-overload]
    except BaseException as exc:  # noqa: BLE001  # never back into the fork server's loop
        text = f"replserver fork server: a child could not start: {type(exc).__name__}: {exc}\n"
        os.write(2, text.encode())
        os._exit(1)
    return made
