"""What the notebook features cost: completion latency, and a preloaded module per session.

Starts real `python -m replserver` processes on free loopback ports and measures:

  completion  the server's very first POST /complete (jedi's import, its parse of the
              builtins' stubs), then, once the shared jedi cache it starts is built (a
              root server), the first, second and later completions of brand-new
              sessions (p50 over --sessions sessions), and their RSS growth
  preload     per idle session (each one child): RSS and PSS from /proc/<pid>/smaps_rollup
              of the children, and the time of the first `import MODULE` inside a fresh
              session, without and with REPL_PRELOAD=MODULE

    .venv/bin/python bench/notebook.py                         # both, numpy for preload
    .venv/bin/python bench/notebook.py --module decimal --sessions 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.servers import Replica, start


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body) as resp:
        reply: dict[str, Any] = await resp.json()
        assert resp.status == 200, reply
        return reply


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


async def rss_mib(http: aiohttp.ClientSession, base: str, sid: str) -> float:
    async with http.get(f"{base}/sessions/{sid}") as resp:
        return float((await resp.json())["rssBytes"]) / 2**20


async def completion(base: str, work_dir: Path, sessions: int, later: int) -> dict[str, float]:
    first, second, rest, growth = [], [], [], []
    uncached = 0.0
    async with aiohttp.ClientSession() as http:
        for n in range(sessions + 1):
            if n == 1 and os.geteuid() == 0:
                # The server's first completion started building the shared jedi cache.
                # Another process's file: polled, there is no event to wait for.
                built = "replserver-*/runner/jedi-cache"
                async with asyncio.timeout(120):
                    while not list(work_dir.glob(built)):  # noqa: ASYNC110, ASYNC240
                        await asyncio.sleep(0.1)
            sid = uuid.uuid4().hex
            await post(http, f"{base}/execute/{sid}", {"code": "data = {'alpha': 1}\nx = 1"})
            before = await rss_mib(http, base, sid)
            times = []
            for code in ["pri", "data['al", *["x.re"] * later]:
                started = time.perf_counter()
                reply = await post(http, f"{base}/complete/{sid}", {"code": code})
                times.append(time.perf_counter() - started)
                assert reply["matches"], (code, reply)
            if n == 0:
                uncached = times[0]
                continue
            growth.append(await rss_mib(http, base, sid) - before)
            first.append(times[0])
            second.append(times[1])
            rest.extend(times[2:])
    return {
        "first_of_server_ms": round(uncached * 1000, 1),
        "first_ms": ms(first),
        "second_ms": ms(second),
        "later_ms": ms(rest),
        "rss_growth_mib": round(statistics.median(growth), 1),
    }


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields["Rss"], fields["Pss"]


async def preload(module: str, sessions: int, env: dict[str, str]) -> dict[str, float]:
    replica = await running(REPL_POOL_SIZE="1", **env)
    try:
        code = (
            "import time as _t\n_s = _t.perf_counter()\n"
            f"import {module}\nprint(_t.perf_counter() - _s)"
        )
        imports, sids = [], []
        async with aiohttp.ClientSession() as http:
            for _ in range(sessions):
                sid = uuid.uuid4().hex
                sids.append(sid)
                await post(http, f"{replica.base}/execute/{sid}", {"code": "1"})
            # Idle sessions first: what each costs before it imports anything.
            await asyncio.sleep(1.0)  # let the pool's refill settle before reading /proc
            pids = children_of(replica.proc.pid)
            rss, pss = zip(*(memory_kib(p) for p in pids), strict=True)
            for sid in sids:
                reply = await post(http, f"{replica.base}/execute/{sid}", {"code": code})
                imports.append(float(reply["output"]))
        return {
            "children": len(pids),
            "rss_mib": round(statistics.median(rss) / 1024, 1),
            "pss_mib": round(statistics.median(pss) / 1024, 1),
            "first_import_ms": ms(imports),
        }
    finally:
        await replica.stop()


async def running(**env: str) -> Replica:
    # Only REPL_* names reach start()'s **env, never its `port` or `log` parameters.
    replica = await start(**env)  # type: ignore[arg-type]
    try:
        await replica.wait_ready()
    except BaseException:
        await replica.kill()
        raise
    return replica


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="numpy")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--later", type=int, default=20)
    parser.add_argument("--skip", default="", help="comma-separated: completion,preload")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if "completion" not in args.skip:
        with tempfile.TemporaryDirectory() as work_dir:
            os.chmod(work_dir, 0o711)  # the children's uids must reach their directories
            replica = await running(REPL_WORK_DIR=work_dir)
            try:
                results["completion"] = await completion(
                    replica.base, Path(work_dir), args.sessions, args.later
                )
            finally:
                await replica.stop()
    if "preload" not in args.skip:
        results["without_preload"] = await preload(args.module, args.sessions, {})
        results["with_preload"] = await preload(
            args.module, args.sessions, {"REPL_PRELOAD": args.module}
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
