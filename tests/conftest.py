"""Fixtures: a real replserver application on a real port, with real child processes."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from replserver.app import create_app
from replserver.settings import Settings

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def test_settings(**overrides: Any) -> Settings:
    """Settings for tests: defaults, not the environment of whoever runs pytest."""
    # Snapshots off unless a test asks: a default store would carry state between tests.
    values: dict[str, Any] = {"shutdown_grace_s": 1.0, "snapshot_store": "off"}
    values.update(overrides)
    return Settings.from_env({}, **values)


@pytest.fixture(autouse=True, scope="session")
def private_state_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The default snapshot store lives under $XDG_STATE_HOME: for every server a test
    starts, in this process or as `python -m replserver`, that is one of the test run's."""
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if before is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture
async def make_client(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> AsyncIterator[MakeClient]:
    """Build a client for an app with the given settings overrides."""

    async def make(**overrides: Any) -> Client:
        return await aiohttp_client(create_app(test_settings(**overrides)))

    yield make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


def parse_sse(body: str) -> list[dict[str, Any]]:
    """The JSON payloads of a Server-Sent Events body, in order (comments skipped)."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


async def execute(client: Client, sid: str, code: str, status: int = 200) -> dict[str, Any]:
    resp = await client.post(f"/execute/{sid}", json={"code": code})
    assert resp.status == status, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def stream(
    client: Client, sid: str, code: str, *, protocol: int | None = 2
) -> list[dict[str, Any]]:
    """The events of one /execute-stream; protocol 2 (start, result, display...) unless
    told otherwise (None: no `protocol` field, the old backend's stream)."""
    body: dict[str, Any] = {"code": code}
    if protocol is not None:
        body["protocol"] = protocol
    resp = await client.post(f"/execute-stream/{sid}", json=body)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/event-stream"
    return parse_sse(await resp.text())


async def wait_for_session(
    client: Client, sid: str, ready: Callable[[dict[str, Any]], bool], within_s: float = 10
) -> dict[str, Any]:
    """Poll GET /sessions/{sid} until `ready` holds for what it reports (synchronisation by
    state, against a deadline, never by a nap)."""
    async with asyncio.timeout(within_s):
        while True:
            resp = await client.get(f"/sessions/{sid}")
            if resp.status == 200:
                info: dict[str, Any] = await resp.json()
                if ready(info):
                    return info
            await asyncio.sleep(0.01)
