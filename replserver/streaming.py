"""Turning an execution's output into client-facing text: JSON replies and SSE events."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .execution import T_STDOUT, Chunk, Execution, Failure
from .protocol import Done
from .session import Run

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
EVENT_TYPE = {T_STDOUT: "output"}  # anything else is stderr: "error"


def _decoder() -> codecs.IncrementalDecoder:
    # Incremental, so a multi-byte character split across two chunks still decodes;
    # invalid UTF-8 from user code becomes U+FFFD instead of an exception.
    return codecs.getincrementaldecoder("utf-8")("replace")


def merge(batch: Iterable[Chunk]) -> list[Chunk]:
    """Join neighbouring chunks of the same stream: fewer, larger events for a slow client."""
    merged: list[Chunk] = []
    pending: list[bytes] = []
    kind = -1
    for chunk_kind, data in batch:
        if chunk_kind != kind and pending:
            merged.append((kind, b"".join(pending)))
            pending = []
        kind = chunk_kind
        pending.append(data)
    if pending:
        merged.append((kind, pending[0] if len(pending) == 1 else b"".join(pending)))
    return merged


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
    try:
        async for batch in execution.batches():
            for kind, data in batch:
                (out if kind == T_STDOUT else err).append(data)
    finally:
        execution.detach()
    error = b"".join(err).decode("utf-8", "replace") + server_text(execution, output_limit)
    reply: dict[str, Any] = {
        "output": b"".join(out).decode("utf-8", "replace"),
        "error": error or None,
    }
    reply.update(completion_fields(run))
    return reply


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
