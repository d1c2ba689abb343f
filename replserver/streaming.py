"""Turning an execution's event log into client-facing text: JSON replies and SSE events."""

from __future__ import annotations

import asyncio
import codecs
import json
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import aclosing
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .execution import (
    T_DISPLAY,
    T_END,
    T_GAP,
    T_INPUT_REQUEST,
    T_RESULT,
    T_STDERR,
    T_STDOUT,
    Entry,
    Execution,
    Failure,
)
from .protocol import Done, InputRequest
from .session import Run

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.25
EVENT_TYPE = {T_STDOUT: "output"}  # anything else is stderr: "error"
_TEXT = (T_STDOUT, T_STDERR)


def _decoder() -> codecs.IncrementalDecoder:
    # Incremental, so a multi-byte character split across two chunks still decodes;
    # invalid UTF-8 from user code becomes U+FFFD instead of an exception.
    return codecs.getincrementaldecoder("utf-8")("replace")


def merge(batch: Iterable[Entry]) -> list[Entry]:
    """Join neighbouring output entries of the same stream: fewer, larger events for a
    slow client. The joined event keeps the last entry's sequence number; results,
    displays and input requests stay separate, in place."""
    merged: list[Entry] = []
    parts: list[bytes] = []
    for entry in batch:
        if parts and entry[1] == merged[-1][1] and entry[1] in _TEXT:
            parts.append(entry[2])
            merged[-1] = (entry[0], entry[1], b"")
            continue
        if len(parts) > 1:
            seq, kind, _ = merged[-1]
            merged[-1] = (seq, kind, b"".join(parts))
        merged.append(entry)
        parts = [entry[2]] if entry[1] in _TEXT else []
    if len(parts) > 1:
        seq, kind, _ = merged[-1]
        merged[-1] = (seq, kind, b"".join(parts))
    return merged


def display_data(payload: bytes) -> dict[str, Any] | None:
    """The mime bundle of a display frame; None if the frame is not one (never raises)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def rich_event(kind: int, data: bytes) -> dict[str, Any] | None:
    """The SSE event of a result, display or input request entry."""
    if kind == T_RESULT:
        return {"type": "result", "content": data.decode("utf-8", "replace")}
    if kind == T_DISPLAY:
        bundle = display_data(data)
        return None if bundle is None else {"type": "display", "data": bundle}
    if kind == T_INPUT_REQUEST:
        request = InputRequest.decode(data)
        return {"type": "input_request", "prompt": request.prompt, "password": request.password}
    return None


def completion_fields(run: Run) -> dict[str, Any]:
    """The fields both routes report when an execution ends."""
    execution = run.execution
    outcome = execution.outcome
    done = outcome if isinstance(outcome, Done) else None
    return_code = done.return_code if done is not None else 1
    return {
        "returnCode": 0 if return_code == 0 and execution.stopped_by is None else 1,
        "executionCount": run.execution_count,
        "executionId": execution.id,
        "durationMs": execution.duration_ms,
        "cpuMs": round(done.cpu_us / 1000, 3) if done is not None else None,
        "peakRssBytes": done.peak_rss_bytes if done is not None else None,
        "reason": execution.reason,
        "namespaceSurvived": done is not None,
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


REPLY_FLUSH_BYTES = 64 * 1024  # /execute's reply is sent in pieces of about this size


class JsonText:
    """One JSON string written as its bytes arrive: decoded incrementally (a character split
    between two pieces still decodes), escaped piece by piece, never held whole."""

    def __init__(self) -> None:
        self._decoder = _decoder()

    def feed(self, data: bytes, *, final: bool = False) -> bytes:
        """The escaped text of `data` (without quotes): ASCII, as json.dumps writes it."""
        text = self._decoder.decode(data, final)
        return json.dumps(text)[1:-1].encode() if text else b""


class ReplyWriter:
    """A response body sent in pieces of about REPLY_FLUSH_BYTES. A reply smaller than that
    leaves whole at the end, with a Content-Length, exactly as json_response sent it (the
    headers arrive when the execution is over); a larger one starts at the first piece."""

    def __init__(self, request: web.Request, resp: web.StreamResponse) -> None:
        self._request = request
        self._resp = resp
        self._pending: list[bytes] = []
        self._size = 0

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        if self._size >= REPLY_FLUSH_BYTES:
            pending, self._pending, self._size = self._pending, [], 0
            if not self._resp.prepared:
                await self._resp.prepare(self._request)
            await self._resp.write(b"".join(pending))

    async def close(self, data: bytes) -> None:
        """Send what is pending, then `data`, and end the body."""
        rest = b"".join((*self._pending, data))
        self._pending, self._size = [], 0
        if not self._resp.prepared:
            self._resp.content_length = len(rest)
            await self._resp.prepare(self._request)
        await self._resp.write_eof(rest)


async def collect(request: web.Request, run: Run, *, output_limit: int) -> web.StreamResponse:
    """Run to completion while writing /execute's JSON reply.

    The reply is the object `{"output": ..., "error": ..., "result": ..., "displays": ...,
    <completion fields>}`, written as the output arrives: stdout is escaped and sent piece by
    piece, so a 16 MiB reply never exists whole in the server. Only what comes after it in
    the object waits: the raw stderr bytes (within the output cap), the result, displays.
    A small reply is sent whole at the end, as before (ReplyWriter).
    """
    execution = run.execution
    resp = web.StreamResponse(headers={"X-Execution-Id": execution.id})
    resp.content_type = "application/json"
    resp.charset = "utf-8"
    body = ReplyWriter(request, resp)
    err: deque[bytes] = deque()
    result: str | None = None
    displays: list[dict[str, Any]] = []
    output = JsonText()
    try:
        async with aclosing(execution.follow()) as entries:
            await body.write(b'{"output": "')
            async for batch in entries:
                for _, kind, data in batch:
                    if kind == T_STDOUT:
                        await body.write(output.feed(data))
                    elif kind == T_STDERR:
                        err.append(data)
                    elif kind == T_RESULT:
                        result = data.decode("utf-8", "replace")
                    elif kind == T_DISPLAY and (bundle := display_data(data)) is not None:
                        displays.append(bundle)
                    # No input request reaches /execute: its code gets EOFError from input().
        await body.write(output.feed(b"", final=True) + b'"')
        await _write_error(body, err, server_text(execution, output_limit))
        rest = json.dumps({"result": result, "displays": displays, **completion_fields(run)})
        await body.close(b", " + rest[1:].encode())
    except ConnectionError:
        pass  # the client went away; the execution ran on to its end or runs on unread
    finally:
        execution.release_initial()
    return resp


async def _write_error(body: ReplyWriter, err: deque[bytes], notes: str) -> None:
    """The `error` member: stderr then the server's notes, or null when both are empty."""
    if not err and not notes:
        await body.write(b', "error": null')
        return
    text = JsonText()
    await body.write(b', "error": "')
    while err:  # popped as written: the buffered stderr shrinks as the reply grows
        await body.write(text.feed(err.popleft()))
    tail = text.feed(b"", final=True) + json.dumps(notes)[1:-1].encode()
    await body.write(tail + b'"')


