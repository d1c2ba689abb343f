"""A notebook-grade REPL: completion and inspection from the live namespace (in the session's
own child), preloaded modules and startup code. Real app, real children."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import runner_child
from replchild import complete as runner_complete
from replserver import completion, protocol
from replserver.completion_routes import JEDI_CACHE
from replserver.settings import Settings

from . import conftest
from .conftest import Client, MakeClient, execute

POINT = """
class Point:
    '''A point in the plane.'''
    def __init__(self, x, y):
        self.xcoord = x
        self.ycoord = y
point = Point(1, 2)
setattr(point, 'made_' + 'live', True)  # no source says it exists: only the live object
inventory = {'apples': 3, 'apricots': 5, 'bananas': 7}
my_variable = 42
"""


async def post(
    client: Client, route: str, sid: str, body: object, status: int = 200
) -> dict[str, Any]:
    resp = await client.post(f"/{route}/{sid}", json=body)
    assert resp.status == status, await resp.text()
    reply: dict[str, Any] = await resp.json()
    return reply


async def complete(
    client: Client, sid: str, code: str, cursor: int | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code}
    if cursor is not None:
        body["cursor"] = cursor
    return await post(client, "complete", sid, body)


def test_frame_types_agree_with_the_child_copy() -> None:
    for name in ("T_QUERY", "T_ANSWER", "T_STARTUP"):
        assert getattr(runner_child, name) == getattr(protocol, name), name
    kinds = [v for k, v in vars(protocol).items() if k.startswith("T_")]
    assert len(kinds) == len(set(kinds)), "two frame types share a byte"


# --- completion --------------------------------------------------------------------------------


async def test_completes_names_attributes_keys_modules_keywords(client: Client) -> None:
    sid = "complete"
    await execute(client, sid, POINT)
    name = await complete(client, sid, "my_var")
    assert name == {"matches": ["my_variable"], "cursorStart": 0, "cursorEnd": 6}
    attrs = await complete(client, sid, "point.")
    assert {"xcoord", "ycoord", "made_live"} <= set(attrs["matches"]), attrs
    assert attrs["cursorStart"] == attrs["cursorEnd"] == 6
    prefixed = await complete(client, sid, "point.y")
    assert prefixed == {"matches": ["ycoord"], "cursorStart": 6, "cursorEnd": 7}
    keys = await complete(client, sid, "inventory['ap")
    assert sorted(keys["matches"]) == ["'apples'", "'apricots'"], keys
    assert keys["cursorStart"] == len("inventory[")  # the match replaces the quote too
    module = await complete(client, sid, "import jso")
    assert "json" in module["matches"] and module["cursorStart"] == len("import ")
    names = await complete(client, sid, "from collections import Ordered")
    assert "OrderedDict" in names["matches"]
    keyword = await complete(client, sid, "whil")
    assert "while" in keyword["matches"] and keyword["cursorStart"] == 0
    builtin = await complete(client, sid, "isinst")
    assert "isinstance" in builtin["matches"]


async def test_cursor_in_the_middle_of_the_code(client: Client) -> None:
    sid = "middle"
    await execute(client, sid, POINT)
    code = "total = my_var + 1\nprint(total)"
    reply = await complete(client, sid, code, cursor=len("total = my_var"))
    assert reply == {"matches": ["my_variable"], "cursorStart": 8, "cursorEnd": 14}
    # Each match replaces code[start:end]: the result is the code with the name completed.
    start, end = reply["cursorStart"], reply["cursorEnd"]
    assert code[:start] + reply["matches"][0] + code[end:] == (
        "total = my_variable + 1\nprint(total)"
    )
    # Characters, not bytes: text before the cursor that is not ASCII does not shift it.
    reply = await complete(client, sid, "s = 'héllo→'; my_v", cursor=None)
    assert reply["matches"] == ["my_variable"] and reply["cursorStart"] == 14
    # Windows line ends (one character each of \r and \n) count as any other.
    reply = await complete(client, sid, "x = 1\r\nmy_v\r\nprint(x)", cursor=11)
    assert reply == {"matches": ["my_variable"], "cursorStart": 7, "cursorEnd": 11}


async def test_a_large_non_ascii_request_fits_the_query_frame(make_client: MakeClient) -> None:
    """The query frame is about the size of the request body, which is below the frame
    limit: 'é' escaped as \\u00e9 would have made it three times larger."""
    client = await make_client(max_body_bytes=2**20, max_frame_bytes=3 * 2**19)
    sid = "large"
    await execute(client, sid, "my_variable = 1")
    code = "s = '" + "é" * 400_000 + "'\nmy_var"
    body = json.dumps({"code": code}, ensure_ascii=False).encode()
    assert len(body) < 2**20 < 3 * len(body)
    headers = {"Content-Type": "application/json"}
    resp = await client.post(f"/complete/{sid}", data=body, headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["matches"] == ["my_variable"]
    assert (await execute(client, sid, "my_variable"))["restarted"] is False


async def test_a_new_session_is_created_and_completes_builtins(client: Client) -> None:
    reply = await complete(client, "never-ran", "pri")
    assert "print" in reply["matches"]
    described = await client.get("/sessions/never-ran")
    assert described.status == 200  # the session now exists, as after /execute


async def test_completion_state_is_the_sessions_own(client: Client) -> None:
    await execute(client, "mine", "only_in_mine = 1")
    assert (await complete(client, "mine", "only_in_m"))["matches"] == ["only_in_mine"]
    assert (await complete(client, "other", "only_in_m"))["matches"] == []


async def test_completion_while_code_runs_is_refused_at_once(client: Client) -> None:
    sid = "busy"
    await execute(client, sid, "ready = 1")
    resp = await client.post(
        f"/execute-stream/{sid}",
        json={"code": "import time\nprint('started', flush=True)\ntime.sleep(30)"},
    )
    async with asyncio.timeout(10):
        while b"started" not in await resp.content.readline():
            pass
    for route in ("complete", "inspect"):
        busy = await post(client, route, sid, {"code": "rea"}, status=409)
        assert "running code" in busy["detail"]
    assert (await post(client, "interrupt", sid, {}))["interrupted"] is True
    await resp.read()  # the stream ends with the interrupted execution
    assert (await complete(client, sid, "rea"))["matches"] == ["ready"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"code": "abc", "cursor": -1}, "between 0 and 3"),
        ({"code": "abc", "cursor": 4}, "between 0 and 3"),
        ({"code": "abc", "cursor": "2"}, "must be an integer"),
        ({"code": "abc", "cursor": 1.5}, "must be an integer"),
        ({"code": "abc", "cursor": True}, "must be an integer"),
        ({"cursor": 0}, "'code' is required"),
        ({"code": 5}, "'code' is required"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_requests_get_400(client: Client, body: object, detail: str) -> None:
    for route in ("complete", "inspect"):
        reply = await post(client, route, "bad", body, status=400)
        assert detail in reply["detail"], reply
    assert (await post(client, "complete", "bad!id", {"code": "x"}, status=400))["detail"]


async def test_a_completion_that_hangs_is_interrupted(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A __dir__ that loops forever holds the session for the query timeout, no longer:
    interrupted, the state survives; ignoring the interrupt, the process is killed."""
    monkeypatch.setattr(completion, "QUERY_TIMEOUT_S", 1.0)
    client = await make_client(interrupt_grace_s=1.0)
    sid = "hang"
    await execute(
        client,
        sid,
        "class Slow:\n    def __dir__(self):\n        while True:\n            pass\n"
        "slow = Slow()\nkept = 1",
    )
    reply = await post(client, "complete", sid, {"code": "slow."}, status=504)
    assert "longer than 1 s" in reply["detail"]
    after = await execute(client, sid, "kept")
    assert after["result"] == "1" and after["restarted"] is False
    stubborn = (
        "class Stubborn:\n    def __dir__(self):\n        while True:\n"
        "            try:\n                while True:\n                    pass\n"
        "            except KeyboardInterrupt:\n                pass\nstubborn = Stubborn()"
    )
    await execute(client, sid, stubborn)
    await post(client, "complete", sid, {"code": "stubborn."}, status=504)
    after = await execute(client, sid, "print('fresh')")
    assert after["restarted"] is True and after["output"] == "fresh\n", after


