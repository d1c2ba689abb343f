"""The child's sys.stdout and sys.stderr: buffered print() output, delivered in write order,
soon after it is written, before every other writer Python lets us see, and before the end.

The writer lives in replchild/output.py; these tests drive it through a real server and
real child processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse

from .conftest import Client, MakeClient, execute, stream

ROUTES = ("/execute", "/execute-stream")


def runs(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Output and error events as (type, text), neighbours of one type merged: how events
    are cut into pieces is not part of the contract, their order is."""
    merged: list[tuple[str, str]] = []
    for event in events:
        if event["type"] not in ("output", "error"):
            continue
        if merged and merged[-1][0] == event["type"]:
            merged[-1] = (event["type"], merged[-1][1] + event["content"])
        else:
            merged.append((event["type"], event["content"]))
    return merged


async def run(client: Client, route: str, sid: str, code: str) -> tuple[str, str | None]:
    """(output, error) of either route."""
    async with asyncio.timeout(20):
        if route == "/execute":
            body = await execute(client, sid, code)
            return body["output"], body["error"]
        events = await stream(client, sid, code)
    assert events[-1]["type"] == "complete", events
    merged = runs(events)
    out = "".join(text for kind, text in merged if kind == "output")
    err = "".join(text for kind, text in merged if kind == "error")
    return out, err or None


async def next_event(resp: ClientResponse) -> dict[str, Any]:
    """The next event of a stream that is not `start`."""
    while True:
        line = await resp.content.readline()
        assert line, "stream ended before the next event"
        if line.startswith(b"data: "):
            event: dict[str, Any] = json.loads(line[len(b"data: ") :])
            if event["type"] != "start":
                return event


# --- order across the two streams ------------------------------------------------------------


@pytest.mark.parametrize("first", ["stderr", "stdout"])
async def test_stdout_and_stderr_keep_their_order_on_a_first_execution(
    client: Client, first: str
) -> None:
    """A session's first execution, where the forwarder used to read stdout's pipe first."""
    err, out = "sys.stderr.write(f'e{i}\\n')", "print(f'o{i}')"
    pair = (err, out) if first == "stderr" else (out, err)
    code = "import sys\nfor i in range(20):\n    {}\n    {}".format(*pair)
    expected: list[tuple[str, str]] = []
    for i in range(20):
        one = [("error", f"e{i}\n"), ("output", f"o{i}\n")]
        expected.extend(one if first == "stderr" else one[::-1])
    for n in range(4):
        events = await stream(client, f"cross-{first}-{n}", code)
        assert runs(events) == expected, f"session {n}: {events}"


async def test_interleaved_streams_keep_exact_order(client: Client) -> None:
    code = (
        "import sys\n"
        "for i in range(3000):\n"
        "    print('o', i)\n"
        "    if i % 7 == 0:\n"
        "        sys.stderr.write(f'e {i}\\n')\n"
        "    if i % 11 == 0:\n"
        "        sys.stderr.write('partial ')\n"
    )
    expected: list[tuple[str, str]] = []
    for i in range(3000):
        expected.append(("output", f"o {i}\n"))
        if i % 7 == 0:
            expected.append(("error", f"e {i}\n"))
        if i % 11 == 0:
            expected.append(("error", "partial "))
    events = await stream(client, "interleaved", code)
    merged: list[tuple[str, str]] = []
    for kind, text in expected:
        if merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    assert runs(events) == merged


# --- order with writers that go around sys.stdout --------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "middle",
    [
        "posix.write(1, b'b\\n')",
        "os.writev(1, [b'b', b'\\n'])",
        "sys.stdout.buffer.write(b'b\\n')",
        "f = open(1, 'w', closefd=False)\nf.write('b\\n')\nf.close()",
        "subprocess.Popen(['echo', 'b']).wait()",
        "os.posix_spawnp('echo', ['echo', 'b'], os.environ)\nos.wait()",
        "pid = os.fork()\nif pid == 0:\n    print('b')\n    os._exit(0)\nos.waitpid(pid, 0)",
    ],
    ids=["posix.write", "writev", "buffer", "open-fd-1", "popen", "posix_spawn", "fork"],
)
async def test_order_with_other_writers(client: Client, route: str, middle: str) -> None:
    code = f"import os, posix, subprocess, sys\nprint('a', end='')\nprint()\n{middle}\nprint('c')"
    out, err = await run(client, route, "around-" + route.strip("/"), code)
    assert (out, err) == ("a\nb\nc\n", None)


@pytest.mark.parametrize("route", ROUTES)
async def test_order_with_a_write_that_bypasses_the_python_level_one(
    client: Client, route: str
) -> None:
    """The wrapper's own write, called directly (as a `write = sys.stdout.write` saved at
    the wrong moment is): nothing arms a delayed flush, and the flush before os.write must
    still find its text."""
    code = (
        "import io, os, sys\n"
        "io.TextIOWrapper.write(sys.stdout, 'a\\n')\n"
        "os.write(1, b'b\\n')\n"
        "print('c')"
    )
    out, err = await run(client, route, "bypass-" + route.strip("/"), code)
    assert (out, err) == ("a\nb\nc\n", None)


