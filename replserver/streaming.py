"""Turning an execution's event log into client-facing text: JSON replies and SSE events."""

from __future__ import annotations

import asyncio
import codecs
import json
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import aclosing
from typing import Any

import orjson
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
from .snapshots import restore_notice

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.25
EVENT_TYPE = {T_STDOUT: "output", T_STDERR: "error"}
_TEXT = (T_STDOUT, T_STDERR)

# The stream protocols a client can ask for (the request's "protocol" field). 1, the
# default, is the old backend's stream byte for byte in its framing: `data:` lines only and
# the types output, error and complete. 2 adds SSE ids and the richer event types.
PROTOCOL_OLD = 1
PROTOCOL_RICH = 2
PROTOCOLS = (PROTOCOL_OLD, PROTOCOL_RICH)


def json_string(text: str) -> bytes:
    """`text` as a JSON string, quotes included, byte for byte as json.dumps writes it
    (ensure_ascii: what protocol 1's clients got from the old backend)."""
    # orjson escapes ASCII exactly as json.dumps does, except DEL (U+007F), which json.dumps
    # writes as \u007f; it writes other non-ASCII as UTF-8 where json.dumps escapes it.
    if text.isascii() and "\x7f" not in text:
        return orjson.dumps(text)
    return json.dumps(text).encode()


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
        return json_string(text)[1:-1] if text else b""


JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class ReplyWriter:
    """A response body sent in pieces of about REPLY_FLUSH_BYTES. A reply smaller than that
    leaves whole at the end, with a Content-Length, exactly as json_response sent it (the
    headers arrive when the execution is over); a larger one starts at the first piece."""

    def __init__(self, request: web.Request, headers: dict[str, str]) -> None:
        self._request = request
        self._headers = headers
        self._pending: list[bytes] = []
        self._size = 0
        # Made when it is known which one it is: a small reply never builds the stream.
        self._response: web.StreamResponse | None = None

    @property
    def response(self) -> web.StreamResponse:
        """What the handler returns."""
        if self._response is None:
            self._response = web.StreamResponse(headers=self._headers)
        return self._response

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        if self._size >= REPLY_FLUSH_BYTES:
            pending, self._pending, self._size = self._pending, [], 0
            resp = self.response
            if not resp.prepared:
                await resp.prepare(self._request)
            await resp.write(b"".join(pending))

    async def close(self, data: bytes) -> None:
        """Send what is pending, then `data`, and end the body (see `response`)."""
        rest = b"".join((*self._pending, data))
        self._pending, self._size = [], 0
        resp = self._response
        if resp is None or not resp.prepared:
            # A whole reply leaves as a Response, whose headers go out in the same send as
            # its body; a StreamResponse sends its headers as soon as it is prepared, which
            # costs a second send and, for the client, a second segment to wait for.
            self._response = web.Response(body=rest, headers=self._headers)
            return
        await resp.write_eof(rest)


async def collect(request: web.Request, run: Run, *, output_limit: int) -> web.StreamResponse:
    """Run to completion while writing /execute's JSON reply.

    The reply is the object `{"output": ..., "error": ..., "result": ..., "displays": ...,
    <completion fields>}`, written as the output arrives: stdout is escaped and sent piece by
    piece, so a 16 MiB reply never exists whole in the server. Only what comes after it in
    the object waits: the raw stderr bytes (within the output cap), the result, displays.
    A small reply is sent whole at the end, as before (ReplyWriter).
    """
    execution = run.execution
    headers = {"Content-Type": JSON_CONTENT_TYPE, "X-Execution-Id": execution.id}
    body = ReplyWriter(request, headers)
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
        fields = {"result": result, "displays": displays, **completion_fields(run)}
        if run.restored is not None:
            fields["restored"] = run.restored
        rest = json.dumps(fields)
        await body.close(b", " + rest[1:].encode())
    except ConnectionError:
        pass  # the client went away; the execution ran on to its end or runs on unread
    finally:
        execution.release_initial()
    return body.response


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


# An SSE event ready to frame: its JSON object as byte pieces to join (a text event's escaped
# content is the big piece, never copied into a string of its own), and its id.
Event = tuple[tuple[bytes, ...], str]
_TEXT_EVENT_HEAD = {
    kind: f'{{"type": "{name}", "content": '.encode() for kind, name in EVENT_TYPE.items()
}


def _json(value: dict[str, Any]) -> tuple[bytes, ...]:
    return (json.dumps(value).encode(),)


