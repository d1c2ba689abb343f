"""Every HTTP route and status code of the contract, against the real server and children."""

from __future__ import annotations

import json
import re
import socket
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import ClientResponse

from replserver import __version__
from replserver.settings import Settings

from .conftest import Client, MakeClient, execute, parse_sse

POST_ROUTES = ("/execute", "/execute-stream", "/reset")
CODE_ROUTES = ("/execute", "/execute-stream")


async def assert_json_error(resp: ClientResponse, status: int) -> str:
    """The response is `status` with a JSON body {"detail": <non-empty str>}; returns detail."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json", text
    body = json.loads(text)
    assert isinstance(body, dict), text
    assert isinstance(body.get("detail"), str) and body["detail"], text
    return str(body["detail"])


# --- /health -----------------------------------------------------------------------------


async def test_health_fields(client: Client) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["status"] == "ok"
    assert body["language"] == "python"
    assert body["version"] == __version__
    assert body["stateless"] is False
    stamp = body["timestamp"]
    assert isinstance(stamp, str) and stamp.endswith("Z")
    parsed = datetime.fromisoformat(stamp[:-1] + "+00:00")
    assert abs(datetime.now(UTC) - parsed) < timedelta(minutes=1)


# --- /execute ------------------------------------------------------------------------------


async def test_execute_reply_shape(client: Client) -> None:
    resp = await client.post("/execute/shape", json={"code": "x = 42\nprint(f'x = {x}')"})
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["output"] == "x = 42\n"
    assert body["error"] is None
    assert body["returnCode"] == 0
    assert body["executionCount"] == 1
    assert isinstance(body["durationMs"], (int, float)) and body["durationMs"] >= 0
    assert body["restarted"] is False
    assert body["result"] is None and body["displays"] == []  # always present


async def test_execute_reply_with_error(client: Client) -> None:
    body = await execute(client, "shape-err", "print('before')\n1/0")
    assert body["output"] == "before\n"
    assert isinstance(body["error"], str) and "ZeroDivisionError" in body["error"]
    assert body["returnCode"] == 1


# --- /execute-stream -----------------------------------------------------------------------


async def test_stream_headers_and_raw_framing(client: Client) -> None:
    code = "import sys\nprint('one')\nsys.stderr.write('two\\n')"
    resp = await client.post("/execute-stream/raw", json={"code": code, "protocol": 2})
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    raw = await resp.read()
    assert raw.endswith(b"\n\n")
    assert b"\r" not in raw
    blocks = raw[: -len(b"\n\n")].split(b"\n\n")
    events = []
    ids = []
    for block in blocks:
        # one `data: <json>` line per event, then its `id:` line, nothing else
        data_line, id_line = block.split(b"\n")
        assert data_line.startswith(b"data: "), raw
        assert id_line.startswith(b"id: "), raw
        events.append(json.loads(data_line[len(b"data: ") :]))
        ids.append(int(id_line[len(b"id: ") :]))
    assert ids == sorted(ids)  # event ids never go back
    assert events[0]["type"] == "start" and events[0]["executionId"].startswith("raw.")
    assert events == parse_sse(raw.decode())
    kinds = [e["type"] for e in events]
    assert kinds.count("complete") == 1
    assert kinds[-1] == "complete"
    assert events[-1]["returnCode"] == 0
    out = "".join(e["content"] for e in events if e["type"] == "output")
    err = "".join(e["content"] for e in events if e["type"] == "error")
    assert out == "one\n"
    assert err == "two\n"


async def test_stream_complete_return_code_on_exception(client: Client) -> None:
    resp = await client.post("/execute-stream/rc", json={"code": "raise ValueError('nope')"})
    assert resp.status == 200
    events = parse_sse(await resp.text())
    assert [e["type"] for e in events].count("complete") == 1
    assert events[-1]["type"] == "complete"
    assert events[-1]["returnCode"] == 1
    err = "".join(e["content"] for e in events if e["type"] == "error")
    assert "ValueError: nope" in err


# --- /reset --------------------------------------------------------------------------------


async def test_reset_reply(client: Client) -> None:
    await execute(client, "to-reset", "y = 1")
    resp = await client.post("/reset/to-reset")
    assert resp.status == 200
    assert await resp.json() == {
        "message": "Namespace reset successfully",
        "sessionId": "to-reset",
    }


async def test_reset_of_unknown_session(client: Client) -> None:
    resp = await client.post("/reset/never-used")
    assert resp.status == 200
    assert (await resp.json())["sessionId"] == "never-used"


# --- 400: session ids ----------------------------------------------------------------------


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("bad_id", ["a.b", "x" * 129, "a%20b", "%C3%A9t%C3%A9", "a%2Eb"])
async def test_invalid_session_id(client: Client, route: str, bad_id: str) -> None:
    resp = await client.post(f"{route}/{bad_id}", json={"code": "print(1)"})
    detail = await assert_json_error(resp, 400)
    assert "session" in detail.lower()


@pytest.mark.parametrize("route", POST_ROUTES)
async def test_longest_valid_session_id(client: Client, route: str) -> None:
    sid = "A-z_9" + "x" * 123
    assert len(sid) == 128
    resp = await client.post(f"{route}/{sid}", json={"code": "print(1)"})
    assert resp.status == 200, await resp.text()


# --- 400: bodies ---------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes]] = [
    ("malformed-json", b'{"code": "print(1)"'),
    ("not-utf8", b'{"code": "\xff"}'),
    ("empty-body", b""),
    ("array", b'["print(1)"]'),
    ("string", b'"print(1)"'),
    ("missing-code", b'{"cod": "print(1)"}'),
    ("code-number", b'{"code": 5}'),
    ("code-null", b'{"code": null}'),
    ("code-list", b'{"code": ["print(1)"]}'),
    ("code-empty", b'{"code": ""}'),
    ("code-whitespace", b'{"code": "  \\n\\t  \\n"}'),
]


@pytest.mark.parametrize("route", CODE_ROUTES)
@pytest.mark.parametrize(("name", "body"), BAD_BODIES, ids=[n for n, _ in BAD_BODIES])
async def test_bad_body_is_400(client: Client, route: str, name: str, body: bytes) -> None:
    resp = await client.post(
        f"{route}/body-{name}", data=body, headers={"Content-Type": "application/json"}
    )
    # the stream route refuses before any stream starts: a plain JSON error, no SSE
    assert resp.headers.get("Content-Type", "").startswith("application/json")
    await assert_json_error(resp, 400)


# --- 413 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", CODE_ROUTES)
async def test_body_over_limit_is_413(make_client: MakeClient, route: str) -> None:
    client = await make_client(max_body_bytes=1000)
    code = "x = '" + "a" * 2000 + "'"
    resp = await client.post(f"{route}/big", json={"code": code})
    await assert_json_error(resp, 413)
    # just under the limit is still served
    ok = await client.post(f"{route}/big", json={"code": "x = '" + "a" * 900 + "'"})
    assert ok.status == 200, await ok.text()


# --- 404 / 405 -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/execute", "/execute/", "/execute/a/b"])
async def test_unknown_route_is_404(client: Client, path: str) -> None:
    resp = await client.post(path, json={"code": "print(1)"})
    await assert_json_error(resp, 404)


async def test_unknown_get_route_is_404(client: Client) -> None:
    await assert_json_error(await client.get("/does-not-exist"), 404)


@pytest.mark.parametrize("path", ["/execute/x", "/execute-stream/x", "/reset/x"])
async def test_wrong_method_is_405(client: Client, path: str) -> None:
    resp = await client.get(path)
    await assert_json_error(resp, 405)
    assert "POST" in resp.headers.get("Allow", "")


async def test_post_health_is_405(client: Client) -> None:
    await assert_json_error(await client.post("/health"), 405)


# --- bad requests never break a session ----------------------------------------------------


async def test_bad_requests_do_not_break_session(client: Client) -> None:
    sid = "survivor"
    await execute(client, sid, "kept = 'still here'")
    for route in CODE_ROUTES:
        for _, body in BAD_BODIES:
            resp = await client.post(
                f"{route}/{sid}", data=body, headers={"Content-Type": "application/json"}
            )
            assert resp.status == 400
    after = await execute(client, sid, "print(kept)")
    assert after["output"] == "still here\n"
    assert after["error"] is None
    assert after["restarted"] is False


# --- CORS ----------------------------------------------------------------------------------


def preflight_headers(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }


async def test_cors_development_allows_any_origin(make_client: MakeClient) -> None:
    client = await make_client(environment="development")
    origin = "http://example.com"
    resp = await client.post("/execute/cors", json={"code": "print(1)"}, headers={"Origin": origin})
    assert resp.status == 200
    assert resp.headers.get("Access-Control-Allow-Origin") in (origin, "*")
    pre = await client.options("/execute/cors", headers=preflight_headers(origin))
    assert pre.status == 200, await pre.text()
    assert pre.headers.get("Access-Control-Allow-Origin") in (origin, "*")
    assert "POST" in pre.headers.get("Access-Control-Allow-Methods", "").upper()
    assert "CONTENT-TYPE" in pre.headers.get("Access-Control-Allow-Headers", "").upper()


async def test_cors_development_stream_and_health(make_client: MakeClient) -> None:
    client = await make_client(environment="development")
    origin = "http://example.com"
    resp = await client.post(
        "/execute-stream/cors", json={"code": "print(1)"}, headers={"Origin": origin}
    )
    assert resp.status == 200
    assert resp.headers.get("Access-Control-Allow-Origin") in (origin, "*")
    await resp.read()
    health = await client.get("/health", headers={"Origin": origin})
    assert health.headers.get("Access-Control-Allow-Origin") in (origin, "*")


async def test_cors_production_only_listed_origins(make_client: MakeClient) -> None:
    client = await make_client(environment="production", cors_origins=("http://ok.test",))
    ok = await client.post(
        "/execute/cors", json={"code": "print(1)"}, headers={"Origin": "http://ok.test"}
    )
    assert ok.status == 200
    assert ok.headers.get("Access-Control-Allow-Origin") == "http://ok.test"

    evil = await client.post(
        "/execute/cors", json={"code": "print(1)"}, headers={"Origin": "http://evil.test"}
    )
    assert "Access-Control-Allow-Origin" not in evil.headers

    pre_ok = await client.options("/execute/cors", headers=preflight_headers("http://ok.test"))
    assert pre_ok.status == 200
    assert pre_ok.headers.get("Access-Control-Allow-Origin") == "http://ok.test"

    pre_evil = await client.options("/execute/cors", headers=preflight_headers("http://evil.test"))
    assert "Access-Control-Allow-Origin" not in pre_evil.headers
    assert pre_evil.status >= 400


# --- replica id ----------------------------------------------------------------------------


async def test_replica_header_on_every_response(make_client: MakeClient) -> None:
    client = await make_client(
        replica_id="replica-7", environment="development", max_body_bytes=1000
    )
    health = await client.get("/health")
    assert health.headers["X-Replica"] == "replica-7"
    assert (await health.json())["replica"] == "replica-7"
    responses = [
        await client.post("/execute/rid", json={"code": "print(1)"}),
        await client.post("/execute-stream/rid", json={"code": "print(1)"}),
        await client.post("/interrupt/rid"),
        await client.post("/reset/rid"),
        await client.post("/execute/bad.id", json={"code": "print(1)"}),  # 400
        await client.post("/execute/rid", data=b"x" * 2000),  # 413
        await client.get("/no-such-route"),  # 404
        await client.options("/execute/rid", headers=preflight_headers("http://a.test")),
    ]
    statuses = [resp.status for resp in responses]
    assert statuses == [200, 200, 200, 200, 400, 413, 404, 200]
    for resp in responses:
        await resp.read()
        assert resp.headers.get("X-Replica") == "replica-7", (resp.url, resp.status)
    # Browsers let page scripts read it only when CORS exposes it.
    cors = await client.post(
        "/execute/rid", json={"code": "1"}, headers={"Origin": "http://a.test"}
    )
    exposed = cors.headers.get("Access-Control-Expose-Headers", "").upper()
    assert "X-REPLICA" in exposed, cors.headers


def test_replica_id_setting() -> None:
    assert Settings.from_env({}).replica_id == socket.gethostname()
    assert Settings.from_env({"REPL_REPLICA_ID": "pod-3"}).replica_id == "pod-3"
    with pytest.raises(ValueError, match="REPL_REPLICA_ID"):
        Settings.from_env({"REPL_REPLICA_ID": "a\r\nSet-Cookie: x"})


# --- the web REPL page ---------------------------------------------------------------------


async def test_page_is_served_at_the_root(client: Client) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html" and resp.charset == "utf-8"
    html = await resp.text()
    assert "<title>replserver</title>" in html and 'id="code"' in html
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # Every file the page refers to is served, with its type; nothing comes from elsewhere.
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(a for a in assets if not a.startswith("data:")) == [
        "static/app.js",
        "static/editor.js",
        "static/style.css",
    ]
    types = {
        "static/app.js": "text/javascript",
        "static/editor.js": "text/javascript",
        "static/style.css": "text/css",
    }
    for asset, content_type in types.items():
        served = await client.get(f"/{asset}")
        assert served.status == 200 and served.content_type == content_type
        assert len(await served.read()) > 500
    assert (await client.head("/")).status == 200


@pytest.mark.parametrize(
    "path", ["/static/nope.js", "/static/index.html", "/static/..%2Frunner_child.py", "/static/"]
)
async def test_unknown_static_files_are_404(client: Client, path: str) -> None:
    await assert_json_error(await client.get(path), 404)


async def test_page_follows_the_cors_rules(make_client: MakeClient) -> None:
    client = await make_client(environment="production", cors_origins=("http://ok.test",))
    ok = await client.get("/", headers={"Origin": "http://ok.test"})
    assert ok.headers.get("Access-Control-Allow-Origin") == "http://ok.test"
    evil = await client.get("/static/app.js", headers={"Origin": "http://evil.test"})
    assert evil.status == 200 and "Access-Control-Allow-Origin" not in evil.headers
