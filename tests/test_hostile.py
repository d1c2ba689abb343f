"""The child is untrusted: every byte it sends is hostile input, every process it leaves too.

User code runs in the runner's own process, so it can reach every descriptor the runner has
(/proc/self/fd) and write anything to the protocol pipe. Each attack here is followed by a
normal request in the same session, which must get a fresh interpreter (or keep its own, where
the attack broke nothing), and by a bystander session that must never notice. No reply may
take longer than the time limit plus the interrupt grace plus the watchdog's margin.

Guards: a 2 s time limit per request, a 0.5 s interrupt grace, 64 processes per session (a
pids cgroup where the server may make one), 512 MiB of memory, 1 MiB of output.
Set REPL_HOSTILE_REPORT=<path> to get what each attack's client received, as JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any, cast

import aiohttp
import pytest

from replserver.routes import ISOLATION
from replserver.session import WATCHDOG_MARGIN_S, Session

from . import servers
from .conftest import Client, MakeClient, execute, parse_sse

LIMIT_S = 2.0
GRACE_S = 0.5
GUARDS: dict[str, Any] = {
    "timeout_s": LIMIT_S,
    "interrupt_grace_s": GRACE_S,
    "limit_memory_bytes": 512 * 1024 * 1024,
    "max_output_bytes": 1024 * 1024,
    "limit_processes": 64,
}
# The invariant, plus what an HTTP round trip on a busy 2-core machine may add to it.
BOUND_S = LIMIT_S + GRACE_S + WATCHDOG_MARGIN_S + 1.0
PROTOCOL_BROKEN = "broke the protocol"

# Code every attack starts with: frames built by hand, written to every descriptor.
FORGE = """
import os, struct
def frame(kind, payload=b''):
    return bytes([kind]) + len(payload).to_bytes(4, 'big') + payload
def done(code=0, count=2, reason=0, note=b''):
    return frame(0x44, struct.pack('>iIBQQ', code, count, reason, 0, 0) + note)
def protocol_fd():
    # The runner's copy of the event pipe: the one write-only pipe that is not fd 1's or 2's.
    import fcntl, stat
    for name in os.listdir('/proc/self/fd'):
        try:
            fd = int(name)
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY:
                continue
            if not any(os.path.sameopenfile(fd, std) for std in (1, 2)):
                return fd
        except OSError:
            pass
    raise RuntimeError('no protocol pipe found')
def forge(data):
    hit = 0
    for name in os.listdir('/proc/self/fd'):
        try:
            os.write(int(name), data)
            hit += 1
        except OSError:
            pass
    return hit