class EventRenderer:
    """Log entries to SSE events (JSON text, id) for one client connection.

    For protocol 1 what its clients cannot use is adapted instead of sent: a restart
    notice becomes an `error` event, a display its `text/plain` as `output`; results, gaps
    and the `start` event are left out.
    """

    def __init__(self, run: Run, output_limit: int, *, protocol: int = PROTOCOL_RICH) -> None:
        self._run = run
        self._limit = output_limit
        self._rich = protocol == PROTOCOL_RICH
        self._decoders = {T_STDOUT: _decoder(), T_STDERR: _decoder()}

    def opening(self) -> list[Event]:
        """The events a fresh stream starts with: a restart or restore notice, the
        execution's id."""
        run = self._run
        events = []
        reason = run.restart_reason
        if reason is not None and self._rich:
            events.append((_json({"type": "restart", "reason": reason}), "0"))
        elif reason is not None:
            notice = f"[the session was restarted ({reason}): earlier state is lost]\n"
            events.append((_json({"type": "error", "content": notice}), "0"))
        restored = run.restored
        if restored is not None and self._rich:
            events.append((_json({"type": "restore", **restored}), "0"))
        elif restored is not None and (lost := restore_notice(restored)) is not None:
            events.append((_json({"type": "error", "content": lost}), "0"))
        if self._rich:
            start = {"type": "start", "executionId": run.execution.id, "sessionId": run.session_id}
            events.append((_json(start), "0"))
        return events

    def render(self, batch: list[Entry]) -> list[Event]:
        events: list[Event] = []
        for seq, kind, data in merge(batch) if len(batch) > 1 else batch:
            if kind == T_END:
                events.extend((event, str(seq)) for event in self._ending())
            elif kind in _TEXT:
                text = self._decoders[kind].decode(data)
                if text:
                    # As json.dumps({"type": ..., "content": text}) writes it, byte for byte.
                    events.append(((_TEXT_EVENT_HEAD[kind], json_string(text), b"}"), str(seq)))
            elif self._rich:
                rich = gap_event(data) if kind == T_GAP else rich_event(kind, data)
                if rich is not None:
                    events.append((_json(rich), str(seq)))
            elif kind == T_DISPLAY and (text := display_text(data)):
                events.append((_json({"type": "output", "content": text}), str(seq)))
        return events

    def _ending(self) -> list[tuple[bytes, ...]]:
        events: list[tuple[bytes, ...]] = []
        for kind, decoder in self._decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                events.append(_json({"type": EVENT_TYPE[kind], "content": tail}))
        message = server_text(self._run.execution, self._limit)
        if message:
            events.append(_json({"type": "error", "content": message}))
        events.append(_json({"type": "complete", **completion_fields(self._run)}))
        return events


def gap_event(data: bytes) -> dict[str, Any]:
    """The event of a gap marker: how many events the reader missed."""
    return {"type": "gap", "missedEvents": int(data)}


def display_text(payload: bytes) -> str:
    """A display as a protocol-1 client sees it: its `text/plain`, as a line of output."""
    bundle = display_data(payload)
    text = bundle.get("text/plain") if bundle is not None else None
    if not isinstance(text, str) or not text:
        return ""
    return text if text.endswith("\n") else text + "\n"


def frame(events: list[Event], *, protocol: int = PROTOCOL_RICH) -> bytes:
    """SSE bytes for a batch of events, written at once (joined in one copy).

    Protocol 1 is `data: <json>` and a blank line per event, nothing else: the framing
    of the old backend, whose clients split the body on blank lines and parse what
    follows `data: `. Protocol 2 adds an `id:` line after `data:` (both orders are valid
    SSE; this one keeps working for clients that read each event's first line as its
    data). The JSON is one line (JSON escapes newlines), so one `data:` field carries it.
    """
    parts: list[bytes] = []
    for pieces, event_id in events:
        parts.append(b"data: ")
        parts.extend(pieces)
        parts.append(b"\n\n" if protocol == PROTOCOL_OLD else f"\nid: {event_id}\n\n".encode())
    return b"".join(parts)


async def stream(
    request: web.Request,
    run: Run,
    *,
    output_limit: int,
    protocol: int = PROTOCOL_RICH,
    after: int = 0,
    on_disconnect: Callable[[], object] | None = None,
) -> web.StreamResponse:
    """Forward the execution as Server-Sent Events while it runs; the stream closes right
    after `complete`.

    `after` > 0 reattaches: only events after that SSE id are sent (a `gap` event first if
    some were dropped). A client that has already seen the end of a finished execution gets
    204 No Content, which tells an EventSource to stop reconnecting. If the client goes
    away, the execution runs on (its events kept for a reattach) unless `on_disconnect`
    stops it.
    """
    execution = run.execution
    renderer = EventRenderer(run, output_limit, protocol=protocol)
    headers = {**SSE_HEADERS, "X-Execution-Id": execution.id}
    resp = EventSourceResponse(sep="\n", headers=headers, allow_all_methods=True)
    watchdog = asyncio.create_task(_watch_connection(request, execution))
    try:
        async with aclosing(execution.follow(after)) as entries:
            first: list[Entry] | None = None
            if execution.outcome is not None:
                # Over already: the first batch is there at once, or there is nothing left.
                first = await anext(entries, None)
                if first is None:
                    return web.Response(status=204, headers={"X-Execution-Id": execution.id})
            await resp.prepare(request)
            if after == 0:
                await resp.write(frame(renderer.opening(), protocol=protocol))
            if first is not None:
                await resp.write(frame(renderer.render(first), protocol=protocol))
            async for batch in entries:
                await resp.write(frame(renderer.render(batch), protocol=protocol))
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
