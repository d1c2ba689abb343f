"""Snapshot costs (issue 13): save and restore of a heavy namespace, and a shutdown that
saves every idle session.

  namespace  a 10 MB list (1.25 M ints), a dict of 100,000 items and 50 small functions in
             one session: save (child pickles, server seals and writes the directory
             store) and restore (read, check, child unpickles) times, snapshot size;
             in-process app, real children, median of --runs
  shutdown   --sessions idle sessions (a small namespace each) in a real `python -m
             replserver`; SIGTERM to exit, with snapshots on (each pickled at shutdown, or
             each already saved while idle) and off

    .venv/bin/python bench/snapshots.py --runs 5 --sessions 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from replserver.app import create_app
from replserver.routes import MANAGER
from replserver.settings import Settings

REPO = Path(__file__).resolve().parent.parent
HEAVY = "big = list(range(1_250_000))\ntable = {f'key{i}': i for i in range(100_000)}\n" + "".join(
    f"def f{i}(x):\n    return x + {i}\n" for i in range(50)
)
CHECK = "print(len(big), len(table), f49(1))"
SMALL = "data = list(range(1000))\nlabel = 'session'\ndef get():\n    return data[-1]\n"


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


async def namespace(runs: int) -> dict[str, Any]:
    saves, restores, sizes, roundtrips = [], [], [], []
    with tempfile.TemporaryDirectory() as store:
        settings = Settings.from_env({}, snapshot_store=store, timeout_s=120.0)
        app = create_app(settings)
        async with TestClient(TestServer(app)) as client:
            manager = app[MANAGER]
            snapshots = manager.snapshots
            assert snapshots is not None
            for run in range(runs):
                sid = f"heavy{run}"
                resp = await client.post(f"/execute/{sid}", json={"code": HEAVY})
                assert (await resp.json())["returnCode"] == 0
                session = manager.find(sid)
                assert session is not None
                started = time.perf_counter()
                assert await snapshots.save(session, "culled")
                saves.append(time.perf_counter() - started)
                sizes.append(len(await snapshots.store.get(sid) or b""))
                manager._drop(sid, "benchmark")  # ended without a save: the snapshot stays
                before = _restore_seconds(app)
                started = time.perf_counter()
                resp = await client.post(f"/execute/{sid}", json={"code": CHECK})
                body = await resp.json()
                roundtrips.append(time.perf_counter() - started)
                assert body["output"] == "1250000 100000 50\n", body
                assert body["restored"]["names"] == 52, body["restored"]
                restores.append(_restore_seconds(app) - before)
    return {
        "save_s": median(saves),
        "restore_s": median(restores),
        "first_request_s": median(roundtrips),
        "snapshot_mb": round(statistics.median(sizes) / 1e6, 2),
        "runs": runs,
    }


def _restore_seconds(app: Any) -> float:
    metrics = app[MANAGER].metrics
    value = metrics.registry.get_sample_value(
        "replserver_snapshot_seconds_sum", {"operation": "restore"}
    )
    return float(value or 0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def shutdown(sessions: int, store: str, idle_s: float = 0) -> dict[str, Any]:
    """Exit time of a server holding `sessions` idle ones; with `idle_s`, after every
    session was saved while idle (the shutdown then only relabels those snapshots)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPL_")}
    env.update(
        REPL_PORT=str(port),
        REPL_LOG_LEVEL="warning",
        REPL_MAX_SESSIONS=str(sessions * 2),
        REPL_SNAPSHOT_STORE=store,
        REPL_SHUTDOWN_GRACE_S="1",
        REPL_SNAPSHOT_IDLE_S=str(idle_s),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replserver", cwd=REPO, env=env, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(30):
                while True:
                    try:
                        async with http.get(f"{base}/health") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
            gate = asyncio.Semaphore(8)

            async def one(n: int) -> None:
                async with gate, http.post(f"{base}/execute/idle{n}", json={"code": SMALL}) as r:
                    assert r.status == 200

            await asyncio.gather(*(one(n) for n in range(sessions)))
        for _ in range(3000 if idle_s else 0):  # until each is saved (and the key file)
            if len(os.listdir(store)) >= sessions + 1:
                break
            await asyncio.sleep(0.1)
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 300)
        elapsed = time.perf_counter() - started
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    saved = len(os.listdir(store)) - 1 if store != "off" else 0  # less the key file
    return {"exit": code, "seconds": round(elapsed, 2), "saved": saved}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, Python {sys.version.split()[0]}, load {os.getloadavg()}")
    print("namespace:", await namespace(args.runs))
    n = args.sessions
    with tempfile.TemporaryDirectory() as store:
        print(f"shutdown, {n} idle sessions, each pickled then:", await shutdown(n, store))
    with tempfile.TemporaryDirectory() as store:
        saved = await shutdown(n, store, idle_s=0.5)
    print(f"shutdown, {n} idle sessions, all saved while idle:", saved)
    print(f"shutdown, {n} idle sessions, snapshots off:", await shutdown(n, "off"))


if __name__ == "__main__":
    asyncio.run(main())
