"""Output delivery: large output, incremental streaming, concurrency, disconnects, backpressure."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from aiohttp import ClientResponse

from replserver.routes import MANAGER

from .conftest import Client, MakeClient, execute, parse_sse, stream, wait_for_session

BIG_CODE = (
    "import sys\nfor i in range(5000):\n    sys.stdout.write(f'{i:08d}' + 'x' * 1015 + '\\n')"
)
BIG_EXPECTED = "".join(f"{i:08d}" + "x" * 1015 + "\n" for i in range(5000))


def joined(events: list[dict[str, Any]], kind: str) -> str:
    return "".join(e["content"] for e in events if e["type"] == kind)


async def next_event(resp: ClientResponse) -> dict[str, Any]:
    """Read the stream line by line up to the next `data:` event (past the opening `start`)."""
    while True:
        line = await resp.content.readline()
        assert line, "stream ended before the next event"
        if line.startswith(b"data: "):
            event: dict[str, Any] = json.loads(line[len(b"data: ") :])
            if event["type"] != "start":
                return event


async def read_events_until_complete(resp: ClientResponse) -> list[dict[str, Any]]:
    events = []
    while True:
        event = await next_event(resp)
        events.append(event)
        if event["type"] == "complete":
            return events


# --- volume --------------------------------------------------------------------------------


async def test_big_output_execute(client: Client) -> None:
    assert len(BIG_EXPECTED) == 5_120_000
    async with asyncio.timeout(30):
        body = await execute(client, "big", BIG_CODE)
    assert body["error"] is None
    assert body["returnCode"] == 0
    assert len(body["output"]) == len(BIG_EXPECTED)
    assert body["output"] == BIG_EXPECTED


async def test_big_output_stream(client: Client) -> None:
    async with asyncio.timeout(30):
        events = await stream(client, "big-stream", BIG_CODE)
    assert [e["type"] for e in events].count("complete") == 1
    assert events[-1]["type"] == "complete" and events[-1]["returnCode"] == 0
    out = joined(events, "output")
    assert len(out) == len(BIG_EXPECTED)
    assert out == BIG_EXPECTED
    assert joined(events, "error") == ""


async def test_interleaved_stdout_stderr_volume(client: Client) -> None:
    code = (
        "import sys\n"
        "for i in range(2000):\n"
        "    sys.stdout.write(f'o{i}\\n')\n"
        "    sys.stderr.write(f'e{i}\\n')\n"
    )
    async with asyncio.timeout(30):
        events = await stream(client, "mixed", code)
    assert joined(events, "output") == "".join(f"o{i}\n" for i in range(2000))
    assert joined(events, "error") == "".join(f"e{i}\n" for i in range(2000))
    assert events[-1]["type"] == "complete"


# --- incrementality ------------------------------------------------------------------------


async def test_stream_is_incremental(client: Client) -> None:
    sid = "incremental"
    await execute(client, sid, "import time")  # the child is up: measure streaming, not spawn
    code = "print('first')\ntime.sleep(1.0)\nprint('second')"
    async with asyncio.timeout(15):
        start = time.monotonic()
        resp = await client.post(f"/execute-stream/{sid}", json={"code": code})
        assert resp.status == 200
        first = await next_event(resp)
        first_at = time.monotonic() - start
        rest = await read_events_until_complete(resp)
        done_at = time.monotonic() - start
    assert first["type"] == "output" and first["content"].startswith("first")
    assert first_at < 0.7, f"first event after {first_at:.3f} s"
    assert done_at >= 1.0
    assert first["content"] + joined(rest, "output") == "first\nsecond\n"
    assert rest[-1]["type"] == "complete" and rest[-1]["returnCode"] == 0


async def test_stderr_is_incremental(client: Client) -> None:
    sid = "incremental-err"
    await execute(client, sid, "import time, sys")
    code = "sys.stderr.write('warn\\n')\ntime.sleep(1.0)"
    async with asyncio.timeout(15):
        start = time.monotonic()
        resp = await client.post(f"/execute-stream/{sid}", json={"code": code})
        first = await next_event(resp)
        first_at = time.monotonic() - start
        rest = await read_events_until_complete(resp)
    assert first == {"type": "error", "content": "warn\n"}
    assert first_at < 0.7, f"first event after {first_at:.3f} s"
    assert rest[-1]["type"] == "complete"


# --- concurrency ---------------------------------------------------------------------------


def tagged_code(tag: str, count: int = 20) -> str:
    return f"import time\nfor i in range({count}):\n    print('{tag}', i)\n    time.sleep(0.01)"


async def test_two_sessions_stream_only_their_own_output(client: Client) -> None:
    tags = ("ALPHA", "BRAVO", "CHARLIE")
    async with asyncio.timeout(20):
        results = await asyncio.gather(*(stream(client, f"own-{t}", tagged_code(t)) for t in tags))
    for tag, events in zip(tags, results, strict=True):
        out = joined(events, "output")
        assert out == "".join(f"{tag} {i}\n" for i in range(20))
        for other in tags:
            if other != tag:
                assert other not in out
        assert events[-1]["type"] == "complete"


async def test_different_sessions_run_in_parallel(client: Client) -> None:
    sids = ("par-a", "par-b", "par-c")
    await asyncio.gather(*(execute(client, sid, "import time") for sid in sids))
    async with asyncio.timeout(15):
        start = time.monotonic()
        replies = await asyncio.gather(
            *(execute(client, sid, "time.sleep(0.6)\nprint('done')") for sid in sids)
        )
        elapsed = time.monotonic() - start
    assert all(r["output"] == "done\n" for r in replies)
    assert elapsed < 1.5, f"three 0.6 s sleeps in different sessions took {elapsed:.2f} s"


async def test_one_session_serializes_concurrent_requests(client: Client) -> None:
    sid = "serial"
    await execute(client, sid, "n = 0\nimport time")
    code = "for _ in range(1000):\n    t = n\n    time.sleep(0)\n    n = t + 1"
    async with asyncio.timeout(20):
        replies = await asyncio.gather(execute(client, sid, code), execute(client, sid, code))
    assert all(r["returnCode"] == 0 for r in replies)
    assert sorted(r["executionCount"] for r in replies) == [2, 3]
    body = await execute(client, sid, "print(n)")
    assert body["output"] == "2000\n"


async def test_one_session_concurrent_outputs_not_mixed(client: Client) -> None:
    sid = "serial-out"
    await execute(client, sid, "import time")
    code_a = "for i in range(30):\n    print('AAA', i)\n    time.sleep(0.002)"
    code_b = "for i in range(30):\n    print('BBB', i)\n    time.sleep(0.002)"
    async with asyncio.timeout(20):
        a, b = await asyncio.gather(execute(client, sid, code_a), stream(client, sid, code_b))
    assert a["output"] == "".join(f"AAA {i}\n" for i in range(30))
    assert joined(b, "output") == "".join(f"BBB {i}\n" for i in range(30))


async def test_requests_run_in_arrival_order(client: Client) -> None:
    sid = "order"
    await execute(client, sid, "import time\nseen = []")
    async with asyncio.timeout(15):
        first = asyncio.create_task(execute(client, sid, "time.sleep(0.3)\nseen.append('A')"))
        await wait_for_session(client, sid, lambda info: info["executionCount"] == 2)
        second = asyncio.create_task(execute(client, sid, "seen.append('B')"))
        await wait_for_session(client, sid, lambda info: info["queued"] == 1)
        third = asyncio.create_task(stream(client, sid, "seen.append('C')"))
        await asyncio.gather(first, second, third)
    body = await execute(client, sid, "print(seen)")
    assert body["output"] == "['A', 'B', 'C']\n"


# --- disconnects ---------------------------------------------------------------------------


async def test_disconnect_mid_stream_leaves_session_usable(client: Client) -> None:
    sid = "disconnect"
    await execute(client, sid, "keep = 'intact'\nimport time")
    code = "for i in range(20):\n    print(i, flush=True)\n    time.sleep(0.05)"
    async with asyncio.timeout(10):
        resp = await client.post(f"/execute-stream/{sid}", json={"code": code})
        first = await next_event(resp)
        assert first["type"] == "output"
        resp.close()
    async with asyncio.timeout(10):
        body = await execute(client, sid, "print(keep)")
    assert body["output"] == "intact\n"
    assert body["restarted"] is False
    async with asyncio.timeout(10):
        events = await stream(client, sid, "print('streams again')")
    assert joined(events, "output") == "streams again\n"


async def test_disconnect_while_output_backs_up(make_client: MakeClient) -> None:
    client = await make_client(stream_buffer_bytes=4096)
    sid = "disconnect-backpressure"
    await execute(client, sid, "keep = 'intact'")
    code = "import sys\nfor i in range(20000):\n    sys.stdout.write('y' * 1000 + '\\n')"
    async with asyncio.timeout(10):
        resp = await client.post(f"/execute-stream/{sid}", json={"code": code})
        first = await next_event(resp)
        assert first["type"] == "output"
        await asyncio.sleep(0.3)  # let the pipes and buffers fill up behind us
        resp.close()
    async with asyncio.timeout(15):
        body = await execute(client, sid, "print(keep)")
    assert body["output"] == "intact\n"
    assert body["restarted"] is False


async def test_slow_consumer_gets_every_byte(make_client: MakeClient) -> None:
    client = await make_client(stream_buffer_bytes=4096)
    # 8 MB: more than loopback socket buffers absorb, so the child really is held back
    lines = 8000
    code = (
        "import sys\n"
        f"for i in range({lines}):\n"
        "    sys.stdout.write(f'{i:06d}' + 'z' * 994 + '\\n')"
    )
    expected = "".join(f"{i:06d}" + "z" * 994 + "\n" for i in range(lines))
    async with asyncio.timeout(30):
        resp = await client.post("/execute-stream/slow", json={"code": code})
        assert resp.status == 200
        await asyncio.sleep(0.5)  # nobody reads: the server must hold the child back
        raw = bytearray()
        reads = 0
        while True:
            piece = await resp.content.read(16384)
            if not piece:
                break
            raw += piece
            reads += 1
            if reads % 16 == 0:
                await asyncio.sleep(0.01)
    events = parse_sse(raw.decode())
    assert events[-1]["type"] == "complete" and events[-1]["returnCode"] == 0
    out = joined(events, "output")
    assert len(out) == len(expected)
    assert out == expected


# --- protocols -----------------------------------------------------------------------------


def old_blocks(raw: bytes) -> list[dict[str, Any]]:
    """The events of a protocol-1 body, checking its framing: every block is one
    `data: <json>` line as the old backend wrote it (json.dumps with its defaults)."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = []
    for block in raw[: -len(b"\n\n")].split(b"\n\n"):
        if block == b": ping":
            continue
        assert block.startswith(b"data: ") and b"\n" not in block, block[:200]
        event = json.loads(block[len(b"data: ") :])
        assert block == f"data: {json.dumps(event)}".encode(), block[:200]
        assert event["type"] in ("output", "error", "complete"), event
        events.append(event)
    assert [e["type"] for e in events].count("complete") == 1
    assert events[-1]["type"] == "complete"
    return events


