"""The basic round trip through the real server and a real child."""

from __future__ import annotations

from .conftest import Client, execute, stream


async def test_execute_and_persist(client: Client) -> None:
    first = await execute(client, "s1", "x = 41")
    assert first["output"] == "" and first["error"] is None and first["returnCode"] == 0
    second = await execute(client, "s1", "x += 1\nprint(f'x = {x}')")
    assert second["output"] == "x = 42\n"
    assert second["executionCount"] == 2


async def test_stream_events(client: Client) -> None:
    events = await stream(client, "s2", "print('hi')")
    # print writes "hi" and "\n" separately: they may arrive as one event or two.
    assert "".join(e["content"] for e in events if e["type"] == "output") == "hi\n"
    assert events[-1]["type"] == "complete" and events[-1]["returnCode"] == 0
