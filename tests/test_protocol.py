"""The frame protocol: its one definition, the parser, a real child on raw pipes."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import signal
import struct
import sys
import termios
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest

import runner_child
from replchild import wire
from replchild.output import Output, TextWriter, stdout_stream
from replserver import protocol
from replserver.child import child_environment
from replserver.settings import Settings

FRAME_TYPES = (
    "T_EXEC",
    "T_INPUT_REPLY",
    "T_STDOUT",
    "T_STDERR",
    "T_RESULT",
    "T_DISPLAY",
    "T_INPUT_REQUEST",
    "T_DONE",
    "T_READY",
    "T_FATAL",
)
REASONS = ("REASON_OK", "REASON_EXCEPTION", "REASON_EXIT", "REASON_INTERRUPTED", "REASON_MEMORY")
PAYLOADS = [b"", b"x", b"hello\n", bytes(range(256)), b"\x00" * 70000, "é😀".encode()]


# --- the one definition of the format ------------------------------------------------------


def test_server_uses_the_wire_module_itself() -> None:
    """protocol.py re-exports replchild.wire's objects: no second copy to drift."""
    for name in (*FRAME_TYPES, *REASONS, "HEADER", "HEADER_SIZE", "FLAG_REAP", "FLAG_INPUT"):
        assert getattr(protocol, name) is getattr(wire, name), name
    for name in ("encode", "encode_exec", "encode_input_reply"):
        assert getattr(protocol, name) is getattr(wire, name), name


def test_exec_flags_are_distinct_bits() -> None:
    assert wire.FLAG_REAP & wire.FLAG_INPUT == 0
    assert wire.INPUT_VALUE != wire.INPUT_EOF


def test_frame_types_are_distinct_bytes() -> None:
    values = [getattr(wire, name) for name in FRAME_TYPES]
    assert len(set(values)) == len(values)
    assert all(0 <= v < 256 for v in values)


def test_every_reason_has_a_name_on_the_server() -> None:
    values = {getattr(wire, name) for name in REASONS}
    assert len(values) == len(REASONS)
    assert set(protocol.REASON_NAMES) == values
    assert protocol.REASON_NAMES[wire.REASON_MEMORY] == "memory"


# The bytes on the wire, written out by hand: a change of the layout must be deliberate.


def test_header_layout() -> None:
    assert wire.HEADER_SIZE == 5
    assert wire.encode(0x4F, b"abc") == b"\x4f\x00\x00\x00\x03abc"


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: f"{len(p)}b")
def test_encode_is_header_then_payload(payload: bytes) -> None:
    frame = wire.encode(wire.T_STDOUT, payload)
    assert frame == b"O" + len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize("code", ["print(1)", "", "é = '😀'", "x\x00y", "\ud800"])
def test_encode_exec_layout(code: str) -> None:
    body = code.encode("utf-8", "surrogatepass")
    assert wire.encode_exec(code) == b"X" + (len(body) + 1).to_bytes(4, "big") + b"\x00" + body
    assert wire.encode_exec(code, wire.FLAG_INPUT | wire.FLAG_REAP)[5] == 0x03


def test_done_layout() -> None:
    frame = wire.encode_done(-7, 42, wire.REASON_EXIT, 1234, 5 << 20, "bye é".encode())
    assert frame == (
        b"D\x00\x00\x00\x1f"  # 25 bytes of record and a 6-byte note
        + b"\xff\xff\xff\xf9"  # return code, signed
        + b"\x00\x00\x00\x2a"  # execution count
        + b"\x02"  # reason
        + (1234).to_bytes(8, "big")  # CPU microseconds
        + (5 << 20).to_bytes(8, "big")  # peak RSS bytes
        + "bye é".encode()
    )
    [(kind, payload)] = protocol.FrameParser(1024).feed(frame)
    assert kind == protocol.T_DONE
    assert protocol.Done.decode(payload) == protocol.Done(-7, 42, "exit", 1234, 5 << 20, "bye é")


