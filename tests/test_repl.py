"""The REPL experience over HTTP: results of final expressions, rich displays, input()."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from typing import Any

import pytest
from aiohttp import ClientResponse

from .conftest import Client, MakeClient, execute, stream

# A class whose instances show as a 4x3 red PNG, made with zlib and struct only.
PNG_CLASS = """
import struct, zlib

def _chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

def tiny_png(width=4, height=3):
    rows = b''.join(b'\\x00' + b'\\xff\\x00\\x00' * width for _ in range(height))
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\\x89PNG\\r\\n\\x1a\\n' + _chunk(b'IHDR', header)
            + _chunk(b'IDAT', zlib.compress(rows)) + _chunk(b'IEND', b''))

class Pic:
    def __init__(self, width=4, height=3):
        self.width, self.height = width, height
    def _repr_png_(self):
        return tiny_png(self.width, self.height)
    def __repr__(self):
        return f'<Pic {self.width}x{self.height}>'
"""


def joined(events: list[dict[str, Any]], kind: str) -> str:
    return "".join(e["content"] for e in events if e["type"] == kind)


def coalesced(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Neighbouring output (or error) events as one: print() may arrive in two writes. The
    opening `start` event (the execution's id) is left out."""
    merged: list[dict[str, Any]] = []
    for event in events:
        if event["type"] == "start":
            continue
        if merged and event["type"] in ("output", "error") and merged[-1]["type"] == event["type"]:
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + event["content"]}
        else:
            merged.append(event)
    return merged


async def next_event(resp: ClientResponse) -> dict[str, Any]:
    while True:
        line = await resp.content.readline()
        assert line, "stream ended before the next event"
        if line.startswith(b"data: "):
            event: dict[str, Any] = json.loads(line[6:])
            return event


async def events_until(resp: ClientResponse, kind: str) -> list[dict[str, Any]]:
    """Events up to and including the first of type `kind`."""
    events = []
    while True:
        events.append(await next_event(resp))
        if events[-1]["type"] == kind:
            return events


async def answer(client: Client, sid: str, value: object, status: int = 200) -> dict[str, Any]:
    resp = await client.post(f"/input/{sid}", json={"value": value})
    assert resp.status == status, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


# --- what user code sees of the runner ------------------------------------------------------


async def test_user_code_sees_none_of_our_modules(client: Client) -> None:
    """The runner, the child package and the server's stack are not in sys.modules, and
    the runner's directory is not on sys.path, while the REPL hooks still work."""
    code = (
        "import sys\n"
        "ours = ('runner_child', 'replchild', 'replserver', 'aiohttp', 'multidict', 'yarl')\n"
        "print(sorted(n for n in sys.modules if n.partition('.')[0] in ours))\n"
        "print([p for p in sys.path if 'runner' in p])\n"
        "sys.modules['__main__'].__name__"
    )
    body = await execute(client, "modules", code)
    assert body["output"] == "[]\n[]\n", body
    assert body["result"] == "'__main__'"  # the display hook is alive without its module
    body = await execute(client, "modules", "display(6 * 7)\n_")
    assert body["displays"] == [{"text/plain": "42"}] and body["result"] == "'__main__'"


# --- results of final expressions ----------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "result"),
    [
        ("1 + 1", "2"),
        ("x = 5\nx", "5"),
        ("'abc'", "'abc'"),
        ("[1, 'two', None]", "[1, 'two', None]"),
        ("if True:\n    y = 3\ny * 2", "6"),
        ("None", None),
        ("print('hi')", None),
        ("z = 1", None),
        ("def f():\n    return 1", None),
        ("# only a comment", None),
    ],
)
async def test_result_of_final_expression(client: Client, code: str, result: str | None) -> None:
    body = await execute(client, "result", code)
    assert body["result"] == result, body
    assert body["displays"] == [] and body["returnCode"] == 0
    assert "hi" in body["output"] if "print" in code else body["output"] == ""


async def test_result_event_comes_before_complete(client: Client) -> None:
    events = coalesced(await stream(client, "result-stream", "print('a')\n40 + 2"))
    assert [e["type"] for e in events] == ["output", "result", "complete"]
    assert events[1] == {"type": "result", "content": "42"}
    silent = await stream(client, "result-stream", "x = 1")
    assert [e["type"] for e in silent] == ["start", "complete"]