"""

RECORDS: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    path = os.environ.get("REPL_HOSTILE_REPORT")
    if path:
        with open(path, "a") as f:
            for record in RECORDS:
                f.write(json.dumps(record) + "\n")


@pytest.fixture
async def guarded(make_client: MakeClient) -> Client:
    return await make_client(**GUARDS)


async def post(client: Client, sid: str, code: str, *, stream: bool = False) -> dict[str, Any]:
    """A request with the test's time limit; for a stream, the complete event plus the text
    of its error events (as `error`) and output events (as `output`)."""
    route = "execute-stream" if stream else "execute"
    body = {"code": code, "timeout": LIMIT_S}
    if stream:
        body["protocol"] = 2
    try:
        async with asyncio.timeout(BOUND_S):  # the invariant: a hang fails here, named
            resp = await client.post(f"/{route}/{sid}", json=body)
            assert resp.status == 200, await resp.text()
            if not stream:
                reply: dict[str, Any] = await resp.json()
                return reply
            text = await resp.text()
    except TimeoutError:
        raise AssertionError(f"no reply from session {sid} within {BOUND_S} s") from None
    events = parse_sse(text)
    complete = events[-1]
    assert complete["type"] == "complete", events
    assert sum(e["type"] == "complete" for e in events) == 1
    return {
        **complete,
        "output": "".join(e["content"] for e in events if e["type"] == "output"),
        "error": "".join(e["content"] for e in events if e["type"] == "error") or None,
        "events": events,
    }


async def timed(client: Client, sid: str, code: str, **kw: Any) -> tuple[dict[str, Any], float]:
    start = time.monotonic()
    reply = await post(client, sid, code, **kw)
    return reply, time.monotonic() - start


def record(case: str, reply: dict[str, Any], elapsed: float, after: dict[str, Any]) -> None:
    RECORDS.append(
        {
            "case": case,
            "reason": reply.get("reason"),
            "returnCode": reply.get("returnCode"),
            "error": (reply.get("error") or "")[-300:],
            "seconds": round(elapsed, 3),
            "next": {"reason": after.get("reason"), "restarted": after.get("restarted")},
        }
    )


async def bystander_starts(client: Client) -> asyncio.Task[dict[str, Any]]:
    """A session with state, then a request of it that runs across the attack."""
    await execute(client, "bystander", "marker = 'kept'")
    code = "import time\nfor i in range(5):\n    time.sleep(0.1)\n    print(i)\nprint(marker)"
    return asyncio.create_task(post(client, "bystander", code))


async def bystander_never_noticed(client: Client, task: asyncio.Task[dict[str, Any]]) -> None:
    during = await task
    assert during["output"] == "0\n1\n2\n3\n4\nkept\n", during
    assert during["reason"] == "ok" and during["restarted"] is False
    after = await post(client, "bystander", "print(marker)")
    assert after["output"] == "kept\n" and after["restarted"] is False
    assert (await client.get("/health")).status == 200


async def attack(
    client: Client,
    case: str,
    code: str,
    *,
    stream: bool = False,
    reasons: tuple[str, ...] = ("crashed",),
    message: str | None = PROTOCOL_BROKEN,
) -> dict[str, Any]:
    """Run hostile `code` in a session with state; check the reply, the session's next
    request (a fresh interpreter) and a bystander session."""
    sid = f"victim-{case}"
    await execute(client, sid, "marker = 'kept'")  # execution 1 of this child
    bystander = await bystander_starts(client)
    reply, elapsed = await timed(client, sid, FORGE + code, stream=stream)
    assert elapsed < BOUND_S, (case, elapsed, reply)
    assert reply["reason"] in reasons, reply
    assert reply["returnCode"] == 1
    if message is not None:
        assert message in (reply["error"] or ""), reply
    # The next request: a fresh interpreter, unless the attack was stopped like any code
    # (a time limit's KeyboardInterrupt) and the namespace survived it.
    survived = reply["namespaceSurvived"]
    assert survived is False or reply["reason"] == "timeout", reply
    after, after_s = await timed(client, sid, "print(globals().get('marker', 'fresh'))")
    assert after_s < BOUND_S
    assert after["reason"] == "ok", after
    assert after["output"] == ("kept\n" if survived else "fresh\n"), after
    assert after["restarted"] is not survived, after
    record(case, reply, elapsed, after)
    await bystander_never_noticed(client, bystander)
    return reply


# --- malformed frames of every type -------------------------------------------------------

MALFORMED = {
    # The issue's case: five bytes, a completion record with no record in it.
    "done-empty": "forge(frame(0x44))",
    "done-short": "forge(frame(0x44, b'\\0' * 12))",
    "done-bad-reason": "forge(done(reason=99))",
    "done-bad-return-code": "forge(done(code=7))",
    "done-note-not-utf8": "forge(done(note=b'\\xff\\xfe'))",
    "done-wrong-count": "forge(done(count=999))",
    "ready-again": "forge(frame(0x52, str(os.getpid()).encode()))",
    "ready-not-a-pid": "forge(frame(0x52, b'abc'))",
    "input-request-short": "forge(frame(0x49, b'\\0\\0'))",
    "input-request-in-execute": "forge(frame(0x49, (1).to_bytes(4, 'big') + b'\\0>'))",
    "display-not-json": "forge(frame(0x4D, b'{not json'))",
    "display-not-object": "forge(frame(0x4D, b'[1, 2]'))",
    "stdout-empty": "forge(frame(0x4F))",
    "unknown-type": "forge(frame(0x00, b'x'))",
    "unknown-type-ff": "forge(frame(0xFF))",
    "too-large": "forge(bytes([0x4F]) + (1 << 30).to_bytes(4, 'big'))",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_frame_ends_the_child(guarded: Client, case: str) -> None:
    await attack(guarded, case, MALFORMED[case] + "\nprint('after')")


@pytest.mark.parametrize(
    "case, code",
    [
        ("input-request-bad-flags", "forge(frame(0x49, (1).to_bytes(4, 'big') + b'\\x80>'))"),
        (
            "input-request-prompt-not-utf8",
            "forge(frame(0x49, (1).to_bytes(4, 'big') + b'\\0\\xff'))",
        ),
        ("input-request-wrong-number", "forge(frame(0x49, (7).to_bytes(4, 'big') + b'\\0>'))"),
    ],
)
async def test_malformed_input_request_in_a_stream(guarded: Client, case: str, code: str) -> None:
    reply = await attack(guarded, case, code + "\nprint('after')", stream=True)
    assert not any(e["type"] == "input_request" for e in reply["events"])


async def test_forged_fatal_ends_the_child(guarded: Client) -> None:
    # On the event pipe alone: a write this big is not atomic, so written to fd 1 as well it
    # would interleave with the runner's forwarding of that copy.
    code = "os.write(protocol_fd(), frame(0x21, b'x' * 100000))\nimport time\ntime.sleep(10)"
    reply = await attack(guarded, "fatal", code, message="reported a protocol error (xxx")
    assert len(reply["error"]) < 1200, "the child's text is quoted, but not all of it"


async def test_truncated_frame_is_bounded_by_the_time_limit(guarded: Client) -> None:
    # Half a header: the real frames after it are read as the rest of a frame that never
    # ends, so no completion arrives; the time limit and its kill end the wait.
    await attack(
        guarded, "half-header", "forge(b'O\\0\\0')", reasons=("timeout", "crashed"), message=None
    )


# --- frames that are valid alone, but not now -----------------------------------------------


async def test_forged_done_while_output_flows(guarded: Client) -> None:
    """A valid completion for the running execution, with the code still printing: the
    client gets that reply; the real completion that follows breaks the protocol."""
    sid = "victim-forged-done"
    await execute(guarded, sid, "marker = 'kept'")
    bystander = await bystander_starts(guarded)
    code = FORGE + (
        "import time\nforge(done(count=2))\n"
        "for i in range(40):\n    print(i)\n    time.sleep(0.02)\n"
    )
    reply, elapsed = await timed(guarded, sid, code)
    assert elapsed < BOUND_S
    # Whatever the forged record said is all this client learns: its own code lied.
    assert reply["reason"] == "ok"
    after, after_s = await timed(guarded, sid, "print(globals().get('marker', 'fresh'))")
    assert after_s < BOUND_S
    if after["reason"] == "crashed":
        # The real completion (execution 2) came while execution 3 ran.
        assert PROTOCOL_BROKEN in after["error"], after
        after, after_s = await timed(guarded, sid, "print(globals().get('marker', 'fresh'))")
        assert after_s < BOUND_S
    assert after["output"] == "fresh\n" and after["restarted"] is True, after
    record("forged-done-while-output-flows", reply, elapsed, after)
    await bystander_never_noticed(guarded, bystander)


async def test_done_with_no_execution_running(guarded: Client) -> None:
    sid = "victim-late-done"
    pid = int((await execute(guarded, sid, "import os\nprint(os.getpid())"))["output"])
    code = FORGE + (
        "import threading, time\n"
        "def late():\n    time.sleep(0.3)\n    forge(done(count=2))\n"
        "threading.Thread(target=late).start()\nmarker = 'kept'"
    )
    reply = await post(guarded, sid, code)
    assert reply["reason"] == "ok"
    assert await servers.wait_gone([pid]) == [], (
        "the child that sent a completion out of turn lives on"
    )
    after = await post(guarded, sid, "print(globals().get('marker', 'fresh'))")
    assert after["output"] == "fresh\n" and after["restarted"] is True


async def test_flood_written_everywhere(guarded: Client) -> None:
    # Frames written to the event pipe interleave with the runner's own (its big output
    # frames are not atomic): the stream is garbage within a few frames -- or, when the
    # runner's writes find room in the pipe (it grows to 1 MiB once output flows in bulk)
    # and so stay whole, valid until the time limit. Either way the caps and the limit hold.
    code = "chunk = frame(0x4F, b'x' * 1000) * 4\nwhile True:\n    forge(chunk)"
    reply = await attack(
        guarded, "flood-everywhere", code, reasons=("timeout", "crashed"), message=None
    )
    assert reply["reason"] == "timeout" or PROTOCOL_BROKEN in reply["error"], reply
    assert len(reply["output"]) <= GUARDS["max_output_bytes"]


# Each write is at most PIPE_BUF (4096) bytes, so it reaches the pipe whole, between the
# runner's own frames: the stream stays valid throughout.
VALID_FLOODS = {
    "flood-valid-output": "frame(0x4F, b'x' * 1000) * 4",
    "flood-valid-results": "frame(0x56, b'r' * 1000) * 4",
    "flood-valid-displays": "frame(0x4D, b'{\"text/plain\": \"%s\"}' % (b'd' * 4000))",
}


@pytest.mark.parametrize("case", sorted(VALID_FLOODS))
async def test_flood_of_valid_frames_on_the_protocol_pipe(guarded: Client, case: str) -> None:
    """Frames that are each valid, as fast as the code can write them, on the event pipe
    alone: output caps and the time limit hold, and the namespace survives the stop."""
    code = f"fd = protocol_fd()\nchunk = {VALID_FLOODS[case]}\nwhile True:\n    os.write(fd, chunk)"
    reply = await attack(guarded, case, code, reasons=("timeout",), message="timed out")
    assert reply["truncated"] is True and reply["namespaceSurvived"] is True
    assert len(reply["output"]) <= GUARDS["max_output_bytes"]


async def test_flood_of_valid_input_requests_in_a_stream(guarded: Client) -> None:
    code = (
        "fd = protocol_fd()\nn = 0\nwhile True:\n    n += 1\n"
        "    os.write(fd, frame(0x49, n.to_bytes(4, 'big') + b'\\0' + b'p' * 1000))"
    )
    # The stream's client reads thousands of events, so the child is paused behind it and
    # may still be there when the grace ends: stopped or killed, both within the bound.
    reply = await attack(
        guarded,
        "flood-valid-input-requests",
        code,
        stream=True,
        reasons=("timeout",),
        message="timed out",
    )
    assert sum(e["type"] == "input_request" for e in reply["events"]) > 10


# --- descriptors taken away ----------------------------------------------------------------


async def test_dup2_over_every_descriptor(guarded: Client) -> None:
    code = (
        "null = os.open('/dev/null', os.O_RDWR)\n"
        "for name in os.listdir('/proc/self/fd'):\n"
        "    if int(name) > 2 and int(name) != null:\n"
        "        try:\n            os.dup2(null, int(name))\n"
        "        except OSError:\n            pass\n"
        "print('after')"
    )
    await attack(guarded, "dup2-over", code, message=None)


async def test_closing_every_descriptor(guarded: Client) -> None:
    code = (
        "for name in os.listdir('/proc/self/fd'):\n"
        "    if int(name) > 2:\n"
        "        try:\n            os.close(int(name))\n"
        "        except OSError:\n            pass\n"
        "print('after')"
    )
    await attack(guarded, "close-all", code, message=None)


async def test_event_pipe_replaced_while_the_code_runs_on(guarded: Client) -> None:
    # No more frames can come, yet the process lives: it is ended at once, not at the limit.
    code = (
        "import time\nnull = os.open('/dev/null', os.O_WRONLY)\n"
        "os.dup2(null, protocol_fd())\ntime.sleep(10)"
    )
    await attack(guarded, "event-pipe-replaced", code, message="pipe closed while it ran")


# --- processes left behind -----------------------------------------------------------------

# Dup every descriptor (fork keeps copies the runner cannot close), leave the session and the
# process group, then report the descendant's pid and exit without a completion record.
DESCENDANT = """
import os, time
held = []
for name in os.listdir('/proc/self/fd'):
    try:
        held.append(os.dup(int(name)))
    except OSError:
        pass
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        time.sleep(60)
    os._exit(0)