@pytest.mark.parametrize("value", ["", "Ada", "é 😀\n", "\ud800", None])
def test_input_reply_layout(value: str | None) -> None:
    frame = wire.encode_input_reply(7, value)
    body = b"" if value is None else value.encode("utf-8", "surrogatepass")
    status = b"\x01" if value is None else b"\x00"
    assert frame == b"i" + (5 + len(body)).to_bytes(4, "big") + b"\x00\x00\x00\x07" + status + body


def test_input_request_layout_and_decode() -> None:
    frame = wire.encode_input_request(0xFFFFFFFE, "Secret é: ".encode(), password=True)
    assert frame[:10] == b"I\x00\x00\x00\x10\xff\xff\xff\xfe\x01"
    [(kind, payload)] = protocol.FrameParser(1024).feed(frame)
    assert kind == protocol.T_INPUT_REQUEST
    assert protocol.InputRequest.decode(payload) == protocol.InputRequest(
        0xFFFFFFFE, "Secret é: ", True
    )
    plain = wire.encode_input_request(1, b"", password=False)
    assert protocol.InputRequest.decode(plain[5:]) == protocol.InputRequest(1, "", False)


# --- FrameParser ---------------------------------------------------------------------------

FRAMES: list[tuple[int, bytes]] = [
    (protocol.T_STDOUT, b"hello\n"),
    (protocol.T_STDERR, b""),
    (protocol.T_DONE, b"\x00" * 9),
    (protocol.T_STDOUT, bytes(range(256))),
    (protocol.T_READY, b"1234"),
]
STREAM = b"".join(protocol.encode(k, p) for k, p in FRAMES)


def test_parser_several_frames_in_one_feed() -> None:
    parser = protocol.FrameParser(1024)
    assert parser.feed(STREAM) == FRAMES
    assert parser.feed(b"") == []


def test_parser_single_frame_fast_path() -> None:
    parser = protocol.FrameParser(1024)
    assert parser.feed(protocol.encode(protocol.T_STDOUT, b"abc")) == [(protocol.T_STDOUT, b"abc")]
    assert parser.feed(protocol.encode(protocol.T_DONE, b"")) == [(protocol.T_DONE, b"")]


def test_parser_split_at_every_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        parser = protocol.FrameParser(1024)
        frames = parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:])
        assert frames == FRAMES, f"split at {cut}"


def test_parser_split_at_every_pair_of_boundaries() -> None:
    data = b"".join(protocol.encode(k, p) for k, p in FRAMES[:3])
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            parser = protocol.FrameParser(1024)
            frames = (
                parser.feed(data[:first])
                + parser.feed(data[first:second])
                + parser.feed(data[second:])
            )
            assert frames == FRAMES[:3], (first, second)


def test_parser_byte_by_byte() -> None:
    parser = protocol.FrameParser(1024)
    frames: list[tuple[int, bytes]] = []
    for i in range(len(STREAM)):
        frames += parser.feed(STREAM[i : i + 1])
    assert frames == FRAMES


def test_parser_payload_at_exact_limit() -> None:
    parser = protocol.FrameParser(10)
    assert parser.feed(protocol.encode(1, b"a" * 10)) == [(1, b"a" * 10)]


def test_parser_too_large_fast_path() -> None:
    parser = protocol.FrameParser(10)
    with pytest.raises(protocol.FrameTooLarge) as info:
        parser.feed(protocol.HEADER.pack(protocol.T_STDOUT, 11) + b"a" * 11)
    assert info.value.size == 11 and info.value.limit == 10


def test_parser_too_large_header_alone() -> None:
    parser = protocol.FrameParser(10)
    with pytest.raises(protocol.FrameTooLarge):
        parser.feed(protocol.HEADER.pack(protocol.T_STDOUT, 0xFFFFFFFF))