async def test_underscore_keeps_the_last_result(client: Client) -> None:
    sid = "underscore"
    await execute(client, sid, "40 + 2")
    assert (await execute(client, sid, "_ + 1"))["result"] == "43"
    assert (await execute(client, sid, "None\n_"))["result"] == "43"  # None is not kept
    # A `_` of the code's own (a loop variable, gettext) is left alone; builtins._ follows.
    await execute(client, sid, "for _ in range(3):\n    pass")
    await execute(client, sid, "'new'")
    body = await execute(client, sid, "import builtins\nprint(_, builtins._)")
    assert body["output"] == "2 new\n"


async def test_long_repr_is_cut_with_a_marker(make_client: MakeClient) -> None:
    client = await make_client(max_result_chars=50)
    body = await execute(client, "long", "'a' * 1000")
    result = body["result"]
    assert result.startswith("'" + "a" * 49) and "a" * 51 not in result
    assert result.endswith("… [truncated: 1002 characters in all]")
    # The value itself is whole: only its display was cut.
    assert (await execute(client, "long", "len(_)"))["result"] == "1000"


async def test_exception_in_final_expression(client: Client) -> None:
    sid = "final-raise"
    body = await execute(client, sid, "before = 1\n(before +\n 1/0)")
    assert body["returnCode"] == 1 and body["reason"] == "exception"
    assert body["result"] is None
    assert 'File "<cell-1>", line 3, in <module>' in body["error"]
    assert "ZeroDivisionError" in body["error"]
    assert "runner_child" not in body["error"] and "replchild" not in body["error"]
    assert (await execute(client, sid, "before"))["result"] == "1"


async def test_failing_repr_is_reported_as_an_error(client: Client) -> None:
    code = "class Bad:\n    def __repr__(self):\n        raise ValueError('no repr')\nBad()"
    body = await execute(client, "bad-repr", code)
    assert body["returnCode"] == 1 and body["result"] is None
    assert "ValueError: no repr" in body["error"]
    assert 'File "<cell-1>", line 3, in __repr__' in body["error"]
    # The display hook that called repr() lives in replchild/repl.py: its frames are cut too.
    assert "runner_child" not in body["error"] and "replchild" not in body["error"]


@pytest.mark.parametrize("last", ["1 +", "await f()", "yield 1"])
async def test_syntax_error_in_final_expression_runs_nothing(client: Client, last: str) -> None:
    sid = "final-syntax"
    body = await execute(client, sid, f"ran = True\n{last}")
    assert body["returnCode"] == 1 and "SyntaxError" in body["error"]
    assert 'File "<cell-' in body["error"] and "line 2" in body["error"]
    assert (await execute(client, sid, "'ran' in globals()"))["result"] == "False"


async def test_displayhook_is_replaceable(client: Client) -> None:
    code = "import sys\nsys.displayhook = lambda value: print('shown:', value)\n7"
    body = await execute(client, "hook", code)
    assert body["output"] == "shown: 7\n" and body["result"] is None


# --- rich output ---------------------------------------------------------------------------