async def test_every_ascii_character_is_escaped_as_json_dumps_escapes_it(client: Client) -> None:
    """Protocol 1's output events are json.dumps's bytes for every ASCII character (DEL, the
    one the fast escaper writes differently, included), and /execute's text decodes back."""
    text = "".join(map(chr, range(128))) + "\n"
    code = "import sys\nsys.stdout.write(''.join(map(chr, range(128))) + '\\n')"
    resp = await client.post("/execute-stream/ascii", json={"code": code})
    assert resp.status == 200
    event = json.dumps({"type": "output", "content": text}).encode()
    assert (await resp.read()).startswith(b"data: " + event + b"\n\n")
    assert (await execute(client, "ascii", code))["output"] == text


async def test_default_protocol_is_the_old_framing(client: Client) -> None:
    code = "import sys\nprint('héllo \"ü\"\\tend')\nsys.stderr.write('two\\n')\n40 + 2"
    for body in ({"code": code}, {"code": code, "protocol": 1}):
        resp = await client.post("/execute-stream/old", json=body)
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = await resp.read()
        assert b"id:" not in raw and b"event:" not in raw and b"\r" not in raw
        # The exact bytes of the old backend: ensure_ascii escapes, ", " and ": ".
        assert raw.startswith(
            b'data: {"type": "output", "content": "h\\u00e9llo \\"\\u00fc\\"\\tend\\n"}\n\n'
            b'data: {"type": "error", "content": "two\\n"}\n\n'
            b'data: {"type": "complete", "returnCode": 0, '
        ), raw
        events = old_blocks(raw)
        assert len(events) == 3  # no start, no result
        assert events[-1]["executionId"] == resp.headers["X-Execution-Id"]