async def test_output_of_code_run_by_a_completion_is_not_shown(client: Client) -> None:
    sid = "noisy"
    await execute(
        client,
        sid,
        "import os\nclass Noisy:\n    def __dir__(self):\n        print('from dir')\n"
        "        os.write(2, b'fd level\\n')\n        return ['quiet_attr']\nnoisy = Noisy()",
    )
    reply = await complete(client, sid, "noisy.qu")
    assert "quiet_attr" in reply["matches"]
    after = await execute(client, sid, "print('next')")
    assert after["output"] == "next\n" and after["error"] is None, after


# The floor, where jedi is not installed in the children's environment: the same kinds of
# completion from the stdlib (rlcompleter, pkgutil), on a live namespace in this process.
@pytest.mark.parametrize(
    ("before", "start", "expected"),
    [
        ("my_var", 0, ["my_variable"]),
        ("point.yc", 6, ["ycoord"]),
        ("point.made", 6, ["made_live"]),
        ("inventory['ap", 10, ["'apples'", "'apricots'"]),
        ('inventory["ban', 10, ['"bananas"']),
        ("import jso", 7, ["json"]),
        ("from collections import Ordered", 24, ["OrderedDict"]),
        ("whil", 0, ["while"]),
        ("x = (isinst", 5, ["isinstance"]),
    ],
)
def test_the_floor_without_jedi(before: str, start: int, expected: list[str]) -> None:
    namespace: dict[str, Any] = {"__builtins__": __builtins__}
    exec(POINT, namespace)
    found_start, matches = runner_complete.basic_complete(before, namespace)
    assert found_start == start
    assert all(m in matches for m in expected), matches
    assert all(m.startswith(expected[0][:1]) for m in matches), matches