def png_of(bundle: dict[str, Any]) -> bytes:
    data = base64.b64decode(bundle["image/png"], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return data


async def test_repr_png_result_is_a_display(client: Client) -> None:
    sid = "png"
    await execute(client, sid, PNG_CLASS)
    body = await execute(client, sid, "Pic()")
    assert body["result"] is None and body["returnCode"] == 0
    [bundle] = body["displays"]
    assert set(bundle) == {"image/png", "text/plain"}
    assert bundle["text/plain"] == "<Pic 4x3>"
    # The object itself is kept in `_`, as any result.
    assert (await execute(client, sid, "_.width"))["result"] == "4"
    expected = (await execute(client, sid, "tiny_png().hex()"))["result"]
    assert png_of(bundle).hex() == expected.strip("'")


async def test_every_repr_method_lands_in_one_bundle(client: Client) -> None:
    code = (
        "class Rich:\n"
        "    def _repr_html_(self): return '<b>rich</b>'\n"
        "    def _repr_svg_(self): return '<svg xmlns=\"http://www.w3.org/2000/svg\"/>'\n"
        "    def _repr_markdown_(self): return '**rich**'\n"
        "    def _repr_json_(self): return {'a': [1, 2]}\n"
        "    def _repr_jpeg_(self): return (b'\\xff\\xd8jpeg', {'width': 1})\n"
        "    def _repr_png_(self): return None\n"
        "Rich()"
    )
    [bundle] = (await execute(client, "rich", code))["displays"]
    assert bundle["text/html"] == "<b>rich</b>"
    assert bundle["image/svg+xml"].startswith("<svg")
    assert bundle["text/markdown"] == "**rich**"
    assert bundle["application/json"] == {"a": [1, 2]}
    assert base64.b64decode(bundle["image/jpeg"]) == b"\xff\xd8jpeg"
    assert "image/png" not in bundle  # None means "not available"
    assert bundle["text/plain"].startswith("<__main__.Rich object at")


async def test_repr_mimebundle(client: Client) -> None:
    code = (
        "class Custom:\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return ({'application/vnd.custom+json': {'k': 1}, 'text/plain': 'custom!',\n"
        "                 'application/octet-stream': b'\\x00\\x01', 'text/html': '<i>c</i>'},\n"
        "                {'metadata': True})\n"
        "    def _repr_html_(self): return '<b>ignored: the bundle has HTML</b>'\n"
        "Custom()"
    )
    [bundle] = (await execute(client, "bundle", code))["displays"]
    assert bundle == {
        "application/vnd.custom+json": {"k": 1},
        "application/octet-stream": "AAE=",
        "text/html": "<i>c</i>",
        "text/plain": "custom!",
    }


async def test_text_only_mimebundle_is_a_result(client: Client) -> None:
    code = (
        "class Text:\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return {'text/plain': 'just text'}\n"
        "Text()"
    )
    body = await execute(client, "text-bundle", code)
    assert (body["result"], body["displays"]) == ("just text", [])


async def test_objects_without_rich_reprs_stay_plain_results(client: Client) -> None:
    code = (
        "class OnlyNone:\n    def _repr_html_(self):\n        return None\n"
        "    def __repr__(self):\n        return 'plain'\n"
        "class WithPng:\n    def _repr_png_(self):\n        return b'png'\n"
    )
    sid = "plain"
    await execute(client, sid, code)
    none = await execute(client, sid, "OnlyNone()")
    assert (none["result"], none["displays"]) == ("plain", [])
    cls = await execute(client, sid, "WithPng")  # the class, not an instance
    assert (cls["result"], cls["displays"]) == ("<class '__main__.WithPng'>", [])


async def test_failing_repr_method_is_skipped_with_a_traceback(client: Client) -> None:
    code = (
        "class Half:\n"
        "    def _repr_html_(self):\n        raise RuntimeError('html broke')\n"
        "    def _repr_markdown_(self):\n        return '*fine*'\n"
        "Half()"
    )
    body = await execute(client, "half", code)
    assert body["returnCode"] == 0
    [bundle] = body["displays"]
    assert bundle["text/markdown"] == "*fine*" and "text/html" not in bundle
    assert "RuntimeError: html broke" in body["error"]
    assert "Half._repr_html_() failed" in body["error"]


async def test_display_builtin_in_order_with_output(client: Client) -> None:
    sid = "display"
    await execute(client, sid, PNG_CLASS)
    code = "print('before')\ndisplay(Pic(), 3, 'text')\nprint('after')"
    events = coalesced(await stream(client, sid, code))
    kinds = [e["type"] for e in events]
    assert kinds == ["output", "display", "display", "display", "output", "complete"]
    assert events[0]["content"] == "before\n" and events[4]["content"] == "after\n"
    png_of(events[1]["data"])
    assert events[2]["data"] == {"text/plain": "3"}
    assert events[3]["data"] == {"text/plain": "'text'"}
    body = await execute(client, sid, code)
    assert body["output"] == "before\nafter\n" and len(body["displays"]) == 3
    assert body["result"] is None  # display() returns None


async def test_display_raw_bundle(client: Client) -> None:
    code = "display({'text/html': '<p>raw</p>', 'image/png': b'\\x89PNG'}, raw=True)"
    [bundle] = (await execute(client, "raw", code))["displays"]
    assert bundle == {"text/html": "<p>raw</p>", "image/png": "iVBORw==", "text/plain": ""}


async def test_displays_count_towards_the_output_cap(make_client: MakeClient) -> None:
    client = await make_client(max_output_bytes=2000)
    sid = "capped"
    await execute(client, sid, PNG_CLASS)
    body = await execute(client, sid, "print('small')\ndisplay(Pic(2, 2))\ndisplay(Pic(400, 400))")
    assert body["output"] == "small\n"
    assert len(body["displays"]) == 1 and body["truncated"] is True
    assert "[output truncated" in body["error"]
    assert body["reason"] == "output_limit"


async def test_display_over_the_frame_limit_falls_back_to_text(make_client: MakeClient) -> None:
    client = await make_client(max_frame_bytes=300_000, max_body_bytes=100_000)
    sid = "huge"
    await execute(client, sid, "class Huge:\n    def _repr_png_(self):\n        return b'x' * 4**9")
    body = await execute(client, sid, "Huge()\n")
    assert body["returnCode"] == 0
    [bundle] = body["displays"]
    assert list(bundle) == ["text/plain"]
    assert "exceeds the 300000-byte frame limit" in body["error"]
    assert (await execute(client, sid, "print('alive')"))["output"] == "alive\n"


async def test_display_in_a_forked_copy_is_text(client: Client) -> None:
    code = (
        "import os\npid = os.fork()\nif pid == 0:\n    display('from the copy')\n"
        "os.waitpid(pid, 0) if pid else None"
    )
    body = await execute(client, "fork-display", code)
    assert "'from the copy'" in body["output"]
    assert body["displays"] == [] and body["returnCode"] == 0


# --- matplotlib ----------------------------------------------------------------------------


async def test_child_environment_selects_agg(client: Client) -> None:
    body = await execute(client, "mpl-env", "import os\nos.environ.get('MPLBACKEND')")
    assert body["result"] == "'Agg'"


async def test_matplotlib_figures_become_png_displays(make_client: MakeClient) -> None:
    # matplotlib is in the dev extras: this runs wherever the tests do, never skipped.
    python = os.environ.get("REPL_TEST_MPL_PYTHON") or sys.executable
    client = await make_client(python=python, timeout_s=60.0)
    sid = "mpl"
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()\nprint('after show')"
    async with asyncio.timeout(60):  # the first import may build matplotlib's font cache
        events = await stream(client, sid, code)
    shown = coalesced(events)  # without the opening `start`
    assert [e["type"] for e in shown] == ["display", "output", "complete"], events
    png_of(shown[0]["data"])
    assert shown[0]["data"]["text/plain"].startswith("<Figure size")
    # A figure left open is shown at the end, then closed; the backend is Agg.
    body = await execute(client, sid, "plt.figure()\nplt.bar([1, 2], [3, 4])\nprint('drawn')")
    assert body["output"] == "drawn\n" and len(body["displays"]) == 1
    png_of(body["displays"][0])
    code = "import matplotlib\n(plt.get_fignums(), matplotlib.get_backend().lower())"
    after = await execute(client, sid, code)
    assert after["result"] == "([], 'agg')" and after["displays"] == []
    # A Figure as a result shows as its image, as in a notebook.
    fig = await execute(client, sid, "from matplotlib.figure import Figure\nFigure()")
    png_of(fig["displays"][0])


# --- input() -------------------------------------------------------------------------------


async def test_input_in_execute_fails_at_once_with_a_clear_message(client: Client) -> None:
    for code in ("input('name? ')", "import getpass\ngetpass.getpass()"):
        started = time.monotonic()
        body = await execute(client, "no-input", code)
        assert time.monotonic() - started < 5
        assert body["returnCode"] == 1
        assert "EOFError: input() is not available in /execute" in body["error"]
        assert "/execute-stream" in body["error"]
        assert body["output"] == ""


async def test_input_answered_through_the_stream(client: Client) -> None:
    sid = "ask"
    code = "print('before')\nname = input('Name: ')\nprint('hello', name)\nname"
    async with asyncio.timeout(15):
        resp = await client.post(f"/execute-stream/{sid}", json={"code": code, "protocol": 2})
        first = coalesced(await events_until(resp, "input_request"))
        assert first[0] == {"type": "output", "content": "before\n"}
        assert first[-1] == {"type": "input_request", "prompt": "Name: ", "password": False}
        assert await answer(client, sid, "Ada é") == {"sessionId": sid, "answered": True}
        rest = await events_until(resp, "complete")
    assert joined(rest, "output") == "Name: Ada é\nhello Ada é\n"
    assert [e for e in rest if e["type"] == "result"] == [{"type": "result", "content": "'Ada é'"}]
    assert rest[-1]["returnCode"] == 0


async def test_getpass_asks_without_echo(client: Client) -> None:
    sid = "secret"
    code = "from getpass import getpass\npw = getpass('Secret: ')\nprint(len(pw))"
    async with asyncio.timeout(15):
        resp = await client.post(f"/execute-stream/{sid}", json={"code": code, "protocol": 2})
        first = await events_until(resp, "input_request")
        assert first[-1] == {"type": "input_request", "prompt": "Secret: ", "password": True}
        await answer(client, sid, "hunter2")
        rest = await events_until(resp, "complete")
    assert joined(first + rest, "output") == "7\n"  # neither prompt nor answer echoed
    assert joined(rest, "error") == ""
    # Imported in an earlier cell, the module's function is the answered one too.
    async with asyncio.timeout(15):
        code = "import getpass\ngetpass.getpass()"
        resp = await client.post(f"/execute-stream/{sid}", json={"code": code, "protocol": 2})
        events = await events_until(resp, "input_request")
        assert events[-1]["prompt"] == "Password: " and events[-1]["password"] is True
        await answer(client, sid, "x")
        done = await events_until(resp, "complete")
    assert done[-1]["returnCode"] == 0


async def test_input_route_refuses_when_nothing_waits(client: Client) -> None:
    assert "detail" in await answer(client, "nobody", "x", status=409)
    await execute(client, "idle", "x = 1")
    assert "detail" in await answer(client, "idle", "x", status=409)
    resp = await client.post(
        "/execute-stream/busy", json={"code": "import time\nprint('go', flush=True)\ntime.sleep(1)"}
    )
    await events_until(resp, "output")
    assert "detail" in await answer(client, "busy", "x", status=409)  # running, not asking
    assert (await events_until(resp, "complete"))[-1]["returnCode"] == 0


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b"{}", b'{"value": 3}', b'{"value": null}', b'{"value": ["a"]}'],
)
async def test_input_route_bad_bodies(client: Client, body: bytes) -> None:
    resp = await client.post("/input/bad", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["detail"]


async def test_input_route_bad_session_id(client: Client) -> None:
    resp = await client.post("/input/bad.id", json={"value": "x"})
    assert resp.status == 400 and "session id" in (await resp.json())["detail"]


async def test_interrupt_while_waiting_for_input(client: Client) -> None:
    sid = "stop-input"
    await execute(client, sid, "marker = 'kept'")
    async with asyncio.timeout(15):
        resp = await client.post(
            f"/execute-stream/{sid}", json={"code": "input('? ')", "protocol": 2}
        )
        await events_until(resp, "input_request")
        stop = await client.post(f"/interrupt/{sid}")
        assert (await stop.json())["interrupted"] is True
        events = await events_until(resp, "complete")
    assert events[-1]["reason"] == "interrupted"
    assert "KeyboardInterrupt" in joined(events, "error")
    await answer(client, sid, "too late", status=409)
    after = await execute(client, sid, "print(marker)")
    assert after["output"] == "kept\n" and after["restarted"] is False


async def test_input_wait_is_bounded_by_the_timeout(client: Client) -> None:
    started = time.monotonic()
    resp = await client.post(
        "/execute-stream/slow", json={"code": "input()", "timeout": 1, "protocol": 2}
    )
    async with asyncio.timeout(10):
        events = await events_until(resp, "complete")
    assert events[-1]["reason"] == "timeout" and time.monotonic() - started < 5
    assert "Execution timed out after 1 s." in joined(events, "error")


async def test_input_after_the_client_left_gets_eof(client: Client) -> None:
    sid = "gone"
    code = (
        "import time\nprint('first', flush=True)\ntime.sleep(0.5)\nprint('late', flush=True)\n"
        "try:\n    input('anyone? ')\nexcept EOFError as exc:\n    outcome = str(exc)"
    )
    resp = await client.post(
        f"/execute-stream/{sid}", json={"code": code, "timeout": 30, "protocol": 2}
    )
    await events_until(resp, "output")
    resp.close()  # the client goes away; nobody could answer the prompt
    started = time.monotonic()
    async with asyncio.timeout(10):
        body = await execute(client, sid, "outcome")
    assert time.monotonic() - started < 5  # not the 30 s timeout
    assert "the client that could answer it went away" in body["result"]
