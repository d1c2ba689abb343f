"""Execution semantics: persistence, isolation, reset, tracebacks, output capture, exits."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from .conftest import Client, execute, stream, wait_for_session

ROUTES = ("/execute", "/execute-stream")


def joined(events: list[dict[str, Any]], kind: str) -> str:
    return "".join(e["content"] for e in events if e["type"] == kind)


async def run(client: Client, route: str, sid: str, code: str) -> dict[str, Any]:
    """Either route, as an /execute-style reply (stream events concatenated per kind)."""
    async with asyncio.timeout(15):
        if route == "/execute":
            return await execute(client, sid, code)
        events = await stream(client, sid, code)
    kinds = [e["type"] for e in events]
    assert kinds.count("complete") == 1 and kinds[-1] == "complete", events
    err = joined(events, "error")
    return {
        "output": joined(events, "output"),
        "error": err or None,
        "returnCode": events[-1]["returnCode"],
        "restarted": events[-1].get("restarted"),
        "events": events,
    }


# --- persistence and namespace -------------------------------------------------------------


async def test_state_persists_across_calls(client: Client) -> None:
    sid = "persist"
    await execute(client, sid, "import math as m\nfrom collections import Counter\nv = 10")
    await execute(client, sid, "def double(x):\n    return 2 * x")
    await execute(
        client, sid, "class Box:\n    def __init__(self, v):\n        self.v = v\nlst = []"
    )
    await execute(client, sid, "lst.append(double(v))")
    body = await execute(
        client,
        sid,
        "print(m.floor(2.5), Counter('aab')['a'], Box(v).v, lst, type(Box(1)).__name__)",
    )
    assert body["output"] == "2 2 10 [20] Box\n"
    assert body["error"] is None


async def test_module_name_is_main(client: Client) -> None:
    body = await execute(
        client, "main", "print(__name__)\nif __name__ == '__main__':\n    print('main!')"
    )
    assert body["output"] == "__main__\nmain!\n"
    body = await execute(
        client, "main", "import sys\nprint(sys.modules['__main__'].__dict__ is globals())"
    )
    assert body["output"] == "True\n"


async def test_sessions_are_isolated(client: Client) -> None:
    await execute(client, "iso-a", "secret = 'a'\nimport json\njson.marker = 'a'")
    body = await execute(client, "iso-b", "print(secret)")
    assert body["returnCode"] == 1
    assert "NameError" in body["error"] and "secret" in body["error"]
    body = await execute(client, "iso-b", "import json\nprint(hasattr(json, 'marker'))")
    assert body["output"] == "False\n"
    body = await execute(client, "iso-a", "print(secret, json.marker)")
    assert body["output"] == "a a\n"


async def test_sessions_run_in_different_processes(client: Client) -> None:
    a = await execute(client, "pid-a", "import os\nprint(os.getpid())")
    b = await execute(client, "pid-b", "import os\nprint(os.getpid())")
    assert a["output"].strip().isdigit() and b["output"].strip().isdigit()
    assert a["output"] != b["output"]


# --- reset ---------------------------------------------------------------------------------


async def test_reset_clears_variables_and_modules(client: Client) -> None:
    sid = "reset"
    await execute(client, sid, "gone = 1\nimport json\njson.marker = 1\ndef f():\n    pass")
    resp = await client.post(f"/reset/{sid}")
    assert resp.status == 200
    body = await execute(client, sid, "print('gone' in globals(), 'f' in globals())")
    assert body["output"] == "False False\n"
    body = await execute(client, sid, "import json\nprint(hasattr(json, 'marker'))")
    assert body["output"] == "False\n"
    assert body["restarted"] is False  # an asked-for reset is not a lost-state restart


async def test_reset_ends_threads(client: Client) -> None:
    sid = "threads"
    base = await execute(client, sid, "import threading\nprint(threading.active_count())")
    n0 = int(base["output"])
    started = await execute(
        client,
        sid,
        "import threading, time\n"
        "t = threading.Thread(target=time.sleep, args=(30,))\n"
        "t.start()\n"
        "print(threading.active_count())",
    )
    assert int(started["output"]) == n0 + 1
    async with asyncio.timeout(10):
        resp = await client.post(f"/reset/{sid}")
    assert resp.status == 200
    after = await execute(client, sid, "import threading\nprint(threading.active_count())")
    assert int(after["output"]) == n0


async def test_reset_waits_for_running_code(client: Client) -> None:
    sid = "reset-queue"
    await execute(client, sid, "x = 0")
    task = asyncio.create_task(execute(client, sid, "import time\ntime.sleep(0.3)\nx = 1"))
    await wait_for_session(client, sid, lambda info: info["executionCount"] == 2)  # sent
    async with asyncio.timeout(10):
        resp = await client.post(f"/reset/{sid}")
        assert resp.status == 200
        first = await task
    assert first["returnCode"] == 0
    body = await execute(client, sid, "print('x' in globals())")
    assert body["output"] == "False\n"


# --- tracebacks ----------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
async def test_traceback_shows_user_source(client: Client, route: str) -> None:
    sid = "tb-" + route.strip("/")
    await run(client, route, sid, "def helper(n):\n    return 10 // n  # divide here\n\nvalue = 3")
    body = await run(client, route, sid, "print('start')\nhelper(0)")
    assert body["returnCode"] == 1
    assert body["output"] == "start\n"
    err = body["error"]
    assert err.startswith("Traceback (most recent call last):\n")
    assert 'File "<cell-2>", line 2, in <module>' in err
    assert "    helper(0)\n" in err
    assert 'File "<cell-1>", line 2, in helper' in err
    assert "return 10 // n  # divide here" in err
    assert err.rstrip("\n").endswith("ZeroDivisionError: integer division or modulo by zero")
    assert "runner_child" not in err
    assert err.count('File "') == 2  # no runner frames at all


async def test_traceback_cell_numbers_follow_execution_count(client: Client) -> None:
    sid = "tb-count"
    for _ in range(3):
        await execute(client, sid, "pass")
    body = await execute(client, sid, "raise KeyError('k')")
    assert body["executionCount"] == 4
    assert 'File "<cell-4>", line 1, in <module>' in body["error"]
    assert "KeyError: 'k'" in body["error"]


@pytest.mark.parametrize("route", ROUTES)
async def test_syntax_error_like_the_repl(client: Client, route: str) -> None:
    body = await run(client, route, "syntax-" + route.strip("/"), "x = 1\ny = (1,\nprint(y)")
    assert body["returnCode"] == 1
    assert body["output"] == ""
    err = body["error"]
    assert "Traceback" not in err
    assert "runner_child" not in err
    assert 'File "<cell-1>", line 2' in err
    assert "y = (1," in err
    assert re.search(r"^\s+\^+\s*$", err, re.MULTILINE), err
    assert "SyntaxError:" in err


async def test_syntax_error_runs_nothing(client: Client) -> None:
    sid = "syntax-nothing"
    body = await execute(client, sid, "ran = True\nif True\n    pass")
    assert body["returnCode"] == 1
    assert "SyntaxError: expected ':'" in body["error"]
    body = await execute(client, sid, "print('ran' in globals())")
    assert body["output"] == "False\n"


# --- stderr and encodings ------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
async def test_stderr_capture(client: Client, route: str) -> None:
    code = "import os, sys\nsys.stderr.write('err1\\n')\nos.write(2, b'err2\\n')\nprint('out')"
    body = await run(client, route, "stderr-" + route.strip("/"), code)
    assert body["returnCode"] == 0
    assert body["output"] == "out\n"
    assert body["error"] == "err1\nerr2\n"


@pytest.mark.parametrize("route", ROUTES)
async def test_unicode_round_trip(client: Client, route: str) -> None:
    text = (
        "emoji \U0001f600\U0001f680, CJK 中文字, combining e\u0301 a\u0308,"
        " RTL \u05e9\u05dc\u05d5\u05dd"
    )
    code = f"import os\nprint({text!r})\nos.write(1, 'é'.encode())\nprint()"
    body = await run(client, route, "uni-" + route.strip("/"), code)
    assert body["output"] == text + "\né\n"
    assert body["error"] is None


@pytest.mark.parametrize("route", ROUTES)
async def test_invalid_utf8_becomes_replacement_chars(client: Client, route: str) -> None:
    sid = "bad-utf8-" + route.strip("/")
    body = await run(client, route, sid, "import os\nos.write(1, b'\\xff\\xfe ok')")
    assert body["output"] == "\ufffd\ufffd ok"
    assert body["returnCode"] == 0
    body = await run(client, route, sid, "import os\nos.write(2, b'bad \\xc3(')")
    assert body["error"] == "bad \ufffd("
    after = await run(client, route, sid, "print('still fine')")
    assert after["output"] == "still fine\n"
    assert after["restarted"] is False


async def test_multibyte_char_split_across_writes_in_stream(client: Client) -> None:
    code = (
        "import os, time\n"
        "data = '€é😀'.encode()\n"
        "for i in range(len(data)):\n"
        "    os.write(1, data[i:i + 1])\n"
        "    time.sleep(0.05)\n"
    )
    events = await stream(client, "split", code)
    out = [e["content"] for e in events if e["type"] == "output"]
    assert "".join(out) == "€é😀"
    assert all("\ufffd" not in piece for piece in out)


# --- ordering across fd-level writers ------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "middle",
    ["os.system('echo b')", "subprocess.run(['echo', 'b'])", "os.write(1, b'b\\n')"],
)
async def test_output_order_with_subprocesses(client: Client, route: str, middle: str) -> None:
    code = f"import os, subprocess\nprint('a')\n{middle}\nprint('c')"
    body = await run(client, route, "order-" + route.strip("/"), code)
    assert body["output"] == "a\nb\nc\n"
    assert body["returnCode"] == 0


@pytest.mark.parametrize("route", ROUTES)
async def test_print_without_newline_arrives(client: Client, route: str) -> None:
    body = await run(client, route, "noeol-" + route.strip("/"), "print('no newline', end='')")
    assert body["output"] == "no newline"


async def test_stderr_of_subprocess_is_captured(client: Client) -> None:
    body = await execute(client, "sub-err", "import os\nos.system('echo oops >&2')")
    assert body["error"] == "oops\n"


# --- SystemExit ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    ["sys.exit()", "sys.exit(0)", "exit()", "quit()", "raise SystemExit(None)", "raise SystemExit"],
)
async def test_clean_exit_keeps_namespace(client: Client, code: str) -> None:
    sid = "exit0"
    await execute(client, sid, "keep = 'kept'")
    body = await execute(client, sid, f"import sys\nprint('before')\n{code}\nprint('after')")
    assert body["returnCode"] == 0
    assert body["output"] == "before\n"
    assert body["error"] is None
    after = await execute(client, sid, "print(keep)")
    assert after["output"] == "kept\n"
    assert after["restarted"] is False


@pytest.mark.parametrize(
    ("code", "mention"),
    [("sys.exit(3)", "3"), ("raise SystemExit('bye')", "bye"), ("sys.exit('custom')", "custom")],
)
async def test_failing_exit_keeps_namespace(client: Client, code: str, mention: str) -> None:
    sid = "exit1"
    await execute(client, sid, "keep = 'kept'")
    body = await execute(client, sid, f"import sys\n{code}\nprint('after')")
    assert body["returnCode"] == 1
    assert body["output"] == ""
    assert body["error"] is not None and mention in body["error"]
    after = await execute(client, sid, "print(keep)")
    assert after["output"] == "kept\n"
    assert after["restarted"] is False


async def test_failing_exit_in_stream(client: Client) -> None:
    events = await stream(client, "exit-stream", "import sys\nsys.exit(3)")
    assert events[-1]["type"] == "complete" and events[-1]["returnCode"] == 1
    assert "3" in joined(events, "error")


# --- standard input ------------------------------------------------------------------------


async def test_input_fails_at_once(client: Client) -> None:
    async with asyncio.timeout(5):
        body = await execute(client, "stdin", "x = 1\ninput()")
    assert body["returnCode"] == 1
    assert "EOFError" in body["error"]
    async with asyncio.timeout(5):
        body = await execute(
            client, "stdin", "try:\n    input()\nexcept EOFError:\n    print('eof')"
        )
    assert body["output"] == "eof\n"


async def test_stdin_read_returns_empty(client: Client) -> None:
    async with asyncio.timeout(5):
        body = await execute(
            client,
            "stdin-read",
            "import sys\nprint(repr(sys.stdin.read()), repr(sys.stdin.readline()))",
        )
    assert body["output"] == "'' ''\n"
    assert body["returnCode"] == 0


async def test_stdin_fd_read_returns_eof(client: Client) -> None:
    async with asyncio.timeout(5):
        body = await execute(client, "stdin-fd", "import os\nprint(repr(os.read(0, 100)))")
    assert body["output"] == "b''\n"


async def test_input_after_exit_still_eof(client: Client) -> None:
    """exit()/quit() close sys.stdin; stdin must still behave as EOF in later cells."""
    sid = "stdin-after-exit"
    await execute(client, sid, "exit()")
    async with asyncio.timeout(5):
        body = await execute(client, sid, "try:\n    input()\nexcept EOFError:\n    print('eof')")
    assert body["output"] == "eof\n", body["error"]
    async with asyncio.timeout(5):
        body = await execute(client, sid, "import sys\nprint(repr(sys.stdin.read()))")
    assert body["output"] == "''\n", body["error"]


# --- exceptions that must not kill the session ---------------------------------------------


async def test_keyboard_interrupt_from_code(client: Client) -> None:
    sid = "kbint"
    await execute(client, sid, "keep = 5")
    body = await execute(client, sid, "raise KeyboardInterrupt")
    assert body["returnCode"] == 1
    assert "KeyboardInterrupt" in body["error"]
    after = await execute(client, sid, "print(keep)")
    assert after["output"] == "5\n"
    assert after["restarted"] is False


async def test_exception_with_broken_str(client: Client) -> None:
    sid = "badstr"
    await execute(client, sid, "keep = 6")
    code = (
        "class Weird(Exception):\n"
        "    def __str__(self):\n"
        "        raise RuntimeError('no str for you')\n"
        "    def __repr__(self):\n"
        "        raise RuntimeError('no repr either')\n"
        "raise Weird()"
    )
    async with asyncio.timeout(10):
        body = await execute(client, sid, code)
    assert body["returnCode"] == 1
    assert "Weird" in body["error"]
    after = await execute(client, sid, "print(keep)")
    assert after["output"] == "6\n"
    assert after["restarted"] is False


async def test_replaced_std_streams_are_repaired(client: Client) -> None:
    sid = "std-replaced"
    body = await execute(client, sid, "import os\nos.close(1)\nos.close(2)")
    assert body["returnCode"] == 0
    body = await execute(client, sid, "import os\nprint('p')\nos.write(1, b'w\\n')")
    assert body["output"] == "p\nw\n"


@pytest.mark.parametrize("route", ROUTES)
async def test_os_exit_restarts_with_fresh_state(client: Client, route: str) -> None:
    sid = "osexit-" + route.strip("/")
    await run(client, route, sid, "keep = 1")
    body = await run(client, route, sid, "import os\nprint('bye', flush=True)\nos._exit(3)")
    assert body["returnCode"] == 1
    assert body["error"] is not None and "code 3" in body["error"]
    async with asyncio.timeout(15):
        after = await run(client, route, sid, "print('keep' in globals())")
    assert after["output"] == "False\n"
    assert after["restarted"] is True
    again = await run(client, route, sid, "print('ok')")
    assert again["output"] == "ok\n"
    assert again["restarted"] is False


@pytest.mark.parametrize("route", ROUTES)
async def test_output_before_os_exit_is_delivered(client: Client, route: str) -> None:
    """What the code wrote before the process died is part of its output, in order."""
    sid = "osexit-out-" + route.strip("/")
    body = await run(client, route, sid, "import os\nprint('bye', flush=True)\nos._exit(3)")
    assert body["returnCode"] == 1
    assert body["error"] is not None and "code 3" in body["error"]
    assert body["output"] == "bye\n"


@pytest.mark.parametrize(
    ("code", "mention"),
    [
        ("import ctypes\nctypes.string_at(0)", "SIGSEGV"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
    ],
    ids=["sigsegv", "sigkill"],
)
async def test_child_killed_by_signal_restarts(client: Client, code: str, mention: str) -> None:
    sid = "crash"
    await execute(client, sid, "keep = 1")
    async with asyncio.timeout(15):
        body = await execute(client, sid, code)
    assert body["returnCode"] == 1
    assert body["error"] is not None and mention in body["error"]
    async with asyncio.timeout(15):
        after = await execute(client, sid, "print('keep' in globals())")
    assert after["output"] == "False\n"
    assert after["restarted"] is True


async def test_terminating_a_forked_copy_leaves_the_session_alive(client: Client) -> None:
    # What a multiprocessing pool's terminate() does to its forked workers: SIGTERM. In a
    # copy of the runner that signal must end the copy alone, not the session's group.
    # (The copy says it runs first: CPython drops a signal that lands inside fork().)
    code = (
        "import os, signal, time\n"
        "kept = 'yes'\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.write(w, b'up')\n"
        "    time.sleep(30)\n"
        "    os._exit(0)\n"
        "os.read(r, 2)\n"
        "os.kill(pid, signal.SIGTERM)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"
    )
    first = await execute(client, "copy", code)
    assert (first["output"], first["reason"]) == ("-15\n", "ok"), first
    second = await execute(client, "copy", "print(kept)")
    assert (second["output"], second["restarted"]) == ("yes\n", False), second


async def test_small_reply_leaves_whole_with_its_headers(client: Client) -> None:
    # A reply under REPLY_FLUSH_BYTES is sent as one Response (headers and body in one
    # send): it keeps the headers the streamed reply had, and a Content-Length.
    resp = await client.post("/execute/whole", json={"code": "print('hi')"})
    raw = await resp.read()
    headers, data = resp.headers, json.loads(raw)
    assert resp.status == 200 and data["output"] == "hi\n"
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Content-Length"] == str(len(raw))
    assert headers["X-Execution-Id"] == data["executionId"]
    assert "X-Replica" in headers
