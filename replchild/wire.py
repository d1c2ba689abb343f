"""The frame format, for both sides: frame types, flags, reasons, layouts and encoders.

A frame is a 5-byte header (type, big-endian payload length) and a payload. Output travels
as raw bytes, never re-encoded; results, prompts and replies are UTF-8 text, displays JSON;
only the completion record and the input frames have a binary layout. runner_child.py
and replserver/protocol.py both use this module, so the two ends cannot disagree.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">BI")  # frame type, payload length
HEADER_SIZE = HEADER.size

T_EXEC = 0x58  # 'X' server -> child: flags byte + UTF-8 code
FLAG_REAP = 0x01  # EXEC flag: processes of the child were killed; reap their zombies first
FLAG_INPUT = 0x02  # EXEC flag: input requests can be answered (a stream); else EOFError
T_INPUT_REPLY = 0x69  # 'i' server -> child: INPUT layout (number, status), UTF-8 value
T_STDOUT = 0x4F  # 'O' child -> server: raw bytes written to fd 1
T_STDERR = 0x45  # 'E' child -> server: raw bytes written to fd 2
T_RESULT = 0x56  # 'V' child -> server: UTF-8 repr of the value of the final expression
T_DISPLAY = 0x4D  # 'M' child -> server: JSON mime bundle, binary data base64-encoded
T_INPUT_REQUEST = 0x49  # 'I' child -> server: INPUT layout (number, flags), UTF-8 prompt
T_DONE = 0x44  # 'D' child -> server: DONE layout, UTF-8 note; the execution finished
T_READY = 0x52  # 'R' child -> server: set up and waiting; payload is its pid as text
T_FATAL = 0x21  # '!' child -> server: protocol error text, then the child exits
T_QUERY = 0x51  # 'Q' server -> child: JSON {"op": "complete"|"inspect", "code", "cursor"}
T_ANSWER = 0x71  # 'q' child -> server: JSON answer to the oldest unanswered query
T_STARTUP = 0x53  # 'S' child -> server: JSON report of preloads and startup code, before READY
# Snapshots (replchild/snapshot.py, replserver/snapshots/): opaque bytes in pieces of at
# most PIECE_BYTES, so that neither side's frame limit bounds a snapshot's size.
T_SAVE = 0x4B  # 'K' server -> child (keep): SAVE layout; reply: PIECE frames, then SAVED
T_PIECE = 0x50  # 'P' either way: the next piece of a snapshot
T_SAVED = 0x6B  # 'k' child -> server: JSON summary; the snapshot's pieces are all sent
T_LOAD = 0x4C  # 'L' server -> child: restore from the pieces sent before it; reply: LOADED
T_LOADED = 0x6C  # 'l' child -> server: JSON report of what was restored and what was not
PIECE_BYTES = 1024 * 1024

INPUT_PASSWORD = 0x01  # INPUT_REQUEST flag: getpass, the answer is not echoed
INPUT_VALUE = 0  # INPUT_REPLY status: the value follows
INPUT_EOF = 1  # INPUT_REPLY status: no answer will come; input() raises EOFError

REASON_OK = 0
REASON_EXCEPTION = 1
REASON_EXIT = 2  # SystemExit with a non-zero code
REASON_INTERRUPTED = 3
REASON_MEMORY = 4

DONE = struct.Struct(">iIBQQ")  # return code, execution count, reason, CPU us, peak RSS bytes
INPUT = struct.Struct(">IB")  # input request and reply: request number, flags or status
SAVE = struct.Struct(">Q")  # the snapshot's size cap in bytes


def encode(kind: int, payload: bytes) -> bytes:
    """One frame as a single bytes object (one write keeps a frame whole)."""
    return HEADER.pack(kind, len(payload)) + payload


def encode_exec(code: str, flags: int = 0) -> bytes:
    """The request frame for running `code`."""
    body = code.encode("utf-8", "surrogatepass")
    return HEADER.pack(T_EXEC, len(body) + 1) + bytes((flags,)) + body


def encode_input_reply(number: int, value: str | None) -> bytes:
    """The answer to input request `number`; None means end of input (EOFError)."""
    if value is None:
        return encode(T_INPUT_REPLY, INPUT.pack(number, INPUT_EOF))
    body = value.encode("utf-8", "surrogatepass")
    return encode(T_INPUT_REPLY, INPUT.pack(number, INPUT_VALUE) + body)


def encode_input_request(number: int, prompt: bytes, *, password: bool) -> bytes:
    """The frame asking the client for input request `number`."""
    flags = INPUT_PASSWORD if password else 0
    return encode(T_INPUT_REQUEST, INPUT.pack(number, flags) + prompt)


def encode_done(
    return_code: int, count: int, reason: int, cpu_us: int, peak_rss: int, note: bytes
) -> bytes:
    """The completion frame of execution number `count`."""
    return encode(T_DONE, DONE.pack(return_code, count, reason, cpu_us, peak_rss) + note)
