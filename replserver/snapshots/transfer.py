"""Snapshot bytes to and from a session's child, over its protocol pipes.

The child is untrusted: what it sends is size-checked, its JSON summaries are read as
hostile input (types checked, lengths cut), and a child that does not answer in time is
killed, as an execution past its limit would be.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .. import protocol
from ..child import ChildProcess
from ..errors import ProtocolError

HEADER_ALLOWANCE = 4 * 1024 * 1024  # beyond the cap: the child's header (names, offsets)
MAX_SKIPPED = 200  # names listed as not saved or not restored in a reply
MAX_TEXT = 200


class TransferError(Exception):
    """A snapshot could not be taken from, or given to, the child."""


class _Collector:
    """The child's frames of one save or restore."""

    def __init__(self, limit: int, answer: int) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.answer = answer
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def __call__(self, kind: int, payload: bytes) -> None:
        if self.done.done():
            return
        if kind == protocol.T_PIECE and self.answer == protocol.T_SAVED:
            self.size += len(payload)
            if self.size > self.limit:
                self.done.set_exception(TransferError(f"more than {self.limit} bytes sent"))
            self.pieces.append(payload)
        elif kind == self.answer:
            self.done.set_result(payload)
        else:
            self.done.set_exception(TransferError(f"an unexpected frame {kind:#x}"))


async def _exchange(
    child: ChildProcess, frames: list[bytes], collector: _Collector, timeout_s: float
) -> bytes:
    child.snapshot_sink = collector
    try:
        child.send_frames(frames)
        async with asyncio.timeout(timeout_s):
            waiters: list[asyncio.Future[Any]] = [collector.done, child.ended]
            await asyncio.wait(waiters, return_when="FIRST_COMPLETED")
    except TimeoutError:
        child.kill(
            f"The session's Python process did not finish a snapshot within {timeout_s:g} s"
            " and was killed."
        )
        raise TransferError(f"no answer within {timeout_s:g} s") from None
    except ProtocolError as exc:
        raise TransferError(str(exc)) from exc
    finally:
        child.snapshot_sink = None
    if not collector.done.done():
        raise TransferError(child.error or "the process ended")
    if collector.done.exception() is not None:
        child.kill("The session's Python process sent a malformed snapshot and was killed.")
    return collector.done.result()


async def take(child: ChildProcess, limit: int, timeout_s: float) -> tuple[bytes, dict[str, Any]]:
    """The child's snapshot of its namespace and files (at most `limit` bytes of them), and
    its summary; TransferError if it has none to give."""
    collector = _Collector(limit + HEADER_ALLOWANCE, protocol.T_SAVED)
    request = protocol.encode(protocol.T_SAVE, protocol.SAVE.pack(limit))
    summary = _report(await _exchange(child, [request], collector, timeout_s))
    if "error" in summary:
        raise TransferError(summary["error"])
    return b"".join(collector.pieces), summary


async def give(child: ChildProcess, blob: bytes, timeout_s: float) -> dict[str, Any]:
    """Restore `blob` in the child; its report ({"names", "skipped", "files"} or
    {"error"}), checked."""
    step = protocol.PIECE_BYTES
    frames = [
        protocol.encode(protocol.T_PIECE, blob[start : start + step])
        for start in range(0, len(blob), step)
    ]
    frames.append(protocol.encode(protocol.T_LOAD, b""))
    return _report(await _exchange(child, frames, _Collector(0, protocol.T_LOADED), timeout_s))


def _report(payload: bytes) -> dict[str, Any]:
    """A child's JSON summary or report, reduced to the fields we use, of checked types."""
    try:
        data = json.loads(payload)
    except ValueError:
        raise TransferError("the process sent an unreadable report") from None
    if not isinstance(data, dict):
        raise TransferError("the process sent a report that is not an object")
    if "error" in data:
        return {"error": _text(data["error"])}
    names, files = data.get("names"), data.get("files", 0)
    skipped = data.get("skipped", {})
    if not isinstance(names, int) or not isinstance(files, int) or not isinstance(skipped, dict):
        raise TransferError("the process sent a report of the wrong shape")
    kept = {_text(k): _text(v) for k, v in list(skipped.items())[:MAX_SKIPPED]}
    if len(skipped) > MAX_SKIPPED:
        kept["..."] = f"and {len(skipped) - MAX_SKIPPED} more"
    return {"names": max(names, 0), "skipped": kept, "files": max(files, 0)}


def _text(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."