async def test_protocol_2_has_ids_and_rich_events(client: Client) -> None:
    resp = await client.post("/execute-stream/rich", json={"code": "40 + 2", "protocol": 2})
    raw = (await resp.read()).decode()
    blocks = raw.removesuffix("\n\n").split("\n\n")
    assert all(b.split("\n")[1].startswith("id: ") for b in blocks), raw
    assert [e["type"] for e in parse_sse(raw)] == ["start", "result", "complete"]


async def test_protocol_1_adapts_what_its_clients_cannot_use(client: Client) -> None:
    sid = "adapted"
    code = "print('a')\ndisplay(3, 'text')\nprint('b')\n40 + 2"
    resp = await client.post(f"/execute-stream/{sid}", json={"code": code})
    events = old_blocks(await resp.read())
    assert joined(events, "output") == "a\n3\n'text'\nb\n"  # displays as text, no result
    assert events[-1]["returnCode"] == 0
    # input() and getpass raise EOFError at once: nobody could answer them.
    for asking in ("input('name? ')", "import getpass\ngetpass.getpass()"):
        started = time.monotonic()
        async with asyncio.timeout(10):
            resp = await client.post(f"/execute-stream/{sid}", json={"code": asking})
            events = old_blocks(await resp.read())
        assert time.monotonic() - started < 5
        assert "EOFError: input() is not available" in joined(events, "error")
        assert '"protocol": 2' in joined(events, "error")  # and says how to get it
        assert events[-1]["returnCode"] == 1
    # The session's process dies: the next stream says so in an error event first.
    await execute(client, sid, "import os\nos._exit(3)")
    resp = await client.post(f"/execute-stream/{sid}", json={"code": "print('again')"})
    events = old_blocks(await resp.read())
    assert events[0]["type"] == "error"
    assert events[0]["content"].startswith("[the session was restarted (")
    assert "earlier state is lost" in events[0]["content"]
    assert joined(events, "output") == "again\n"
    assert events[-1]["restarted"] is True