def _python_without_jedi() -> str:
    """A system interpreter whose children cannot import jedi, or "" if there is none."""
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(python):
            found = subprocess.run(
                [
                    python,
                    "-I",
                    "-c",
                    "import sys, importlib.util as u; "
                    "sys.exit(sys.version_info < (3, 11) or bool(u.find_spec('jedi')))",
                ],
                check=False,
            )
            if found.returncode == 0:
                return python
    return ""


async def test_children_without_jedi_complete_from_the_stdlib(make_client: MakeClient) -> None:
    """The floor through a real child: an interpreter where jedi is not installed."""
    python = _python_without_jedi()
    if not python:
        pytest.skip("no Python 3.11+ without jedi on this machine to run the children")
    client = await make_client(python=python)
    sid = "floor"
    await execute(client, sid, POINT + "import sys\nassert 'jedi' not in sys.modules")
    assert (await complete(client, sid, "my_var"))["matches"] == ["my_variable"]
    assert "made_live" in (await complete(client, sid, "point.ma"))["matches"]
    keys = await complete(client, sid, "inventory['ap")
    assert sorted(keys["matches"]) == ["'apples'", "'apricots'"] and keys["cursorStart"] == 10
    assert "json" in (await complete(client, sid, "import jso"))["matches"]
    assert "while" in (await complete(client, sid, "whil"))["matches"]
    info = await post(client, "inspect", sid, {"code": "isinstance("})
    assert "isinstance(obj, class_or_tuple" in info["data"]["text/plain"], info
    check = await execute(client, sid, "import importlib.util as u\nprint(u.find_spec('jedi'))")
    assert check["output"] == "None\n"  # it really had no jedi to use


# --- inspection ---------------------------------------------------------------------------


async def test_inspects_session_and_imported_objects(client: Client) -> None:
    sid = "inspect"
    await execute(
        client,
        sid,
        "import json\ndef area(radius: float) -> float:\n"
        "    '''Area of a circle of the given radius.'''\n    return 3.14159 * radius ** 2",
    )
    own = await post(client, "inspect", sid, {"code": "area(2)", "cursor": 2})
    assert own["found"] is True
    text = own["data"]["text/plain"]
    assert "area(radius: float) -> float" in text and "Area of a circle" in text, text
    imported = await post(client, "inspect", sid, {"code": "json.dumps("})
    text = imported["data"]["text/plain"]
    assert imported["found"] and "dumps(obj" in text and "Serialize" in text, text
    # Inside the call's parentheses, after arguments: still the function called.
    inside = await post(client, "inspect", sid, {"code": "json.dumps([1, 2], "})
    assert inside["data"] == imported["data"]
    missing = await post(client, "inspect", sid, {"code": "no_such_name"})
    assert missing == {"found": False, "data": {}}


