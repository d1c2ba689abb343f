"""The server's end of the frames: decoding the child's records, and an incremental parser.

The format itself (frame types, flags, layouts, encoders) is defined once, in
replchild/wire.py, which the child uses too; this module re-exports it for the server.
"""

from __future__ import annotations

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
    REASON_EXCEPTION,
    REASON_EXIT,
    REASON_INTERRUPTED,
    REASON_MEMORY,
    REASON_OK,
    T_DISPLAY,
    T_DONE,
    T_EXEC,
    T_FATAL,
    T_INPUT_REPLY,
    T_INPUT_REQUEST,
    T_READY,
    T_RESULT,
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
    "REASON_EXCEPTION",
    "REASON_EXIT",
    "REASON_INTERRUPTED",
    "REASON_MEMORY",
    "REASON_NAMES",
    "REASON_OK",
    "T_DISPLAY",
    "T_DONE",
    "T_EXEC",
    "T_FATAL",
    "T_INPUT_REPLY",
    "T_INPUT_REQUEST",
    "T_READY",
    "T_RESULT",
    "T_STDERR",
    "T_STDOUT",
    "Done",
    "FrameParser",
    "FrameTooLarge",
    "InputRequest",
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
