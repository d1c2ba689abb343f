"""The server's end of the frames: decoding the child's records, and an incremental parser.

The format itself (frame types, flags, layouts, encoders) is defined once, in
replchild/wire.py, which the child uses too; this module re-exports it for the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# The layouts, private here: only the decoders below use them.
from replchild.wire import DONE as _DONE
from replchild.wire import (
    FLAG_INPUT,
    FLAG_REAP,
    HEADER,
    HEADER_SIZE,
    INPUT_EOF,
    INPUT_PASSWORD,
    INPUT_VALUE,
    PIECE_BYTES,
    REASON_EXCEPTION,
    REASON_EXIT,
    REASON_INTERRUPTED,
    REASON_MEMORY,
    REASON_OK,
    SAVE,
    T_ANSWER,
    T_DISPLAY,
    T_DONE,
    T_EXEC,
    T_FATAL,
    T_INPUT_REPLY,
    T_INPUT_REQUEST,
    T_LOAD,
    T_LOADED,
    T_PIECE,
    T_QUERY,
    T_READY,
    T_RESULT,
    T_SAVE,
    T_SAVED,
    T_STARTUP,
    T_STDERR,
    T_STDOUT,
    encode,
    encode_exec,
    encode_input_reply,
)
from replchild.wire import INPUT as _INPUT

__all__ = [
    "FLAG_INPUT",
    "FLAG_REAP",
    "HEADER",
    "HEADER_SIZE",
    "INPUT_EOF",
    "INPUT_PASSWORD",
    "INPUT_VALUE",
    "PIECE_BYTES",
    "REASON_EXCEPTION",
    "REASON_EXIT",
    "REASON_INTERRUPTED",
    "REASON_MEMORY",
    "REASON_NAMES",
    "REASON_OK",
    "SAVE",
    "SNAPSHOT_FRAMES",
    "T_ANSWER",
    "T_DISPLAY",
    "T_DONE",
    "T_EXEC",
    "T_FATAL",
    "T_INPUT_REPLY",
    "T_INPUT_REQUEST",
    "T_LOAD",
    "T_LOADED",
    "T_PIECE",
    "T_QUERY",
    "T_READY",
    "T_RESULT",
    "T_SAVE",
    "T_SAVED",
    "T_STARTUP",
    "T_STDERR",
    "T_STDOUT",
    "Done",
    "FrameParser",
    "FrameTooLarge",
    "InputRequest",
    "Malformed",
    "check_display",
    "decode_ready",
    "encode",
    "encode_exec",
    "encode_input_reply",
]

REASON_NAMES = {
    REASON_OK: "ok",
    REASON_EXCEPTION: "exception",
    REASON_EXIT: "exit",
    REASON_INTERRUPTED: "interrupted",
    REASON_MEMORY: "memory",
}


# What the child sends while a snapshot is saved or restored.
SNAPSHOT_FRAMES = frozenset((T_PIECE, T_SAVED, T_LOADED))


class Malformed(ValueError):
    """A frame's payload does not have the layout of its type."""


class FrameTooLarge(ValueError):
    """A frame header announced more bytes than the agreed maximum."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class InputRequest:
    """The child waits in input() or getpass() for the answer to request `number`."""

    number: int
    prompt: str
    password: bool

    @classmethod
    def decode(cls, payload: bytes) -> InputRequest:
        """Raises Malformed unless the payload is a request number, known flags, UTF-8."""
        if len(payload) < _INPUT.size:
            raise Malformed(f"an input request of {len(payload)} bytes")
        number, flags = _INPUT.unpack_from(payload)
        if flags & ~INPUT_PASSWORD:
            raise Malformed(f"an input request with unknown flags {flags:#x}")
        prompt = _utf8(payload[_INPUT.size :], "an input prompt")
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
        """Raises Malformed unless the payload is the binary record, then a UTF-8 note."""
        if len(payload) < _DONE.size:
            raise Malformed(f"a completion record of {len(payload)} bytes")
        code, count, reason, cpu_us, peak = _DONE.unpack_from(payload)
        if reason not in REASON_NAMES:
            raise Malformed(f"a completion record with unknown reason {reason}")
        note = _utf8(payload[_DONE.size :], "a completion note")
        return cls(code, count, REASON_NAMES[reason], cpu_us, peak, note)


def decode_ready(payload: bytes) -> int:
    """The pid a READY frame carries; Malformed unless it is 1-10 decimal digits, not 0."""
    if not (0 < len(payload) <= 10 and payload.isdigit() and int(payload) > 0):
        raise Malformed(f"a ready frame with {payload[:20]!r} for a pid")
    return int(payload)


def check_display(payload: bytes) -> None:
    """Malformed unless a display's payload is a JSON object (a mime bundle)."""
    try:
        bundle = json.loads(payload)
    except ValueError:  # includes UnicodeDecodeError
        raise Malformed("a display that is not JSON") from None
    if not isinstance(bundle, dict):
        raise Malformed("a display that is not a JSON object")


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"{what} that is not UTF-8") from None


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
