"""Turning an execution's output into client-facing text: JSON replies and SSE events."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .execution import (
    T_DISPLAY,
    T_INPUT_REQUEST,
    T_RESULT,
    T_STDERR,
    T_STDOUT,
    Chunk,
    Execution,
    Failure,
)
from .protocol import Done, InputRequest
from .session import Run

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
EVENT_TYPE = {T_STDOUT: "output"}  # anything else is stderr: "error"
_TEXT = (T_STDOUT, T_STDERR)


def _decoder() -> codecs.IncrementalDecoder:
    # Incremental, so a multi-byte character split across two chunks still decodes;
    # invalid UTF-8 from user code becomes U+FFFD instead of an exception.
    return codecs.getincrementaldecoder("utf-8")("replace")


def merge(batch: Iterable[Chunk]) -> list[Chunk]:
    """Join neighbouring chunks of the same output stream: fewer, larger events for a slow
    client. Results, displays and input requests stay separate, in place."""
    merged: list[Chunk] = []
    pending: list[bytes] = []
    kind = -1
    for chunk_kind, data in batch:
        if (chunk_kind != kind or chunk_kind not in _TEXT) and pending:
            merged.append((kind, b"".join(pending)))
            pending = []
        kind = chunk_kind
        pending.append(data)
    if pending:
        merged.append((kind, pending[0] if len(pending) == 1 else b"".join(pending)))
    return merged


def display_data(payload: bytes) -> dict[str, Any] | None:
    """The mime bundle of a display frame; None if the frame is not one (never raises)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def completion_fields(run: Run) -> dict[str, Any]:
    """The fields both routes report when an execution ends."""
    execution = run.execution
    outcome = execution.outcome
    return_code = outcome.return_code if isinstance(outcome, Done) else 1
    return {
        "returnCode": 0 if return_code == 0 and execution.stopped_by is None else 1,
        "executionCount": run.execution_count,
        "durationMs": execution.duration_ms,
        "reason": execution.reason,
        "namespaceSurvived": isinstance(outcome, Done),
        "truncated": execution.truncated,
        "restarted": run.restart_reason is not None,
    }


def server_text(execution: Execution, limit: int) -> str:
    """The server's own account of how the execution ended, shown after its stderr."""
    lines = []
    if execution.truncated:
        lines.append(
            f"[output truncated: more than {limit} bytes were written; the rest was dropped]"
        )
    lines.extend(execution.notes)
    outcome = execution.outcome
    if isinstance(outcome, Failure):
        lines.append(outcome.message)
    return "".join(f"{line}\n" for line in lines)


async def collect(run: Run, *, output_limit: int) -> dict[str, Any]:
    """Run to completion and build /execute's JSON reply."""
    execution = run.execution
    out: list[bytes] = []
    err: list[bytes] = []
    result: str | None = None
    displays: list[dict[str, Any]] = []
    try:
        async for batch in execution.batches():
            for kind, data in batch:
                if kind == T_STDOUT:
                    out.append(data)
                elif kind == T_STDERR:
                    err.append(data)
                elif kind == T_RESULT:
                    result = data.decode("utf-8", "replace")
                elif kind == T_DISPLAY and (bundle := display_data(data)) is not None:
                    displays.append(bundle)
                # No input request reaches /execute: its code gets EOFError from input().
    finally:
        execution.detach()
    error = b"".join(err).decode("utf-8", "replace") + server_text(execution, output_limit)
    reply: dict[str, Any] = {
        "output": b"".join(out).decode("utf-8", "replace"),
        "error": error or None,
        "result": result,
        "displays": displays,
    }
    reply.update(completion_fields(run))
    return reply


def event(kind: int, data: bytes) -> dict[str, Any] | None:
    """The SSE event of a result, display or input request chunk."""
    if kind == T_RESULT:
        return {"type": "result", "content": data.decode("utf-8", "replace")}
    if kind == T_DISPLAY:
        bundle = display_data(data)
        return None if bundle is None else {"type": "display", "data": bundle}
    if kind == T_INPUT_REQUEST:
        request = InputRequest.decode(data)
        return {"type": "input_request", "prompt": request.prompt, "password": request.password}
    return None


async def stream(request: web.Request, run: Run, *, output_limit: int) -> web.StreamResponse:
    """Forward the execution as Server-Sent Events while it runs."""
    execution = run.execution
    decoders = {T_STDOUT: _decoder(), -1: _decoder()}
    dumps = json.dumps
    resp = EventSourceResponse(sep="\n", headers=SSE_HEADERS, allow_all_methods=True)
    await resp.prepare(request)
    send = resp.send
    try:
        if run.restart_reason is not None:
            await send(dumps({"type": "restart", "reason": run.restart_reason}))
        async for batch in execution.batches():
            for kind, data in merge(batch) if len(batch) > 1 else batch:
                if kind not in _TEXT:
                    rich = event(kind, data)
                    if rich is not None:
                        await send(dumps(rich))
                    continue
                key = T_STDOUT if kind == T_STDOUT else -1
                text = decoders[key].decode(data)
                if text:
                    await send(dumps({"type": EVENT_TYPE.get(kind, "error"), "content": text}))
        for key, decoder in decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                await send(dumps({"type": EVENT_TYPE.get(key, "error"), "content": tail}))
        message = server_text(execution, output_limit)
        if message:
            await send(dumps({"type": "error", "content": message}))
        await send(dumps({"type": "complete", **completion_fields(run)}))
    except (ConnectionError, TimeoutError):
        # The client went away or stalled past the send timeout: the execution runs on
        # to completion with its output dropped, and the session stays usable.
        pass
    finally:
        execution.detach()
        resp.stop_streaming()
    return resp