def test_parser_too_large_buffered_path() -> None:
    header = protocol.HEADER.pack(protocol.T_STDOUT, 1 << 31)
    parser = protocol.FrameParser(10)
    assert parser.feed(header[:2]) == []
    with pytest.raises(protocol.FrameTooLarge) as info:
        parser.feed(header[2:])
    assert info.value.size == 1 << 31


def test_parser_too_large_after_valid_frame() -> None:
    parser = protocol.FrameParser(10)
    data = protocol.encode(protocol.T_STDOUT, b"ok") + protocol.HEADER.pack(protocol.T_STDOUT, 11)
    with pytest.raises(protocol.FrameTooLarge):
        parser.feed(data)


# --- the completion record -----------------------------------------------------------------


def finish_frame(return_code: int, reason: int, note: str, count: int) -> bytes:
    """Call the real Runner.finish (without its fd-juggling __init__) and capture its frame."""
    runner = runner_child.Runner.__new__(runner_child.Runner)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    proto_r, proto_w = os.pipe()
    try:
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        runner.out_r, runner.err_r, runner.proto_out = out_r, err_r, proto_w
        runner.count = count
        runner.lock = threading.Lock()
        runner.lock_owner = 0
        runner.executing = True
        runner.main_thread = threading.get_ident()
        runner.deferring = runner.interrupted = runner.running = False
        runner.output = Output(proto_w)  # nothing is printed: the wake fd is never written
        runner.stdout, runner.stderr = stdout_stream(runner.output), TextWriter(runner.output)
        runner.pending_fds = select.poll()
        runner.usage = runner_child.Usage()
        runner.usage.start()
        runner.finish(return_code, reason, note)
        return os.read(proto_r, 65536)
    finally:
        for fd in (out_r, out_w, err_r, err_w, proto_r, proto_w):
            os.close(fd)


@pytest.mark.parametrize(
    ("return_code", "reason", "note", "name"),
    [
        (0, wire.REASON_OK, "", "ok"),
        (1, wire.REASON_EXCEPTION, "", "exception"),
        (1, wire.REASON_EXIT, "SystemExit: bye é", "exit"),
        (1, wire.REASON_INTERRUPTED, "", "interrupted"),
        (1, wire.REASON_MEMORY, "", "memory"),
        (-7, wire.REASON_OK, "", "ok"),
    ],
)
def test_done_decodes_runner_finish(return_code: int, reason: int, note: str, name: str) -> None:
    frames = protocol.FrameParser(1024).feed(finish_frame(return_code, reason, note, count=42))
    assert len(frames) == 1
    kind, payload = frames[0]
    assert kind == protocol.T_DONE
    done = protocol.Done.decode(payload)
    assert (done.return_code, done.execution_count, done.reason, done.note) == (
        return_code,
        42,
        name,
        note,
    )
    assert done.cpu_us >= 0 and done.peak_rss_bytes > 1024 * 1024  # this process's VmHWM


def test_done_unknown_reason_is_malformed() -> None:
    payload = (1).to_bytes(4, "big", signed=True) + (3).to_bytes(4, "big") + bytes((99,))
    payload += bytes(16)  # CPU microseconds and peak RSS
    with pytest.raises(protocol.Malformed, match="unknown reason 99"):
        protocol.Done.decode(payload)


# --- a real child on raw pipes -------------------------------------------------------------