@pytest.mark.parametrize("value", [0, 3, -1, True, False, None, "2", "1", 2.0, 1.5, [2], {}])
async def test_other_protocol_values_are_refused(client: Client, value: object) -> None:
    resp = await client.post("/execute-stream/proto", json={"code": "print(1)", "protocol": value})
    assert resp.status == 400
    assert "protocol" in (await resp.json())["detail"]
    assert client.app[MANAGER].find("proto") is None  # refused before anything ran


# --- reattaching ---------------------------------------------------------------------------


async def test_events_route_speaks_protocol_2_and_closes_after_complete(client: Client) -> None:
    code = "import time\nprint('up', flush=True)\ntime.sleep(0.5)\nprint('down')"
    resp = await client.post("/execute-stream/reat", json={"code": code})  # protocol 1
    execution_id = resp.headers["X-Execution-Id"]
    assert (await next_event(resp))["content"].startswith("up")
    resp.close()
    async with asyncio.timeout(10):
        again = await client.get(f"/executions/{execution_id}/events")
        assert again.status == 200
        raw = (await again.read()).decode()  # ends by itself, right after `complete`
    events = parse_sse(raw)
    assert events[0]["type"] == "start" and events[-1]["type"] == "complete"
    assert joined(events, "output") == "up\ndown\n"
    final_id = int(raw.removesuffix("\n\n").rsplit("\nid: ", 1)[1])
    # An EventSource reconnecting after the end is told to stop: 204, at once.
    for last in (final_id, final_id + 5):
        async with asyncio.timeout(5):
            done = await client.get(
                f"/executions/{execution_id}/events", headers={"Last-Event-ID": str(last)}
            )
            assert done.status == 204 and await done.read() == b""
    before = await client.get(f"/executions/{execution_id}/events?lastEventId={final_id - 1}")
    assert [e["type"] for e in parse_sse(await before.text())] == ["complete"]


async def test_live_reattach_closes_right_after_complete(client: Client) -> None:
    code = "import time\nprint('up', flush=True)\ntime.sleep(0.6)\nprint('down')"
    resp = await client.post("/execute-stream/live", json={"code": code, "protocol": 2})
    execution_id = resp.headers["X-Execution-Id"]
    seen = ""
    async with asyncio.timeout(10):
        while "up\n" not in seen:  # each event: its `data:` line, its `id:` line
            data, id_line = await resp.content.readline(), await resp.content.readline()
            seen += json.loads(data.removeprefix(b"data: ")).get("content", "")
            last_id = int(id_line.removeprefix(b"id: "))
            assert await resp.content.readline() == b"\n"
    resp.close()
    async with asyncio.timeout(10):
        again = await client.get(f"/executions/{execution_id}/events?lastEventId={last_id}")
        events = await read_events_until_complete(again)
        # The id line of `complete`, then the stream ends by itself.
        assert re.fullmatch(rb"id: \d+\n\n", await again.content.read())
    assert seen + joined(events, "output") == "up\ndown\n"