class EventRenderer:
    """Log entries to SSE events (JSON text, id) for one client connection."""

    def __init__(self, run: Run, output_limit: int) -> None:
        self._run = run
        self._limit = output_limit
        self._decoders = {T_STDOUT: _decoder(), -1: _decoder()}

    def opening(self) -> list[tuple[str, str]]:
        """The events a fresh stream starts with: a restart notice, the execution's id."""
        run, dumps = self._run, json.dumps
        events = []
        if run.restart_reason is not None:
            events.append((dumps({"type": "restart", "reason": run.restart_reason}), "0"))
        start = {"type": "start", "executionId": run.execution.id, "sessionId": run.session_id}
        events.append((dumps(start), "0"))
        return events

    def render(self, batch: list[Entry]) -> list[tuple[str, str]]:
        dumps = json.dumps
        events: list[tuple[str, str]] = []
        for seq, kind, data in merge(batch) if len(batch) > 1 else batch:
            if kind == T_GAP:
                missed = {"type": "gap", "missedEvents": int(data)}
                events.append((dumps(missed), str(seq)))
            elif kind == T_END:
                events.extend((event, str(seq)) for event in self._ending())
            elif kind not in _TEXT:
                rich = rich_event(kind, data)
                if rich is not None:
                    events.append((dumps(rich), str(seq)))
            else:
                key = T_STDOUT if kind == T_STDOUT else -1
                text = self._decoders[key].decode(data)
                if text:
                    event = {"type": EVENT_TYPE.get(kind, "error"), "content": text}
                    events.append((dumps(event), str(seq)))
        return events

    def _ending(self) -> list[str]:
        dumps = json.dumps
        events = []
        for key, decoder in self._decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                events.append(dumps({"type": EVENT_TYPE.get(key, "error"), "content": tail}))
        message = server_text(self._run.execution, self._limit)
        if message:
            events.append(dumps({"type": "error", "content": message}))
        events.append(dumps({"type": "complete", **completion_fields(self._run)}))
        return events


def frame(events: list[tuple[str, str]]) -> bytes:
    """SSE bytes for a batch of events, written at once.

    `data:` comes first and `id:` after it: both orders are valid SSE, and this one keeps
    working for the older frontends that read each event's first line as its data. The
    JSON is one line (json.dumps escapes newlines), so one `data:` field carries it.
    """
    return "".join(f"data: {data}\nid: {event_id}\n\n" for data, event_id in events).encode()


async def stream(
    request: web.Request,
    run: Run,
    *,
    output_limit: int,
    after: int = 0,
    on_disconnect: Callable[[], object] | None = None,
) -> web.StreamResponse:
    """Forward the execution as Server-Sent Events while it runs.

    `after` > 0 reattaches: only events after that SSE id are sent (a `gap` event first if
    some were dropped). If the client goes away, the execution runs on (its events kept for
    a reattach) unless `on_disconnect` stops it.
    """
    execution = run.execution
    renderer = EventRenderer(run, output_limit)
    headers = {**SSE_HEADERS, "X-Execution-Id": execution.id}
    resp = EventSourceResponse(sep="\n", headers=headers, allow_all_methods=True)
    watchdog = asyncio.create_task(_watch_connection(request, execution))
    try:
        async with aclosing(execution.follow(after)) as entries:
            await resp.prepare(request)
            if after == 0:
                await resp.write(frame(renderer.opening()))
            async for batch in entries:
                await resp.write(frame(renderer.render(batch)))
    except (ConnectionError, TimeoutError):
        pass  # the client went away or stalled past the send timeout
    finally:
        watchdog.cancel()
        execution.release_initial()
        if resp.prepared:
            resp.stop_streaming()
        if execution.outcome is None and on_disconnect is not None:
            # We stopped following before the end (including by cancellation, where the
            # server cancels handlers on disconnect): the client is gone.
            on_disconnect()
    return resp


async def _watch_connection(request: web.Request, execution: Execution) -> None:
    """Notice a client that left while nothing is being written to it (silent code, or a
    paused child), and let its stream end: aiohttp does not cancel the handler."""
    while True:
        await asyncio.sleep(DISCONNECT_POLL_S)
        transport = request.transport
        if transport is None or transport.is_closing():
            execution.drop_reader()
            return
