"""Sessions at scale: the warm pool, lifecycle routes, accounting, reattaching, metrics, logs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from replserver.app import create_app
from replserver.metrics import JsonAccessLogger
from replserver.routes import MANAGER

from . import servers
from .conftest import Client, MakeClient, execute, parse_sse, wait_for_session
from .conftest import test_settings as settings_for_test


async def wait_for(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():
            await asyncio.sleep(0.02)


# --- warm pool ------------------------------------------------------------------------------


async def test_new_sessions_and_resets_take_warm_children(make_client: MakeClient) -> None:
    client = await make_client(pool_size=2)
    pool = client.app[MANAGER].pool
    await wait_for(lambda: pool.warm == 2)
    hits = pool.hits
    first = await execute(client, "warm", "import os\nx = 1\nprint(os.getuid())")
    assert pool.hits == hits + 1
    await wait_for(lambda: pool.warm == 2)  # refilled in the background
    # A warm child is confined like any other: not root, under its limits.
    if first["output"].strip() != "0":
        assert int(first["output"]) > 0
    limits = await execute(
        client, "warm", "import resource\nprint(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    assert limits["output"] == "1024\n"
    assert (await client.post("/reset/warm")).status == 200
    assert pool.hits == hits + 2  # the reset took one too: ready before the next request
    after = await execute(client, "warm", "print(globals().get('x', 'fresh'))")
    assert after["output"] == "fresh\n" and after["restarted"] is False


async def test_pool_size_zero_starts_children_on_demand(make_client: MakeClient) -> None:
    client = await make_client(pool_size=0)
    pool = client.app[MANAGER].pool
    assert (await execute(client, "cold", "print(1)"))["output"] == "1\n"
    assert pool.hits == 0 and pool.warm == 0 and pool.spawned >= 1


# --- lifecycle --------------------------------------------------------------------------------


async def test_describe_and_delete_a_session(client: Client) -> None:
    assert (await client.get("/sessions/nobody-here")).status == 404
    await execute(client, "life", "x = [0] * 10**6\nsum(range(10**6))")
    resp = await client.get("/sessions/life")
    assert resp.status == 200
    info = await resp.json()
    assert info["sessionId"] == "life" and info["state"] == "idle"
    assert info["executionCount"] == 1 and info["running"] is False and info["queued"] == 0
    assert info["rssBytes"] > 8 * 1024 * 1024 and info["cpuSeconds"] >= 0
    assert info["created"].endswith("Z") and info["lastActive"] >= info["created"]
    deleted = await client.delete("/sessions/life")
    assert deleted.status == 200 and (await deleted.json()) == {
        "sessionId": "life",
        "deleted": True,
    }
    assert (await client.get("/sessions/life")).status == 404
    assert (await client.delete("/sessions/life")).status == 404
    again = await execute(client, "life", "print(globals().get('x') is None)")
    assert again["output"] == "True\n" and again["restarted"] is False


async def test_deleting_a_running_session_ends_its_execution(client: Client) -> None:
    await execute(client, "doomed", "import time")
    running = asyncio.create_task(execute(client, "doomed", "time.sleep(30)"))
    await wait_for(lambda: (s := client.app[MANAGER].find("doomed")) is not None and s.running)
    assert (await client.delete("/sessions/doomed")).status == 200
    async with asyncio.timeout(10):
        reply = await running
    assert reply["reason"] == "crashed" and "deleted" in reply["error"]
    assert reply["namespaceSurvived"] is False


async def test_idle_sessions_are_culled(make_client: MakeClient) -> None:
    client = await make_client(session_idle_s=0.3)
    await execute(client, "sleepy", "x = 1")
    manager = client.app[MANAGER]
    await wait_for(lambda: manager.find("sleepy") is None, within_s=5)
    assert manager.culled >= 1
    resp = await client.post(
        "/execute-stream/sleepy", json={"code": "print(globals().get('x'))", "protocol": 2}
    )
    events = parse_sse(await resp.text())
    assert events[0]["type"] == "restart" and events[0]["reason"].startswith("idle")
    assert events[-1]["restarted"] is True
    assert "".join(e.get("content", "") for e in events if e["type"] == "output") == "None\n"


# --- accounting -------------------------------------------------------------------------------


async def test_completion_accounting(make_client: MakeClient) -> None:
    client = await make_client(
        timeout_s=2.0,
        interrupt_grace_s=0.5,
        max_output_bytes=1000,
        limit_memory_bytes=512 * 1024 * 1024,
    )
    busy = await execute(client, "acct", "x = sum(i * i for i in range(3 * 10**6))")
    assert busy["cpuMs"] > 50 and busy["reason"] == "ok" and busy["namespaceSurvived"] is True
    big = await execute(client, "acct", "blob = bytearray(64 * 1024 * 1024)\ndel blob")
    assert big["peakRssBytes"] > 64 * 1024 * 1024
    small = await execute(client, "acct", "y = 1")
    assert small["peakRssBytes"] < big["peakRssBytes"]  # the peak is per execution
    cases = {
        "exception": "1/0",
        "memory": "hog = bytearray(2 * 1024**3)",
        "output_limit": "print('z' * 5000)",
        "timeout": "while True:\n    pass",
        "crashed": "import os\nos._exit(1)",
    }
    for reason, code in cases.items():
        reply = await execute(client, f"acct-{reason}", code)
        assert reply["reason"] == reason, (reason, reply)
        assert reply["namespaceSurvived"] is (reason != "crashed")
        assert reply["durationMs"] >= 0 and reply["executionId"].startswith(f"acct-{reason}.")


# --- detachable executions ------------------------------------------------------------------


async def read_until(
    resp: Any, predicate: Callable[[dict[str, Any]], bool]
) -> list[tuple[int, dict[str, Any]]]:
    """(id, event) pairs read line by line until one satisfies `predicate`."""
    seen: list[tuple[int, dict[str, Any]]] = []
    data: dict[str, Any] | None = None
    async with asyncio.timeout(10):
        while True:
            line = await resp.content.readline()
            assert line, "stream ended"
            if line.startswith(b"data: "):
                data = json.loads(line[6:])
            elif line.startswith(b"id: ") and data is not None:
                seen.append((int(line[4:]), data))
                if predicate(data):
                    return seen


async def test_reattach_after_a_dropped_connection(client: Client) -> None:
    code = (
        "import time\nfor i in range(8):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)"
    )
    resp = await client.post("/execute-stream/reattach", json={"code": code, "protocol": 2})
    execution_id = resp.headers["X-Execution-Id"]
    seen = await read_until(resp, lambda e: e.get("content", "").startswith("line 1"))
    assert seen[0][1] == {"type": "start", "executionId": execution_id, "sessionId": "reattach"}
    last_id = seen[-1][0]
    resp.close()  # the connection drops; the execution goes on
    await asyncio.sleep(0.3)
    again = await client.get(
        f"/executions/{execution_id}/events", headers={"Last-Event-ID": str(last_id)}
    )
    assert again.status == 200 and again.headers["X-Execution-Id"] == execution_id
    events = parse_sse(await again.text())
    text = "".join(e["content"] for _, e in seen if e["type"] == "output")
    text += "".join(e["content"] for e in events if e["type"] == "output")
    assert text == "".join(f"line {i}\n" for i in range(8))  # nothing lost, nothing twice
    assert events[-1]["type"] == "complete" and events[-1]["reason"] == "ok"
    # After the end the same events can still be read again, from the start.
    replay = parse_sse(await (await client.get(f"/executions/{execution_id}/events")).text())
    assert "".join(e["content"] for e in replay if e["type"] == "output").startswith("line 0\n")
    assert (await client.get("/executions/reattach.nope/events")).status == 404
    bad = await client.get(f"/executions/{execution_id}/events", headers={"Last-Event-ID": "x"})
    assert bad.status == 400


async def test_reattach_reports_a_gap_when_the_buffer_overflowed(make_client: MakeClient) -> None:
    client = await make_client(replay_buffer_bytes=2048)
    code = (
        "import time\nprint('go', flush=True)\ntime.sleep(0.3)\n"
        "for i in range(200):\n    print('x' * 99)"
    )
    resp = await client.post("/execute-stream/gappy", json={"code": code, "protocol": 2})
    execution_id = resp.headers["X-Execution-Id"]
    seen = await read_until(resp, lambda e: e.get("content", "").startswith("go"))
    resp.close()
    await wait_for_session(client, "gappy", lambda info: not info["running"])  # all written
    again = await client.get(
        f"/executions/{execution_id}/events", headers={"Last-Event-ID": str(seen[-1][0])}
    )
    events = parse_sse(await again.text())
    assert events[0]["type"] == "gap" and events[0]["missedEvents"] > 0
    kept = sum(len(e["content"]) for e in events if e["type"] == "output")
    assert 0 < kept <= 2048 + 256 * 1024  # the newest part, within the replay buffer
    assert events[-1]["type"] == "complete"


async def test_stop_on_disconnect(client: Client) -> None:
    await execute(client, "stopper", "marker = 'kept'")
    code = "import time\nprint('up', flush=True)\nwhile True:\n    time.sleep(0.05)"
    resp = await client.post(
        "/execute-stream/stopper", json={"code": code, "stopOnDisconnect": True, "protocol": 2}
    )
    execution_id = resp.headers["X-Execution-Id"]
    await read_until(resp, lambda e: e.get("content", "").startswith("up"))
    resp.close()
    session = client.app[MANAGER].find("stopper")
    assert session is not None
    await wait_for(lambda: not session.running, within_s=10)
    run = client.app[MANAGER].find_run(execution_id)
    assert run is not None and run.execution.reason == "interrupted"
    assert (await execute(client, "stopper", "print(marker)"))["output"] == "kept\n"
    bad = await client.post("/execute/stopper", json={"code": "1", "stopOnDisconnect": "yes"})
    assert bad.status == 400


# --- metrics and logs -------------------------------------------------------------------------


async def test_metrics(make_client: MakeClient) -> None:
    client = await make_client(api_token="tok")
    auth = {"Authorization": "Bearer tok"}
    assert (await client.get("/metrics")).status == 401
    await client.post("/execute/m1", json={"code": "print('x' * 10)"}, headers=auth)
    await client.post("/execute/m1", json={"code": "1/0"}, headers=auth)
    resp = await client.get("/metrics", headers=auth)
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert 'replserver_executions_total{reason="ok"} 1.0' in text
    assert 'replserver_executions_total{reason="exception"} 1.0' in text
    assert "replserver_execution_duration_seconds_count 2.0" in text
    output_bytes = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("replserver_output_bytes_total ")
    )
    assert output_bytes > 11  # 11 bytes of stdout, then a traceback on stderr
    assert "replserver_sessions_live 1.0" in text
    for name in (
        "replserver_pool_warm",
        "replserver_sessions_ended_total",
        "replserver_child_restarts_total",
    ):
        assert name in text


async def test_access_log_is_structured_and_never_has_code(
    aiohttp_server: Callable[..., Any],
    aiohttp_client: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app: web.Application = create_app(settings_for_test())
    server = await aiohttp_server(app, access_log_class=JsonAccessLogger)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(server)
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        await execute(client, "logged", "secret_code = 'hunter2'\nprint('secret output')")
        # The access log line is written after the response has gone out.
        async with asyncio.timeout(5):
            while not (line := _access_line(caplog, "/execute/logged")):
                await asyncio.sleep(0.01)  # polling against the deadline above
    assert line["status"] == 200 and line["sessionId"] == "logged" and line["reason"] == "ok"
    assert line["executionId"].startswith("logged.") and line["durationMs"] > 0
    everything = " ".join(r.getMessage() for r in caplog.records)
    assert "hunter2" not in everything and "secret output" not in everything


def _access_line(caplog: pytest.LogCaptureFixture, path: str) -> dict[str, Any] | None:
    for record in caplog.records:
        if record.name == "aiohttp.access":
            entry: dict[str, Any] = json.loads(record.getMessage())
            if entry["path"] == path:
                return entry
    return None


async def test_access_log_is_off_by_default_and_on_by_setting(tmp_path: Any) -> None:
    """`python -m replserver` writes no access line unless REPL_ACCESS_LOG is set (README:
    configuration); set, each request gets one, at the default log level."""
    lines = {}
    for name, setting in (("default", ""), ("on", "1")):  # "": as if unset
        log = tmp_path / f"{name}.log"
        replica = await servers.start(log=log, REPL_LOG_LEVEL="info", REPL_ACCESS_LOG=setting)
        try:
            await replica.wait_ready()
            async with aiohttp.ClientSession() as http:
                url = f"{replica.base}/execute/logged-{name}"
                async with http.post(url, json={"code": "print(1)"}) as resp:
                    assert resp.status == 200 and (await resp.json())["output"] == "1\n"
        finally:
            # The line is written right after the reply; once the process has exited,
            # whatever it was going to log is in the file.
            await replica.stop()
        lines[name] = [x for x in log.read_text().splitlines() if f"/execute/logged-{name}" in x]
    assert lines["default"] == []
    assert len(lines["on"]) == 1 and "status=200" in lines["on"][0]
    assert "sessionId=logged-on" in lines["on"][0] and "reason=ok" in lines["on"][0]


async def test_disconnects_are_noticed_by_a_real_server() -> None:
    """`python -m replserver` does not cancel handlers when clients leave (aiohttp's
    default, unlike the test server): the stream notices by itself."""
    replica = await servers.start()
    try:
        await replica.wait_ready()
        async with aiohttp.ClientSession() as http:
            silent = "import time\nprint('up', flush=True)\nwhile True:\n    time.sleep(0.05)"
            for sid, stop in (("keeps", False), ("stops", True)):
                body = {"code": silent, "stopOnDisconnect": stop, "timeout": 20, "protocol": 2}
                resp = await http.post(f"{replica.base}/execute-stream/{sid}", json=body)
                await read_until(resp, lambda e: e.get("content", "").startswith("up"))
                resp.close()
            # Until the server has noticed the disconnect and stopped "stops".
            async with asyncio.timeout(10):
                while True:
                    states = {}
                    for sid in ("keeps", "stops"):
                        async with http.get(f"{replica.base}/sessions/{sid}") as info:
                            states[sid] = (await info.json())["running"]
                    if not states["stops"]:
                        break
                    await asyncio.sleep(0.02)  # polling against the deadline above
            assert states == {"keeps": True, "stops": False}
    finally:
        await replica.kill()
