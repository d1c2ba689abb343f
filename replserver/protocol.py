"""Frames exchanged with runner_child.py: a 5-byte header (type, big-endian length), a payload.

Output travels as raw bytes, never re-encoded; results, prompts and replies are UTF-8 text,
displays JSON; only the completion record and the input frames have a binary layout.
runner_child.py carries its own copy of these constants (it must not import this package);
tests/test_protocol.py checks that the two copies agree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size

T_EXEC = 0x58  # 'X' server -> child: flags byte + UTF-8 code
FLAG_REAP = 0x01  # EXEC flag: processes of the child were killed; reap their zombies first
FLAG_INPUT = 0x02  # EXEC flag: input requests can be answered (a stream); else EOFError
T_INPUT_REPLY = 0x69  # 'i' server -> child: request number (4), status byte, UTF-8 value
T_STDOUT = 0x4F  # 'O' child -> server: raw bytes written to fd 1
T_STDERR = 0x45  # 'E' child -> server: raw bytes written to fd 2
T_RESULT = 0x56  # 'V' child -> server: UTF-8 repr of the value of the final expression
T_DISPLAY = 0x4D  # 'M' child -> server: JSON mime bundle, binary data base64-encoded
T_INPUT_REQUEST = 0x49  # 'I' child -> server: request number (4), flags byte, UTF-8 prompt
T_DONE = 0x44  # 'D' child -> server: execution finished
T_READY = 0x52  # 'R' child -> server: set up and waiting; payload is its pid
T_FATAL = 0x21  # '!' child -> server: protocol error text, then the child exits
T_QUERY = 0x51  # 'Q' server -> child: JSON {"op": "complete"|"inspect", "code", "cursor"}
T_ANSWER = 0x71  # 'q' child -> server: JSON answer to the oldest unanswered query
T_STARTUP = 0x53  # 'S' child -> server: JSON report of preloads and startup code, before READY

INPUT_PASSWORD = 0x01  # INPUT_REQUEST flag: getpass, the answer is not echoed
INPUT_VALUE = 0  # INPUT_REPLY status: the value follows
INPUT_EOF = 1  # INPUT_REPLY status: no answer will come; input() raises EOFError

REASON_OK = 0
REASON_EXCEPTION = 1
REASON_EXIT = 2
REASON_INTERRUPTED = 3
REASON_MEMORY = 4
REASON_NAMES = {
    REASON_OK: "ok",
    REASON_EXCEPTION: "exception",
    REASON_EXIT: "exit",
    REASON_INTERRUPTED: "interrupted",
    REASON_MEMORY: "memory",
}

_DONE = struct.Struct(">iIBQQ")  # return code, count, reason, CPU us, peak RSS bytes
_INPUT = struct.Struct(">IB")  # input request and reply: request number, flags or status


class FrameTooLarge(ValueError):
    """A frame header announced more bytes than the agreed maximum."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


def encode(kind: int, payload: bytes) -> bytes:
    """One frame as a single bytes object."""
    return HEADER.pack(kind, len(payload)) + payload


def encode_exec(code: str, flags: int = 0) -> bytes:
    """The request frame for running `code`."""
    body = code.encode("utf-8", "surrogatepass")
    return HEADER.pack(T_EXEC, len(body) + 1) + bytes((flags,)) + body


def encode_input_reply(number: int, value: str | None) -> bytes:
    """The answer to input request `number`; None means end of input (EOFError)."""
    if value is None:
        return encode(T_INPUT_REPLY, _INPUT.pack(number, INPUT_EOF))
    body = value.encode("utf-8", "surrogatepass")
    return encode(T_INPUT_REPLY, _INPUT.pack(number, INPUT_VALUE) + body)


@dataclass(frozen=True, slots=True)
class InputRequest:
    """The child waits in input() or getpass() for the answer to request `number`."""

    number: int
    prompt: str
    password: bool

    @classmethod
    def decode(cls, payload: bytes) -> InputRequest:
        number, flags = _INPUT.unpack_from(payload)
        prompt = payload[_INPUT.size :].decode("utf-8", "replace")
        return cls(number, prompt, bool(flags & INPUT_PASSWORD))


@dataclass(frozen=True, slots=True)
class Done:
    """The child's completion record for one execution."""

    return_code: int
    execution_count: int
    reason: str
    cpu_us: int
    peak_rss_bytes: int
    note: str

    @classmethod
    def decode(cls, payload: bytes) -> Done:
        code, count, reason, cpu_us, peak = _DONE.unpack_from(payload)
        note = payload[_DONE.size :].decode("utf-8", "replace")
        return cls(code, count, REASON_NAMES.get(reason, "exception"), cpu_us, peak, note)


class FrameParser:
    """Incremental parser: feed bytes as they arrive, get whole frames back.

    Frames of output are up to 256 KiB and pipe reads are too, so most frames span two
    reads: the pieces are kept as they came and joined once, when the frame is complete
    (each byte is copied twice at most: the join, and the slice that becomes the payload).
    """

    __slots__ = ("_limit", "_need", "_pending", "_pending_len")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pending: list[bytes | memoryview] = []
        self._pending_len = 0
        self._need = HEADER_SIZE  # bytes the pending pieces must reach to be worth a look

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Frames completed by `data`, in order; raises FrameTooLarge on a bad header."""
        if self._pending:
            self._pending.append(data)
            self._pending_len += len(data)
            if self._pending_len < self._need:
                return []
            data = b"".join(self._pending)
            self._pending = []
        frames: list[tuple[int, bytes]] = []
        total = len(data)
        pos = 0
        need = HEADER_SIZE
        while total - pos >= HEADER_SIZE:
            kind, size = HEADER.unpack_from(data, pos)
            if size > self._limit:
                raise FrameTooLarge(size, self._limit)
            end = pos + HEADER_SIZE + size
            if end > total:
                need = HEADER_SIZE + size
                break
            frames.append((kind, data[pos + HEADER_SIZE : end]))
            pos = end
        if pos < total:
            rest = memoryview(data)[pos:]
            self._pending = [rest]
            self._pending_len = len(rest)
            self._need = need
        return frames