async def test_inspects_what_is_not_run_yet(client: Client) -> None:
    """Code typed but not executed: jedi infers what the name will be."""
    reply = await post(client, "inspect", "not-run", {"code": "import textwrap\ntextwrap.dedent("})
    assert reply["found"] and "dedent(" in reply["data"]["text/plain"], reply


# --- preloaded modules --------------------------------------------------------------------

CHECK_LOADED = "import sys\nprint('decimal' in sys.modules, 'decimal' in dir())"


async def test_preloaded_module_is_in_sys_modules_of_a_fresh_session(
    make_client: MakeClient,
) -> None:
    plain = await make_client()
    assert (await execute(plain, "plain", CHECK_LOADED))["output"] == "False False\n"
    client = await make_client(preload=("decimal",))
    body = await execute(client, "fresh", CHECK_LOADED)
    # Loaded in the process, not bound in the namespace: `import decimal` is still needed.
    assert body["output"] == "True False\n", body
    health = await (await client.get("/health")).json()
    assert health["preload"] == {"modules": ["decimal"], "loaded": ["decimal"], "failed": {}}


async def test_a_failing_preload_is_reported_not_fatal(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="replserver.startup")
    client = await make_client(preload=("decimal", "no_such_module_xyz", "json"))
    body = await execute(client, "survives", CHECK_LOADED + "\nprint('json' in sys.modules)")
    assert body["output"] == "True False\nTrue\n" and body["error"] is None, body
    health = await (await client.get("/health")).json()
    assert health["status"] == "ok"
    assert health["preload"]["loaded"] == ["decimal", "json"]
    failed = health["preload"]["failed"]
    assert list(failed) == ["no_such_module_xyz"]
    assert "ModuleNotFoundError" in failed["no_such_module_xyz"]
    assert any("no_such_module_xyz" in r.getMessage() for r in caplog.records)


def test_preload_and_startup_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a module name"):
        conftest.test_settings(preload=("numpy; import os",))
    with pytest.raises(ValueError, match="cannot be read"):
        conftest.test_settings(startup=str(tmp_path / "missing.py"))
    parsed = Settings.from_env({"REPL_PRELOAD": "json, decimal,,"})
    assert parsed.preload == ("json", "decimal")


# --- startup code -------------------------------------------------------------------------


async def test_startup_code_runs_in_every_new_namespace(
    make_client: MakeClient, tmp_path: Path
) -> None:
    startup = tmp_path / "startup.py"
    startup.write_text(
        "import os\nprint('startup stdout')\nos.write(2, b'startup fd 2\\n')\n"
        "BOOT = 'ran'\nRUNS = globals().get('RUNS', 0) + 1\n"
    )
    # The file sits where the children's uid cannot read it: the server hands them its text.
    tmp_path.chmod(0o700)
    client = await make_client(startup=str(startup))
    first = await execute(client, "boot", "print(BOOT, RUNS)")
    assert first["output"] == "ran 1\n" and first["error"] is None, first
    await execute(client, "boot", "BOOT = 'changed'")
    assert (await post(client, "reset", "boot", {}))["sessionId"] == "boot"
    again = await execute(client, "boot", "print(BOOT, RUNS, __name__)")
    assert again["output"] == "ran 1 __main__\n" and again["error"] is None, again
    other = await execute(client, "other-boot", "BOOT")
    assert other["result"] == "'ran'"


async def test_startup_exception_goes_to_the_next_reply_and_the_log(
    make_client: MakeClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="replserver.startup")
    startup = tmp_path / "broken.py"
    startup.write_text("BEFORE = 1\nraise ValueError('broken startup')\nAFTER = 2\n")
    client = await make_client(startup=str(startup))
    first = await execute(client, "broken", "print(BEFORE, 'AFTER' in dir())")
    assert first["output"] == "1 False\n", first
    error = first["error"]
    assert "Error in the startup code" in error and str(startup) in error
    assert "ValueError: broken startup" in error and "raise ValueError" in error
    assert "runner_" not in error  # none of the runner's own frames
    assert first["returnCode"] == 0  # the cell itself succeeded
    second = await execute(client, "broken", "print('clean')")
    assert second["error"] is None and second["output"] == "clean\n"
    logged = [r.getMessage() for r in caplog.records if "broken startup" in r.getMessage()]
    assert logged, caplog.records