os.close(w)
print(os.read(r, 100).decode(), flush=True)
"""


async def test_descendant_holding_the_pipes_does_not_delay_the_end(guarded: Client) -> None:
    """The issue's case: os._exit(0) while a setsid grandchild keeps every pipe open."""
    reply = await attack(
        guarded, "descendant-holds-pipes", DESCENDANT + "os._exit(0)", message="exited with code 0"
    )
    descendant = int(reply["output"].split()[0])
    if guarded.app[ISOLATION].cgroups is None:
        pytest.skip("no pids cgroup here: a setsid descendant outlives the session's group")
    assert await servers.wait_gone([descendant]) == [], "the descendant outlived its session"


async def test_descendant_holding_the_pipes_while_the_child_runs_on(guarded: Client) -> None:
    """A descendant that only holds the pipes changes nothing for the session."""
    sid = "holder"
    first = await post(guarded, sid, DESCENDANT + "marker = 'kept'")
    assert first["reason"] == "ok"
    descendant = int(first["output"].split()[0])
    assert not servers.pid_gone(descendant)
    for _ in range(3):
        again = await post(guarded, sid, "print(marker)")
        assert again["output"] == "kept\n" and again["reason"] == "ok"
    # A reset ends every process of the session, even one in a session of its own.
    assert (await guarded.post(f"/reset/{sid}")).status == 200
    if guarded.app[ISOLATION].cgroups is None:
        pytest.skip("no pids cgroup here: a setsid descendant outlives the session's group")
    assert await servers.wait_gone([descendant]) == []


