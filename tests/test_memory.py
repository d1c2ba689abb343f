"""The server's own memory stays bounded while it sends large /execute replies, and the
reply, written as the output arrives, is the same JSON as ever.

Measured on a real `python -m replserver` (tests/servers.py): the peak RSS of the server
process (VmHWM in /proc/<pid>/status), never of pytest, whose memory holds the replies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from . import servers
from .conftest import MakeClient

MiB = 1024 * 1024
REPLY_BYTES = 16 * MiB  # REPL_MAX_OUTPUT_BYTES's default: the largest reply there is
CONCURRENT = 4
BUDGET_BYTES = 200 * 1000 * 1000  # above the idle server; README's limits table has the figure
# 16 MiB in 1 KiB lines, written by user code as fast as it can.
BIG_OUTPUT = (
    "import sys\n"
    f"line = 'x' * 1023 + '\\n'\n"
    f"for _ in range({REPLY_BYTES // 1024}):\n"
    "    sys.stdout.write(line)\n"
)


def status_bytes(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[servers.Replica]:
    server = await servers.start(log=tmp_path / "server.log")
    try:
        await server.wait_ready()
        yield server
    finally:
        await server.kill()


async def big_reply(http: aiohttp.ClientSession, base: str, sid: str) -> None:
    async with http.post(f"{base}/execute/{sid}", json={"code": BIG_OUTPUT}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        reply = await resp.json()
    assert reply["error"] is None and reply["truncated"] is False, reply["error"]
    assert len(reply["output"]) == REPLY_BYTES
    assert reply["output"].count("\n") == REPLY_BYTES // 1024


@pytest.mark.timeout(180)
async def test_four_16_mib_replies_stay_within_budget(replica: servers.Replica) -> None:
    pid = replica.proc.pid
    sids = [f"big-{n}" for n in range(CONCURRENT)]
    timeout = aiohttp.ClientTimeout(total=150)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for sid in sids:  # the sessions exist and have run once: that is "idle"
            async with http.post(f"{replica.base}/execute/{sid}", json={"code": "1"}) as resp:
                assert resp.status == 200, await resp.text()
        idle = status_bytes(pid, "VmRSS")
        await asyncio.gather(*(big_reply(http, replica.base, sid) for sid in sids))
    peak = status_bytes(pid, "VmHWM")
    grown = peak - idle
    print(
        f"server idle RSS {idle / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, +{grown / MiB:.1f} MiB"
    )
    assert grown < BUDGET_BYTES, f"the server grew by {grown / MiB:.0f} MiB"


# --- the streamed reply is the JSON the reply always was --------------------------------------

TRICKY = (
    "import os, sys\n"
    "smile = '\\N{GRINNING FACE}'.encode()\n"
    "os.write(1, smile[:2]); os.write(1, smile[2:])\n"  # one character split across writes
    "os.write(1, b'bad \\xff\\xfe bytes, quote \" backslash \\\\ nul \\x00 esc \\x1b tab \\t\\n')\n"
    "os.write(2, 'caf\\N{LATIN SMALL LETTER E WITH ACUTE}\\n'.encode()[:4])\n"
    "os.write(2, 'caf\\N{LATIN SMALL LETTER E WITH ACUTE}\\n'.encode()[4:])\n"
    "print('\\u2028 and \\U0001d11e')\n"
    "'last'"
)


async def test_streamed_reply_is_the_same_json(make_client: MakeClient) -> None:
    """Byte for byte what json.dumps (and so the old json_response) writes for the reply."""
    client = await make_client()
    resp = await client.post("/execute/tricky", json={"code": TRICKY})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    body = await resp.read()
    reply = json.loads(body)
    assert body == json.dumps(reply).encode()
    assert resp.headers["Content-Length"] == str(len(body))  # small: sent whole, at the end
    assert resp.headers["X-Execution-Id"] == reply["executionId"]
    assert list(reply)[:4] == ["output", "error", "result", "displays"]
    assert reply["output"] == (
        '\N{GRINNING FACE}bad \ufffd\ufffd bytes, quote " backslash \\ nul \x00 esc \x1b tab \t\n'
        "\u2028 and \U0001d11e\n"
    )
    assert reply["error"] == "caf\N{LATIN SMALL LETTER E WITH ACUTE}\n"
    assert reply["result"] == "'last'" and reply["returnCode"] == 0


async def test_streamed_reply_null_error_and_server_notes(make_client: MakeClient) -> None:
    client = await make_client(max_output_bytes=1000)
    quiet = await client.post("/execute/notes", json={"code": "print('hi')"})
    body = await quiet.read()
    assert b'{"output": "hi\\n", "error": null, "result": null, "displays": [], ' in body
    flood = await client.post("/execute/notes", json={"code": "print('y' * 5000)"})
    body = await flood.read()
    reply = json.loads(body)
    assert body == json.dumps(reply).encode()
    assert reply["output"] == "y" * 1000 and reply["truncated"] is True
    assert reply["error"].startswith("[output truncated: more than 1000 bytes")


async def test_large_reply_is_streamed_and_the_same_json(make_client: MakeClient) -> None:
    """Past the first flush the body is chunked; characters split between pieces survive."""
    client = await make_client()
    code = (
        "import sys\nfor i in range(3000):\n    sys.stdout.write('\\u00e9\\U0001d11e' * 99 + '\\n')"
    )
    resp = await client.post("/execute/large", json={"code": code})
    assert resp.status == 200 and "Content-Length" not in resp.headers
    assert resp.headers["Transfer-Encoding"] == "chunked"
    body = await resp.read()
    reply = json.loads(body)
    assert body == json.dumps(reply).encode()
    assert reply["output"] == ("\u00e9\U0001d11e" * 99 + "\n") * 3000
    assert reply["error"] is None and reply["truncated"] is False


@pytest.mark.timeout(60)
async def test_client_leaving_mid_reply_is_no_error(replica: servers.Replica) -> None:
    """The client reads a little of a 16 MiB reply and goes: no error in the server's log,
    and the session's next request is answered."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{replica.base}/execute/leaver", json={"code": BIG_OUTPUT}) as resp:
            assert resp.status == 200
            assert (await resp.content.readexactly(12)) == b'{"output": "'
        # Leaving the block closed the connection with most of the reply unread.
        async with http.post(f"{replica.base}/execute/leaver", json={"code": "print(7)"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["output"] == "7\n"
    assert replica.log is not None
    log = replica.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log