async def test_fork_does_not_print_twice(client: Client) -> None:
    """What was buffered before a fork is delivered once, by the parent."""
    code = (
        "import os\n"
        "print('before')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('after')"
    )
    out, _ = await run(client, "/execute", "fork-once", code)
    assert out == "before\nafter\n"


async def test_ctypes_write_after_an_explicit_flush(client: Client) -> None:
    """C code writing to fd 1 raises no event: flush=True (or sys.stdout.flush()) before it
    is what keeps its order exact. This is the documented way, tested."""
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None)\n"
        "print('a', flush=True)\n"
        "libc.write(1, b'b\\n', 2)\n"
        "print('c')"
    )
    out, _ = await run(client, "/execute-stream", "ctypes-order", code)
    assert out == "a\nb\nc\n"


# --- delivery: soon, at the end, before the process ends -------------------------------------


@pytest.mark.parametrize("stream_name", ["stdout", "stderr"])
async def test_unflushed_output_streams_while_the_code_waits(
    client: Client, stream_name: str
) -> None:
    """print() with no flush and no newline reaches the client while the code still runs:
    the code waits until the test, having seen that output, interrupts it."""
    sid = f"soon-{stream_name}"
    await execute(client, sid, "import sys, time")
    code = (
        f"sys.{stream_name}.write('waiting')\n"
        "try:\n"
        "    while True:\n"
        "        time.sleep(0.005)\n"
        "except KeyboardInterrupt:\n"
        "    print('done')"
    )
    async with asyncio.timeout(20):
        resp = await client.post(f"/execute-stream/{sid}", json={"code": code, "protocol": 2})
        assert resp.status == 200
        first = await next_event(resp)
        interrupted = await client.post(f"/interrupt/{sid}")
        assert interrupted.status == 200, await interrupted.text()
        rest = [await next_event(resp)]
        while rest[-1]["type"] != "complete":
            rest.append(await next_event(resp))
    assert first == {"type": "output" if stream_name == "stdout" else "error", "content": "waiting"}
    assert "".join(e["content"] for e in rest if e["type"] == "output") == "done\n"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "ending",
    ["os._exit(3)", "os.abort()", "os.kill(os.getpid(), signal.SIGKILL)"],
    ids=["os._exit", "abort", "sigkill-self"],
)
async def test_print_right_before_the_process_ends_is_delivered(
    client: Client, route: str, ending: str
) -> None:
    code = f"import os, signal, sys\nprint('bye')\nsys.stderr.write('err bye')\n{ending}"
    out, err = await run(client, route, "ending-" + route.strip("/"), code)
    assert out == "bye\n"
    assert err is not None and err.startswith("err bye")


async def test_output_of_many_threads_is_whole(client: Client) -> None:
    """Threads writing at once while the forwarder flushes: every write arrives, whole.
    (One write each: print() makes two, which other threads' writes may come between.)"""
    code = (
        "import sys, threading\n"
        "def work(t):\n"
        "    for i in range(3000):\n"
        "        sys.stdout.write(f'{t}:{i:05d}\\n')\n"
        "threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]\n"
        "for th in threads: th.start()\n"
        "for th in threads: th.join()\n"
    )
    out, _ = await run(client, "/execute", "threads", code)
    lines = out.splitlines()
    assert sorted(lines) == sorted(f"{t}:{i:05d}" for t in range(4) for i in range(3000))
    for t in range(4):  # one thread's lines stay in its order
        mine = [line for line in lines if line.startswith(f"{t}:")]
        assert mine == sorted(mine)


async def test_a_signal_handler_that_prints_during_a_flush(client: Client) -> None:
    """A handler runs between any two bytecodes, those of a delivery included: its print()
    must neither deadlock on the delivery's lock nor be lost."""
    code = (
        "import signal\n"
        "ticks = 0\n"
        "def tick(signum, frame):\n"
        "    global ticks\n"
        "    ticks += 1\n"
        "    print('tick')\n"
        "signal.signal(signal.SIGALRM, tick)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)\n"
        "for i in range(60000):\n"
        "    print(i)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0)\n"
        "print('ticks', ticks)"
    )
    out, err = await run(client, "/execute", "handler", code)
    assert err is None
    # A handler may run between print()'s two writes (text, newline), even inside another
    # handler, as in any Python: count the ticks' texts, then check the numbers around them.
    body, _, last = out.rstrip("\n").rpartition("\n")
    ticks = int(last.split()[1])
    assert ticks > 0
    assert body.count("tick") == ticks
    numbers = [line for line in body.replace("tick", "").splitlines() if line]
    assert numbers == [str(i) for i in range(60000)]


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident size (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
        / 1024
    )