# --- the last line of defence ----------------------------------------------------------------


async def test_watchdog_frees_the_session_when_every_stop_failed(
    guarded: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the interrupt and its escalation switched off (as if both had failed), the
    watchdog still ends the execution within the bound and the session works again."""
    monkeypatch.setattr(Session, "_stop", lambda self, execution, why: None)
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "while True:\n    time.sleep(1)"
    )
    await attack(guarded, "watchdog", code, message="watchdog", reasons=("crashed",))


class Remote:
    """The two calls `attack` makes of a test client, on a real server's base URL."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self._http = http
        self._base = base

    def post(self, path: str, **kw: Any) -> Any:
        return self._http.post(self._base + path, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self._http.get(self._base + path, **kw)


async def test_the_issue_cases_against_python_m_replserver() -> None:
    """The issue's two cases through a real server process, which learns of its children's
    exits from pidfds (the tests' in-process servers use asyncio's waitpid thread)."""
    replica = await servers.start(
        REPL_TIMEOUT_S=str(LIMIT_S),
        REPL_INTERRUPT_GRACE_S=str(GRACE_S),
        REPL_LIMIT_PROCESSES="64",
        REPL_LIMIT_MEMORY_BYTES=str(512 * 1024 * 1024),
    )
    try:
        await replica.wait_ready(15)
        async with aiohttp.ClientSession() as http:
            remote = cast(Client, Remote(http, replica.base))  # duck-typed: post and get
            await attack(remote, "real-server-done-empty", "forge(frame(0x44))")
            reply = await attack(
                remote,
                "real-server-descendant",
                DESCENDANT + "os._exit(0)",
                message="exited with code 0",
            )
            descendant = int(reply["output"].split()[0])
            async with http.get(f"{replica.base}/health") as resp:
                cgroups = (await resp.json())["isolation"]["pidsCgroup"]
            if not cgroups:
                pytest.skip("no pids cgroup here: a setsid descendant outlives the session")
            assert await servers.wait_gone([descendant]) == [], (
                "the descendant outlived its session"
            )
    finally:
        await replica.kill()