async def test_startup_code_and_completion_together(
    make_client: MakeClient, tmp_path: Path
) -> None:
    startup = tmp_path / "helpers.py"
    startup.write_text("def helper_function():\n    '''Provided by the startup file.'''\n")
    client = await make_client(startup=str(startup))
    reply = await complete(client, "helped", "helper_f")
    assert reply["matches"] == ["helper_function"]
    info = await post(client, "inspect", "helped", {"code": "helper_function"})
    assert "Provided by the startup file." in info["data"]["text/plain"]


def test_query_frame_is_json_with_the_cursor() -> None:
    query = completion.Query.from_body("complete", {"code": "héllo"})
    assert query.cursor == 5
    kind_size, body = query.frame()[: protocol.HEADER_SIZE], query.frame()[protocol.HEADER_SIZE :]
    assert kind_size[0] == protocol.T_QUERY
    assert json.loads(body) == {"op": "complete", "code": "héllo", "cursor": 5}


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root server (uid separation) builds it")
@pytest.mark.timeout(180)
async def test_a_root_server_shares_a_read_only_jedi_cache(client: Client) -> None:
    """The first completion of the server builds it; later sessions load it instead of
    parsing the stubs, and cannot write to it (so never into each other's pickles)."""
    cache = client.app[JEDI_CACHE]
    assert cache.state == "not built"
    await complete(client, "before-cache", "pri")
    assert cache.state in ("building", "ready")
    async with asyncio.timeout(150):
        while cache.state == "building":
            await asyncio.sleep(0.2)
    assert cache.state == "ready"
    assert cache.path.stat().st_uid == 0 and not cache.path.stat().st_mode & 0o022
    look = "import os\nprint(os.path.isdir('.cache/jedi'))"
    # Before the cache, jedi pickled what it parsed into the session's own directory.
    assert (await execute(client, "before-cache", look))["output"] == "True\n"
    assert "print" in (await complete(client, "after-cache", "pri"))["matches"]
    assert (await execute(client, "after-cache", look))["output"] == "False\n"
    probe = f"open({str(cache.path / 'planted.pkl')!r}, 'wb')"
    denied = await execute(client, "after-cache", probe)
    assert "PermissionError" in denied["error"]


# --- the child is untrusted -----------------------------------------------------------------

FIND_RUNNER = (
    "import gc\nrunner = next(o for o in gc.get_objects() if type(o).__name__ == 'Runner')\n"
)


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (b"not json", "malformed answer"),
        (b'{"matches": "abc", "cursorStart": 0, "cursorEnd": 0}', "malformed completion"),
        (b'{"matches": ["x"], "cursorStart": 0, "cursorEnd": 99}', "malformed completion"),
        (b'{"matches": [1], "cursorStart": 0, "cursorEnd": 0}', "malformed completion"),
    ],
)
async def test_a_malformed_answer_is_refused(client: Client, answer: bytes, detail: str) -> None:
    """The session's code can replace what answers queries: the server checks the answer."""
    sid = "forged-answer"
    await execute(client, sid, FIND_RUNNER + f"runner.answer = lambda query, namespace: {answer!r}")
    reply = await post(client, "complete", sid, {"code": "abc"}, status=502)
    assert detail in reply["detail"], reply


async def test_an_answer_to_no_query_breaks_the_child(client: Client) -> None:
    """A frame the server did not ask for means the stream cannot be trusted: the child is
    killed, the execution fails, and the next one starts fresh."""
    sid = "unasked"
    frame = f"runner.send({protocol.T_ANSWER}, b'{{}}')\nprint('not reached?')"
    body = await execute(client, sid, FIND_RUNNER + frame)
    assert "an answer to no query" in (body["error"] or ""), body
    after = await execute(client, sid, "print('fresh')")
    assert after["restarted"] is True and after["output"] == "fresh\n"