async def test_a_client_that_stops_reading_holds_print_back(make_client: MakeClient) -> None:
    """print() of 1 KB lines in a tight loop while the client stalls: the server stops
    reading the child, and print() waits for the delivery it cannot make rather than
    buffering the 15 MB. (Small writes run at C speed, with no check of their own: what
    they buffer is bounded by time instead; see replchild/output.py.)"""
    client = await make_client(stream_buffer_bytes=4096)
    sid = "held-back"
    pid = int((await execute(client, sid, "import os\nprint(os.getpid())"))["output"])
    with contextlib.suppress(OSError):  # start the peak over where the kernel lets us
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = peak_rss_mib(pid)
    code = "for i in range(15000):\n    print('y' * 999)\nprint('end')"  # within the cap
    async with asyncio.timeout(60):
        resp = await client.post(f"/execute-stream/{sid}", json={"code": code})
        assert resp.status == 200
        await resp.content.read(100)
        await asyncio.sleep(0.5)  # a stalled client, long enough to print it all unchecked
        events = [json.loads(block[6:]) for block in (await resp.read()).split(b"\n\n")[1:-1]]
    assert events[-1]["type"] == "complete" and events[-1]["returnCode"] == 0
    assert "".join(e["content"] for e in events if e["type"] == "output").endswith("y\nend\n")
    grown = peak_rss_mib(pid) - before
    assert grown < 8, f"the child's peak grew by {grown:.0f} MiB"


# --- the stream objects ----------------------------------------------------------------------


async def test_stream_objects_behave_like_pythons(client: Client) -> None:
    code = (
        "import sys\n"
        "o, e = sys.stdout, sys.stderr\n"
        "print(o.encoding, o.errors, o.fileno(), e.fileno(), o.isatty(), o.writable())\n"
        "print(o.line_buffering, e.line_buffering, o.buffer.fileno(), o.name, e.name)\n"
        "print(o.write('12345'), o.buffer.write(bytearray(b'xyz')))\n"
        "try:\n"
        "    o.write(b'bytes')\n"
        "except TypeError as exc:\n"
        "    print(exc)\n"
        "print('lone \\udc80 surrogate')\n"
        "o.reconfigure(line_buffering=True)\n"
        "print(o.line_buffering)\n"
        "print(sys.__stdout__ is o, sys.__stderr__ is e)\n"
    )
    out, err = await run(client, "/execute", "objects", code)
    assert err is None
    assert out.splitlines() == [
        "utf-8 backslashreplace 1 2 False True",
        "False True 1 <stdout> <stderr>",
        "12345xyz5 3",
        "write() argument must be str, not bytes",
        "lone \\udc80 surrogate",
        "True",
        "True True",
    ]


async def test_strict_encoding_fails_at_the_write(client: Client) -> None:
    """A codec that can fail fails in the write() that was given the text, as Python's."""
    code = (
        "import sys\n"
        "sys.stdout.reconfigure(encoding='ascii', errors='strict')\n"
        "print('plain')\n"
        "try:\n"
        "    print('é')\n"
        "except UnicodeEncodeError:\n"
        "    print('refused')\n"
    )
    out, err = await run(client, "/execute", "strict", code)
    assert (out, err) == ("plain\nrefused\n", None)


async def test_closed_and_detached_streams_are_replaced_next_time(client: Client) -> None:
    sid = "closed-streams"
    body = await execute(client, sid, "import sys\nprint('x')\nsys.stdout.close()\nprint('y')")
    assert body["output"] == "x\n"
    assert "I/O operation on closed file" in body["error"]
    body = await execute(client, sid, "print('back')\nb = sys.stdout.detach()\nb.write(b'raw\\n')")
    assert (body["output"], body["error"]) == ("back\nraw\n", None)
    body = await execute(client, sid, "print('again')")
    assert (body["output"], body["error"]) == ("again\n", None)


async def test_a_stream_replaced_by_user_code_is_flushed_before_completion(
    client: Client,
) -> None:
    """A buffered file on fd 1 put in place of sys.stdout: its bytes come before the end."""
    code = "import sys\nsys.stdout = open(1, 'w', closefd=False)\nprint('through a file')"
    out, _ = await run(client, "/execute-stream", "replaced", code)
    assert out == "through a file\n"


async def test_sys_dunder_stdout_restores_a_redirect(client: Client) -> None:
    code = (
        "import contextlib, io, sys\n"
        "sys.stdout = io.StringIO()\n"
        "print('hidden')\n"
        "sys.stdout = sys.__stdout__\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    print('hidden too')\n"
        "print('shown')"
    )
    out, err = await run(client, "/execute-stream", "dunder", code)
    assert (out, err) == ("shown\n", None)