class RawChild:
    """runner_child.py started directly, spoken to in frames."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.parser = protocol.FrameParser(1 << 24)
        self.pending: list[tuple[int, bytes]] = []
        self.results: list[bytes] = []  # T_RESULT payloads seen by run()

    async def frame(self) -> tuple[int, bytes]:
        assert self.proc.stdout is not None
        while not self.pending:
            data = await self.proc.stdout.read(65536)
            assert data, "the child closed its protocol pipe"
            self.pending += self.parser.feed(data)
        return self.pending.pop(0)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)

    async def drained(self, within_s: float = 5) -> None:
        """Until the child has read all that was sent (nothing left in its stdin pipe)."""
        assert self.proc.stdin is not None
        await self.proc.stdin.drain()
        pipe = self.proc.stdin.transport.get_extra_info("pipe")
        async with asyncio.timeout(within_s):
            while (
                self.proc.stdin.transport.get_write_buffer_size()
                or struct.unpack("i", fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            ):
                await asyncio.sleep(0.005)  # polling against the deadline above

    async def run(self, code: str) -> tuple[bytes, bytes, protocol.Done]:
        self.send(protocol.encode_exec(code))
        out, err = bytearray(), bytearray()
        while True:
            kind, payload = await self.frame()
            if kind == protocol.T_STDOUT:
                out += payload
            elif kind == protocol.T_STDERR:
                err += payload
            elif kind == protocol.T_RESULT:
                self.results.append(payload)
            else:
                assert kind == protocol.T_DONE, (kind, payload)
                return bytes(out), bytes(err), protocol.Done.decode(payload)

    async def until(self, wanted: int) -> tuple[bytes, bytes]:
        """Frames up to the first of type `wanted`: (output so far, its payload)."""
        out = bytearray()
        while True:
            kind, payload = await self.frame()
            if kind == wanted:
                return bytes(out), payload
            assert kind in (protocol.T_STDOUT, protocol.T_STDERR), (kind, payload)
            out += payload


@asynccontextmanager
async def raw_child(max_frame: int = 1000) -> AsyncIterator[RawChild]:
    env = child_environment(
        Settings.from_env({}, max_frame_bytes=max_frame, max_body_bytes=max_frame // 2)
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        runner_child.__file__,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        # The child kills its own process group when its pipe closes: never ours.
        start_new_session=True,
    )
    child = RawChild(proc)
    try:
        async with asyncio.timeout(20):
            kind, payload = await child.frame()
        assert kind == protocol.T_READY
        assert int(payload) == proc.pid
        yield child
    finally:
        if proc.returncode is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_child_refuses_oversized_frame_with_fatal() -> None:
    async with raw_child(max_frame=1000) as child, asyncio.timeout(10):
        child.send(protocol.HEADER.pack(protocol.T_EXEC, 1001))
        kind, payload = await child.frame()
        assert kind == protocol.T_FATAL
        text = payload.decode()
        assert "1001" in text and "1000" in text
        returncode = await child.proc.wait()
        assert returncode != 0


async def test_child_refuses_huge_frame_without_waiting_for_it() -> None:
    # 4 GiB announced, nothing sent: the child must answer at once, not read or allocate it.
    async with raw_child(max_frame=1000) as child, asyncio.timeout(10):
        child.send(protocol.HEADER.pack(protocol.T_EXEC, 0xFFFFFFFF))
        kind, payload = await child.frame()
        assert kind == protocol.T_FATAL
        assert str(0xFFFFFFFF) in payload.decode()
        assert await child.proc.wait() != 0


async def test_child_refuses_unknown_frame_type() -> None:
    async with raw_child() as child, asyncio.timeout(10):
        child.send(protocol.encode(0x7A, b"\x00print(1)"))
        kind, payload = await child.frame()
        assert kind == protocol.T_FATAL
        assert "0x7a" in payload.decode().lower()
        assert await child.proc.wait() != 0


async def test_child_executes_and_reports_done() -> None:
    async with raw_child() as child, asyncio.timeout(10):
        child.send(protocol.encode(protocol.T_EXEC, b"\x00" + b"print('hello')"))
        kind, payload = await child.frame()
        assert kind == protocol.T_STDOUT
        out = bytearray(payload)
        while True:
            kind, payload = await child.frame()
            if kind != protocol.T_STDOUT:
                break
            out += payload
        assert out == b"hello\n"
        assert kind == protocol.T_DONE
        done = protocol.Done.decode(payload)
        assert (done.return_code, done.execution_count, done.reason, done.note) == (0, 1, "ok", "")
        assert done.peak_rss_bytes > 1024 * 1024

        out2, err2, done2 = await child.run("import sys\nx = 1\nsys.exit(4)")
        assert out2 == b""
        assert (done2.return_code, done2.execution_count, done2.reason, done2.note) == (
            1,
            2,
            "exit",
            "SystemExit: 4",
        )
        assert b"SystemExit: 4" in err2

        out3, err3, done3 = await child.run("print(x)\n1/0")
        assert out3 == b"1\n"
        assert b"ZeroDivisionError" in err3
        assert (done3.return_code, done3.execution_count, done3.reason) == (1, 3, "exception")


async def test_child_user_code_cannot_touch_the_protocol() -> None:
    async with raw_child() as child, asyncio.timeout(10):
        # fd 1 is not the protocol pipe: a raw write arrives as output, framed
        out, _, done = await child.run("import os\nos.write(1, b'\\x44\\x00\\x00\\x00\\x00')")
        assert out == b"\x44\x00\x00\x00\x00"
        assert done.return_code == 0
        assert child.results == [b"5"]  # os.write's return value, as a final expression
        # fd 0 is not the protocol pipe either: reading it gives EOF, consumes no frames
        out, _, done = await child.run("import os\nprint(os.read(0, 100))")
        assert out == b"b''\n"
        out, _, done = await child.run("print('still in sync')")
        assert out == b"still in sync\n" and done.execution_count == 3


async def test_child_run_as_a_script_keeps_sys_modules_clean() -> None:
    """Started by path (no BOOTSTRAP), the runner still leaves no module of ours behind."""
    async with raw_child() as child, asyncio.timeout(10):
        code = (
            "import sys\n"
            "ours = ('runner_child', 'replchild', 'replserver', 'aiohttp')\n"
            "print(sorted(n for n in sys.modules if n.partition('.')[0] in ours))"
        )
        out, err, done = await child.run(code)
        assert (out, err, done.reason) == (b"[]\n", b"", "ok")


async def test_child_is_not_dumpable() -> None:
    """The runner turned itself non-dumpable (prctl through ctypes) before any user code."""
    async with raw_child() as child, asyncio.timeout(10):
        code = "import ctypes\nctypes.CDLL(None).prctl(3, 0, 0, 0, 0)"  # PR_GET_DUMPABLE
        _, err, done = await child.run(code)
        assert (child.results, err, done.reason) == ([b"0"], b"", "ok")


async def test_child_exits_when_stdin_closes() -> None:
    async with raw_child() as child:
        _, _, done = await child.run("x = 1")
        assert done.return_code == 0
        assert child.proc.stdin is not None
        child.proc.stdin.close()
        async with asyncio.timeout(5):
            await child.proc.wait()
        assert child.proc.returncode is not None


async def test_child_exits_when_stdin_closes_while_busy() -> None:
    async with raw_child() as child:
        child.send(protocol.encode_exec("import time\nprint('busy', flush=True)\ntime.sleep(60)"))
        await child.until(protocol.T_STDOUT)  # running the code, not waiting for it
        assert child.proc.stdin is not None
        child.proc.stdin.close()
        async with asyncio.timeout(5):
            await child.proc.wait()


# --- results and input at the frame level --------------------------------------------------


async def test_child_sends_result_before_done() -> None:
    async with raw_child() as child, asyncio.timeout(10):
        out, _, done = await child.run("print('a')\n6 * 7")
        assert (out, child.results, done.reason) == (b"a\n", [b"42"], "ok")
        await child.run("x = 1")
        await child.run("None")
        assert child.results == [b"42"]  # no result for statements or None


def input_exec(code: str) -> bytes:
    return protocol.encode_exec(code, protocol.FLAG_INPUT)


async def test_child_input_round_trip() -> None:
    async with raw_child() as child, asyncio.timeout(10):
        child.send(input_exec("a = input('one? ')\nb = input('two? ')\nprint(a + b)"))
        _, payload = await child.until(protocol.T_INPUT_REQUEST)
        first = protocol.InputRequest.decode(payload)
        assert (first.prompt, first.password) == ("one? ", False)
        child.send(protocol.encode_input_reply(first.number, "x"))
        echo, payload = await child.until(protocol.T_INPUT_REQUEST)
        assert echo == b"one? x\n"  # prompt and answer echoed, as a terminal shows them
        second = protocol.InputRequest.decode(payload)
        assert second.prompt == "two? " and second.number != first.number
        child.send(protocol.encode_input_reply(second.number, "y"))
        out, done = await child.until(protocol.T_DONE)
        assert out == b"two? y\nxy\n"
        assert protocol.Done.decode(done).reason == "ok"


async def test_child_input_without_flag_is_eof() -> None:
    async with raw_child() as child, asyncio.timeout(10):
        out, err, done = await child.run("input('never shown')")
        assert done.reason == "exception" and out == b""
        assert b"EOFError: input() is not available in /execute" in err


async def test_child_input_eof_reply() -> None:
    async with raw_child() as child, asyncio.timeout(10):
        child.send(input_exec("input()"))
        _, payload = await child.until(protocol.T_INPUT_REQUEST)
        child.send(protocol.encode_input_reply(protocol.InputRequest.decode(payload).number, None))
        _, done = await child.until(protocol.T_DONE)
        assert protocol.Done.decode(done).reason == "exception"


async def test_child_interrupted_input_leaves_protocol_in_sync() -> None:
    """SIGINT while waiting, with half a reply already read: the rest of that reply and a
    stale answer arriving later are dropped, and the next request runs normally."""
    async with raw_child() as child, asyncio.timeout(10):
        code = "try:\n    input('a')\nexcept KeyboardInterrupt:\n    print('again', input('b'))"
        child.send(input_exec(code))
        _, payload = await child.until(protocol.T_INPUT_REQUEST)
        first = protocol.InputRequest.decode(payload).number
        stale = protocol.encode_input_reply(first, "too late")
        child.send(stale[:3])
        await child.drained()  # the child has read the three bytes and waits for more
        os.kill(child.proc.pid, signal.SIGINT)
        _, payload = await child.until(protocol.T_INPUT_REQUEST)
        second = protocol.InputRequest.decode(payload)
        assert second.prompt == "b" and second.number != first
        child.send(stale[3:] + protocol.encode_input_reply(second.number, "x"))
        out, done = await child.until(protocol.T_DONE)
        assert out.endswith(b"bx\nagain x\n") and b"too late" not in out
        assert protocol.Done.decode(done).reason == "ok"

        # An interrupt that ends the execution; its answer comes after the completion.
        child.send(input_exec("input('c')"))
        _, payload = await child.until(protocol.T_INPUT_REQUEST)
        os.kill(child.proc.pid, signal.SIGINT)
        _, done = await child.until(protocol.T_DONE)
        assert protocol.Done.decode(done).reason == "interrupted"
        number = protocol.InputRequest.decode(payload).number
        child.send(protocol.encode_input_reply(number, "stray"))
        out, _, finished = await child.run("print('in sync')")
        assert out == b"in sync\n" and finished.reason == "ok"


async def test_child_refuses_exec_while_waiting_for_input() -> None:
    async with raw_child() as child, asyncio.timeout(10):
        child.send(input_exec("input()"))
        await child.until(protocol.T_INPUT_REQUEST)
        child.send(protocol.encode_exec("print(1)"))
        kind, payload = await child.frame()
        assert kind == protocol.T_FATAL and b"waiting for input" in payload
        assert await child.proc.wait() != 0
