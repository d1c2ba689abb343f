"""Session files through a real server: upload and download throughput, and what a reset
costs when the session has files (they are copied to the new process's directory).

Starts `python -m replserver` on a free port (quota 512 MiB per session) and reports the
median of `--rounds` rounds of each measurement.

    .venv/bin/python bench/files.py --size-mib 64 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import servers

MiB = 1024 * 1024


async def timed_reset(http: aiohttp.ClientSession, base: str, sid: str) -> float:
    start = time.perf_counter()
    async with http.post(f"{base}/reset/{sid}") as resp:
        assert resp.status == 200, await resp.text()
    return (time.perf_counter() - start) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = args.size_mib * MiB
    piece = os.urandom(MiB)
    replica = await servers.start(
        None, REPL_LIMIT_DISK_BYTES=str(512 * MiB), REPL_MAX_UPLOAD_BYTES=str(size)
    )
    up, down, reset_empty, reset_full = [], [], [], []
    try:
        await replica.wait_ready()
        base = replica.base
        async with aiohttp.ClientSession() as http:
            for n in range(args.rounds):
                sid = f"bench-{n}"
                async with http.post(f"{base}/execute/{sid}", json={"code": "1"}) as resp:
                    assert resp.status == 200
                reset_empty.append(await timed_reset(http, base, sid))

                async def body() -> AsyncIterator[bytes]:
                    for _ in range(size // MiB):
                        yield piece

                start = time.perf_counter()
                async with http.put(f"{base}/sessions/{sid}/files/big.bin", data=body()) as resp:
                    assert resp.status == 201, await resp.text()
                up.append(size / MiB / (time.perf_counter() - start))
                start = time.perf_counter()
                async with http.get(f"{base}/sessions/{sid}/files/big.bin") as resp:
                    async for _ in resp.content.iter_chunked(MiB):
                        pass
                down.append(size / MiB / (time.perf_counter() - start))
                reset_full.append(await timed_reset(http, base, sid))
                async with http.delete(f"{base}/sessions/{sid}") as resp:
                    assert resp.status == 200
    finally:
        await replica.stop()
    print(f"upload   {statistics.median(up):7.0f} MiB/s  ({args.size_mib} MiB, streamed)")
    print(f"download {statistics.median(down):7.0f} MiB/s")
    print(f"reset, no files         {statistics.median(reset_empty):7.1f} ms")
    print(f"reset, one {args.size_mib} MiB file {statistics.median(reset_full):7.1f} ms (copied)")


if __name__ == "__main__":
    asyncio.run(main())
