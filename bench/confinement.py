"""What the per-session filesystem costs a spawn: private temp dirs and quota on, then off.

Starts children one after another through the server's own code (Isolation, ChildProcess)
until each is READY, with the mount layer (a tmpfs per session, a mount namespace per
child) and without it (a plain directory, the host's temporary directories), while
`--live` other children are held (every child's mount namespace copies the mounts of the
live sessions, so the cost grows with them). Needs root with CAP_SYS_ADMIN.

    .venv/bin/python bench/confinement.py --spawns 40 --live 0,50
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time

from replserver.child import ChildProcess
from replserver.isolation import Isolation
from replserver.sessionfs import SessionFilesystems
from replserver.settings import Settings


def cpu_s() -> float:
    """CPU of this process and its reaped children (the fork and the preexec run in both)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


async def measure(
    settings: Settings, isolation: Isolation, layers: dict[str, SessionFilesystems], spawns: int
) -> dict[str, tuple[float, float]]:
    """Per layer: median wall time of a spawn to READY and mean CPU per spawn, in ms.
    Spawns alternate between the layers, so that the machine's load falls on both alike."""
    walls: dict[str, list[float]] = {name: [] for name in layers}
    cpu = dict.fromkeys(layers, 0.0)
    for _ in range(spawns):
        for name, layer in layers.items():
            isolation.fs = layer
            cpu0, start = cpu_s(), time.perf_counter()
            child = await ChildProcess.spawn(settings, isolation=isolation)
            walls[name].append(time.perf_counter() - start)
            cpu[name] += cpu_s() - cpu0
            await child.end(0)
    return {
        name: (statistics.median(walls[name]) * 1000, cpu[name] / spawns * 1000) for name in layers
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spawns", type=int, default=40)
    parser.add_argument("--live", default="0,50", help="live sessions held meanwhile")
    args = parser.parse_args()
    settings = Settings.from_env({}, pool_size=0)
    isolation = Isolation(settings)
    assert isolation.fs.private, "needs root with CAP_SYS_ADMIN"
    private = isolation.fs
    shared = SessionFilesystems(isolation.work_base, private=False, size_bytes=0)
    try:
        for live in (int(n) for n in args.live.split(",")):
            held = [await ChildProcess.spawn(settings, isolation=isolation) for _ in range(live)]
            layers = {"shared (off)": shared, "private+quota": private}
            await measure(settings, isolation, layers, 3)  # warm up
            results = await measure(settings, isolation, layers, args.spawns)
            for name, (wall, cpu) in results.items():
                print(f"live={live:3d} {name:14s} spawn p50 {wall:6.1f} ms  cpu {cpu:5.1f} ms")
            isolation.fs = private
            for child in held:
                await child.end(0)
    finally:
        isolation.fs = private
        await isolation.close()


if __name__ == "__main__":
    asyncio.run(main())
