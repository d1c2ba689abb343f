"""Side-by-side benchmark: replserver ("ours") against the old FastAPI backend ("old").

Both servers are started on free 127.0.0.1 ports in the same run, and each scenario runs
against ours, then against the old one. The workloads of issue 11 (the default set, `issue`):

  warm         one session, 500 sequential `x = x + 1`: p50/p99 round trip
  arrivals     40 new sessions arriving one every 50 ms, each `print(1)`: p50/p99 of that
               first request
  burst        50 new sessions at once, each `print(1)`: time until all have answered
  lag          /execute-stream of `print(time.time(), flush=True)` 20 times 50 ms apart
               (x3): arrival minus printed time, p50/p99
  throughput   `for i in range(150000): print('x' * 99)` (15 MB in 100-byte lines) through
               /execute and through /execute-stream: MB/s
  concurrency  16 sessions each running `sum(range(20000))` 30 times, all at once: exec/s
  memory       50 idle sessions after `import json; a = list(range(1000))`: RSS and PSS per
               session, from /proc/<pid>/smaps_rollup of their children

and a summary of the issue's targets, met or not. The first round's scenarios stay
available (`all` runs them too): first, throughput_1k, concurrent, memory_tree, scale; and

  neighbours   one session's `x = x + 1` loop while 30 new sessions arrive 100 ms apart:
               p50/p99/p99.9 of the loop, and how many of its requests took over 5 ms
               (what starting children costs the sessions already running)

Output is verified (wrong output fails the scenario loudly, or counts as an error in
`scale`). Tables per scenario go to stdout, a markdown summary at the end, everything
to a JSON file. Both servers are stopped (process groups) on exit, error or Ctrl-C.

    .venv/bin/python bench/bench.py                       # the issue's workloads, both servers
    .venv/bin/python bench/bench.py --runs 3              # medians of 3 runs
    .venv/bin/python bench/bench.py --scenarios all       # and the first round's scenarios
    .venv/bin/python bench/bench.py --scenarios warm,lag --out /tmp/r.json
    .venv/bin/python bench/bench.py --only old            # just the old backend
    .venv/bin/python bench/bench.py --env REPL_LOG_LEVEL=warning   # extra env for ours
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
# The old backend sits in `shared/peers/` next to the main checkout (../shared) or next to
# the folder of worktrees (../../shared).
SEED_RUN = str(
    next(
        (
            path
            for base in (REPO.parent, REPO.parent.parent)
            if (path := base / "shared" / "peers" / "seed_reference" / "run.sh").exists()
        ),
        REPO.parent / "shared" / "peers" / "seed_reference" / "run.sh",
    )
)
SEED_VENV = os.environ.get("SEED_VENV", "/tmp/seed-reference-venv")
HOST = "127.0.0.1"
# Raised caps: 1,000 sessions for the scale run, 20 MB of output for the throughput run.
OURS_ENV = {"REPL_MAX_SESSIONS": "2000", "REPL_MAX_OUTPUT_BYTES": str(64 * 1024 * 1024)}
NAMES = ("ours", "old")

# scenario -> metric -> (unit, which direction is better)
METRICS: dict[str, dict[str, tuple[str, str]]] = {
    # The workloads of issue 11.
    "warm": {"p50": ("ms", "lower"), "p99": ("ms", "lower")},
    "arrivals": {"p50": ("ms", "lower"), "p99": ("ms", "lower")},
    "burst": {"all_answered": ("ms", "lower"), "p50": ("ms", "lower")},
    "lag": {"p50": ("ms", "lower"), "p99": ("ms", "lower"), "max": ("ms", "lower")},
    "throughput": {"execute": ("MB/s", "higher"), "stream": ("MB/s", "higher")},
    "concurrency": {"rate": ("exec/s", "higher")},
    "memory": {
        "rss_per_session": ("MB", "lower"),
        "pss_per_session": ("MB", "lower"),
        "server_rss_per_session": ("MB", "lower"),
    },
    "neighbours": {
        "p50": ("ms", "lower"),
        "p99": ("ms", "lower"),
        "p999": ("ms", "lower"),
        "over_5ms": ("count", "lower"),
    },
    # The first round's scenarios.
    "first": {
        "p50": ("ms", "lower"),
        "p99": ("ms", "lower"),
        "warm_after_pause_p50": ("ms", "lower"),
        "first_over_warm_after_pause": ("x", "lower"),
    },
    "throughput_1k": {"execute": ("MB/s", "higher"), "stream": ("MB/s", "higher")},
    "concurrent": {"rate": ("exec/s", "higher")},
    "memory_tree": {"rss_per_session": ("KiB", "lower"), "pss_per_session": ("KiB", "lower")},
    "scale": {
        "idle_errors": ("count", "lower"),
        "idle_wall": ("s", "lower"),
        "idle_rss_total": ("MiB", "lower"),
        "idle_pss_total": ("MiB", "lower"),
        "stream_errors": ("count", "lower"),
        "stream_wall": ("s", "lower"),
    },
}
ISSUE_SCENARIOS = ("warm", "arrivals", "burst", "lag", "throughput", "concurrency", "memory")


@dataclass(frozen=True)
class Goal:
    """A target of issue 11: a ratio ours/old, or an absolute bound on ours."""

    label: str
    scenario: str
    metric: str
    op: str  # "<=" or ">="
    limit: float
    absolute: bool = False  # compare ours itself, not ours/old

    def describe(self) -> str:
        unit = METRICS[self.scenario][self.metric][0]
        return (
            f"{self.op} {fmt(self.limit)} {unit}" if self.absolute else f"{self.op} {self.limit}x"
        )


GOALS = (
    Goal("warm p50", "warm", "p50", "<=", 1.0),
    Goal("warm p99", "warm", "p99", "<=", 1.5),
    Goal("new sessions one by one p50", "arrivals", "p50", "<=", 1.5),
    Goal("new sessions one by one p99", "arrivals", "p99", "<=", 2.0),
    Goal("burst of 50: all answered", "burst", "all_answered", "<=", 5.0),
    Goal("100-byte lines via /execute", "throughput", "execute", ">=", 1.5),
    Goal("100-byte lines via stream", "throughput", "stream", ">=", 3.0),
    Goal("concurrency", "concurrency", "rate", ">=", 1.5),
    Goal("stream lag p99", "lag", "p99", "<=", 2.0, absolute=True),
    Goal("RSS per idle session", "memory", "rss_per_session", "<=", 10.0, absolute=True),
    Goal("PSS per idle session", "memory", "pss_per_session", "<=", 4.0, absolute=True),
)

# Upper bound on each scenario's wall time per server (the issue's set takes ~1 min).
SCENARIO_TIMEOUT_S = {"first": 120.0, "memory": 90.0, "memory_tree": 90.0, "scale": 200.0}
DEFAULT_TIMEOUT_S = 60.0


class BenchError(Exception):
    """A scenario's output or status was not what the contract promises."""


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, session id, start time) for every visible process."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()  # comm may contain spaces and ')'
        table[int(entry.name)] = (int(rest[1]), int(rest[3]), int(rest[19]))
    return table


def process_tree(root: int) -> dict[int, int]:
    """The root, its descendants and members of its session: pid -> start time."""
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo and len(found) < 100_000:
        pid = todo.pop()
        if pid in found or pid not in table:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    found.update(pid for pid, (_, sid, _) in table.items() if sid == root)
    return {pid: table[pid][2] for pid in found}


def _kib_field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(root: int) -> tuple[float, float, int]:
    """(RSS MiB, PSS MiB, process count) summed over the server's process tree."""
    pids = process_tree(root)
    rss = sum(_kib_field(Path(f"/proc/{p}/status"), "VmRSS:") for p in pids)
    pss = sum(_kib_field(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in pids)
    return rss / 1024, pss / 1024, len(pids)


def mem_available_mib() -> float:
    return _kib_field(Path("/proc/meminfo"), "MemAvailable:") / 1024


@dataclass
class Server:
    name: str
    cmd: list[str]
    cwd: Path
    env: dict[str, str]
    log: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start on a fresh free port; `{port}` in cmd is replaced by it."""
        self.port = free_port()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [c.replace("{port}", str(self.port)) for c in self.cmd],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 8 s, then any straggler of its tree."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        tree = process_tree(proc.pid) if proc.poll() is None else {}
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        time.sleep(0.2)
        now = proc_table()
        for pid, start in tree.items():  # children that left the group, same pid + start time
            if pid in now and now[pid][2] == start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    async def wait_healthy(self, client: aiohttp.ClientSession, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} server exited at startup:\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with client.get(
                    f"{self.base}/health", timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    if resp.status == 200 and (await resp.json()).get("status") == "ok":
                        return
            await asyncio.sleep(0.2)
        raise BenchError(
            f"{self.name}: no healthy GET /health in {timeout_s:.0f} s\n{self.log_tail()}"
        )


# ---------------------------------------------------------------- HTTP helpers


@dataclass
class Target:
    name: str
    server: Server
    client: aiohttp.ClientSession

    def url(self, route: str, sid: str) -> str:
        return f"{self.server.base}/{route}/{sid}"


def new_sid() -> str:
    return str(uuid.uuid4())


async def execute(t: Target, sid: str, code: str) -> dict[str, Any]:
    """POST /execute; raises BenchError unless 200 with a JSON object."""
    async with t.client.post(t.url("execute", sid), json={"code": code}) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise BenchError(f"/execute -> {resp.status}: {body[:300]!r}")
    data = json.loads(body)
    if not isinstance(data, dict):
        raise BenchError(f"/execute returned {type(data).__name__}, not an object")
    return data


async def expect_output(t: Target, sid: str, code: str, expected: str) -> None:
    data = await execute(t, sid, code)
    if data.get("output") != expected or data.get("error"):
        raise BenchError(
            f"{code!r}: expected output {expected!r}, got {str(data.get('output'))[:200]!r}, "
            f"error {str(data.get('error'))[:300]!r}"
        )


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, dict[str, Any]]]:
    """Parse `data: <json>` events as bytes arrive; yields (arrival time.time(), event).

    Lines other than `data:` (`id:`, `event:`, `: ping`) are skipped, so both stream
    framings parse: the old backend's (data lines only) and protocol 2's (with ids)."""
    buf = bytearray()
    scan = 0
    data: list[bytes] = []
    async for chunk in resp.content.iter_any():
        now = time.time()
        buf += chunk
        start = 0
        while (nl := buf.find(b"\n", scan)) >= 0:
            line = bytes(buf[start:nl]).rstrip(b"\r")
            start = scan = nl + 1
            if not line:
                if data:
                    yield now, json.loads(b"\n".join(data))
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
        del buf[:start]
        scan = len(buf)
    if data:
        yield time.time(), json.loads(b"\n".join(data))


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """The `data:` events of a whole SSE body (either framing: with or without `id:`)."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [
            line[6:] if line.startswith(b"data: ") else line[5:]
            for line in block.split(b"\n")
            if line.startswith(b"data:")
        ]
        if data:
            events.append(json.loads(b"\n".join(data)))
    return events


async def post_raw(t: Target, route: str, sid: str, code: str) -> bytes:
    """The whole body of a 200 answer to POST /{route}/{sid}, read as it arrives."""
    async with t.client.post(t.url(route, sid), json={"code": code}) as resp:
        if resp.status != 200:
            raise BenchError(f"/{route} -> {resp.status}: {(await resp.read())[:300]!r}")
        chunks = [chunk async for chunk in resp.content.iter_any()]
    return b"".join(chunks)


async def stream(t: Target, sid: str, code: str) -> list[tuple[float, dict[str, Any]]]:
    async with t.client.post(t.url("execute-stream", sid), json={"code": code}) as resp:
        if resp.status != 200:
            raise BenchError(f"/execute-stream -> {resp.status}: {(await resp.read())[:300]!r}")
        return [ev async for ev in sse_events(resp)]


def check_stream(events: list[tuple[float, dict[str, Any]]], expected: str | None) -> str:
    """Stdout of a stream; BenchError unless it ends with one `complete` (returnCode 0)."""
    kinds = [ev.get("type") for _, ev in events]
    if kinds.count("complete") != 1 or kinds[-1] != "complete":
        raise BenchError(f"stream must end with exactly one complete event, got {kinds[-5:]}")
    if events[-1][1].get("returnCode") != 0:
        raise BenchError(
            f"stream failed: {events[-1][1]} {[e for _, e in events if e.get('type') == 'error']}"
        )
    out = "".join(str(ev.get("content", "")) for _, ev in events if ev.get("type") == "output")
    if expected is not None and out != expected:
        raise BenchError(
            f"stream output {out[:120]!r}... ({len(out)} chars) != expected {expected[:120]!r}"
        )
    return out


async def forget(t: Target, sids: Iterable[str]) -> None:
    """Best effort: DELETE /sessions/{id} (may not exist: 404/405 and errors ignored)."""
    sem = asyncio.Semaphore(32)

    async def one(sid: str) -> None:
        async with sem:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with t.client.delete(
                    f"{t.server.base}/sessions/{sid}", timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    await resp.read()

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(one(s) for s in sids)), timeout=30)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


# ---------------------------------------------------------------- scenarios

Metrics = dict[str, float]


async def sc_warm(t: Target) -> Metrics:
    sid = new_sid()
    await expect_output(t, sid, "x = 0", "")
    times = []
    for _ in range(500):
        t0 = time.perf_counter()
        data = await execute(t, sid, "x = x + 1")
        times.append((time.perf_counter() - t0) * 1000)
        if data.get("error"):
            raise BenchError(f"x = x + 1 failed: {data.get('error')!r}")
    await expect_output(t, sid, "print(x)", "500\n")
    await forget(t, [sid])
    return {"p50": pct(times, 50), "p99": pct(times, 99)}


async def sc_first(t: Target) -> Metrics:
    sids = [new_sid() for _ in range(50)]
    times = []
    # The control: the same request in one existing session after the same pause. A
    # request after 0.2 s of idleness pays for waking an idle machine (CPU and scheduler
    # wake-ups), whatever the server does; comparing with it isolates the cost of the
    # new session itself.
    control_sid = new_sid()
    await execute(t, control_sid, "print(1)")
    control = []
    for sid in sids:
        await asyncio.sleep(0.2)  # lets a warm pool refill
        t0 = time.perf_counter()
        data = await execute(t, sid, "print(1)")
        times.append((time.perf_counter() - t0) * 1000)
        if data.get("output") != "1\n":
            raise BenchError(f"print(1) in a new session returned {data}")
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        await execute(t, control_sid, "print(1)")
        control.append((time.perf_counter() - t0) * 1000)
    sids.append(control_sid)
    for sid in sids:
        async with t.client.post(t.url("reset", sid)) as resp:
            await resp.read()
            if resp.status != 200:
                raise BenchError(f"/reset -> {resp.status}")
    await forget(t, sids)
    return {
        "p50": pct(times, 50),
        "p99": pct(times, 99),
        "warm_after_pause_p50": pct(control, 50),
        "first_over_warm_after_pause": pct(times, 50) / pct(control, 50),
    }


async def timed_first(t: Target, sid: str) -> float:
    """Milliseconds of a `print(1)` in session `sid`, checked."""
    t0 = time.perf_counter()
    await expect_output(t, sid, "print(1)", "1\n")
    return (time.perf_counter() - t0) * 1000


async def quiet(seconds: float = 1.0) -> None:
    """Let the server finish background work of the last scenario (endings, refills)."""
    await asyncio.sleep(seconds)


async def sc_arrivals(t: Target) -> Metrics:
    """40 new sessions, one arriving every 50 ms whether or not the last has answered."""
    await quiet()
    sids = [new_sid() for _ in range(40)]
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def arrive(i: int, sid: str) -> float:
        await asyncio.sleep(max(0.0, start + i * 0.05 - loop.time()))
        return await timed_first(t, sid)

    times = await asyncio.gather(*(arrive(i, sid) for i, sid in enumerate(sids)))
    await forget(t, sids)
    return {"p50": pct(times, 50), "p99": pct(times, 99)}


async def sc_burst(t: Target) -> Metrics:
    """50 new sessions at once: wall time until the last has answered."""
    await quiet()
    sids = [new_sid() for _ in range(50)]
    t0 = time.perf_counter()
    times = await asyncio.gather(*(timed_first(t, sid) for sid in sids))
    wall = (time.perf_counter() - t0) * 1000
    await forget(t, sids)
    return {"all_answered": wall, "p50": pct(times, 50)}


# The issue's loop; `import time` first, since the old backend's namespaces start empty.
LAG_CODE = "import time\nfor i in range(20): print(time.time(), flush=True); time.sleep(0.05)"


async def sc_lag(t: Target) -> Metrics:
    sid = new_sid()
    lags: list[float] = []
    for _ in range(3):
        events = await stream(t, sid, LAG_CODE)
        check_stream(events, None)
        pending, lines = "", 0
        for arrived, ev in events:
            if ev.get("type") != "output":
                continue
            pending += str(ev.get("content", ""))
            *complete, pending = pending.split("\n")
            for line in complete:
                lags.append((arrived - float(line)) * 1000)
                lines += 1
        if lines != 20 or pending:
            raise BenchError(f"expected 20 lines of time stamps, got {lines} (+{pending!r})")
    await forget(t, [sid])
    return {"p50": pct(lags, 50), "p99": pct(lags, 99), "max": max(lags)}


BIG_CODE = (
    "import sys\nchunk = 'x' * 1023 + '\\n'\nfor _ in range(20480):\n    sys.stdout.write(chunk)"
)
BIG_EXPECTED = ("x" * 1023 + "\n") * 20480
LINES_CODE = "for i in range(150000): print('x' * 99)"
LINES_EXPECTED = ("x" * 99 + "\n") * 150000


async def sc_throughput_1k(t: Target) -> Metrics:
    return await through(t, BIG_CODE, BIG_EXPECTED)


async def sc_throughput(t: Target) -> Metrics:
    return await through(t, LINES_CODE, LINES_EXPECTED)


async def through(t: Target, code: str, expected: str) -> Metrics:
    """MB/s of `code`'s output via /execute, then via /execute-stream, output checked."""
    sid = new_sid()
    await expect_output(t, sid, "x = 1", "")  # session start-up is not part of this
    # Timed until the last byte has arrived; decoding it is the client's work, not timed.
    t0 = time.perf_counter()
    body = await post_raw(t, "execute", sid, code)
    exec_s = time.perf_counter() - t0
    data = json.loads(body)
    out = data.get("output")
    if not isinstance(out, str) or len(out) != len(expected) or out != expected:
        n = len(out) if isinstance(out, str) else None
        raise BenchError(
            f"/execute: {n} chars of output (want {len(expected)}), "
            f"truncated={data.get('truncated')}, error={str(data.get('error'))[:200]!r}"
        )
    t0 = time.perf_counter()
    raw = await post_raw(t, "execute-stream", sid, code)
    stream_s = time.perf_counter() - t0
    events = [(0.0, ev) for ev in parse_sse(raw)]
    check_stream(events, expected)
    await forget(t, [sid])
    size_mb = len(expected) / 1e6
    return {"execute": size_mb / exec_s, "stream": size_mb / stream_s}


async def sc_neighbours(t: Target) -> Metrics:
    """A warm session's `x = x + 1` loop while 30 new sessions arrive 100 ms apart, each
    `print(1)`: what new sessions (the server starting children) cost the running ones."""
    await quiet()
    probe = new_sid()
    await expect_output(t, probe, "x = 0", "")
    times: list[float] = []
    done = False

    async def loop() -> None:
        while not done:
            t0 = time.perf_counter()
            data = await execute(t, probe, "x = x + 1")
            times.append((time.perf_counter() - t0) * 1000)
            if data.get("error"):
                raise BenchError(f"x = x + 1 failed: {data.get('error')!r}")

    sids = [new_sid() for _ in range(30)]
    running = asyncio.ensure_future(loop())
    try:
        for sid in sids:
            await asyncio.sleep(0.1)
            await expect_output(t, sid, "print(1)", "1\n")
    finally:
        done = True
        await running
    await forget(t, [probe, *sids])
    return {
        "p50": pct(times, 50),
        "p99": pct(times, 99),
        "p999": pct(times, 99.9),
        "over_5ms": float(sum(1 for x in times if x > 5)),
    }


async def sc_concurrent(t: Target) -> Metrics:
    sids = [new_sid() for _ in range(16)]
    await asyncio.gather(*(expect_output(t, s, "x = 1", "") for s in sids))  # untimed warm-up

    async def worker(sid: str) -> None:
        for _ in range(30):
            await expect_output(t, sid, "print(sum(range(20000)))", "199990000\n")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in sids))
    wall = time.perf_counter() - t0
    await forget(t, sids)
    return {"rate": 16 * 30 / wall}


async def sc_concurrency(t: Target) -> Metrics:
    """16 sessions, each running `sum(range(20000))` 30 times in sequence, all at once."""
    sids = [new_sid() for _ in range(16)]
    await asyncio.gather(*(expect_output(t, s, "x = 1", "") for s in sids))  # untimed warm-up

    async def worker(sid: str) -> None:
        for _ in range(30):
            data = await execute(t, sid, "sum(range(20000))")
            if data.get("error"):
                raise BenchError(f"sum(range(20000)) failed: {str(data.get('error'))[:300]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in sids))
    wall = time.perf_counter() - t0
    await forget(t, sids)
    return {"rate": 16 * 30 / wall}


async def settle(root: int, max_s: float = 5.0) -> tuple[float, float, int]:
    """Memory once the process count stopped changing (a pool may be refilling)."""
    last, same = tree_memory(root), 0
    deadline = time.monotonic() + max_s
    while same < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        cur = tree_memory(root)
        same = same + 1 if cur[2] == last[2] else 0
        last = cur
    return last


async def sc_memory_tree(t: Target) -> Metrics:
    before = await settle(t.server.pid)
    sids = [new_sid() for _ in range(50)]
    for sid in sids:
        await expect_output(t, sid, "x = 1", "")
    after = await settle(t.server.pid)
    await forget(t, sids)
    print(
        f"    {t.name}: {before[2]} -> {after[2]} processes, "
        f"RSS {before[0]:.1f} -> {after[0]:.1f} MiB, PSS {before[1]:.1f} -> {after[1]:.1f} MiB"
    )
    return {
        "rss_per_session": (after[0] - before[0]) * 1024 / 50,
        "pss_per_session": (after[1] - before[1]) * 1024 / 50,
    }


MEMORY_CODE = "import json; a = list(range(1000))"


def rollup(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of one process in KiB, from /proc/<pid>/smaps_rollup."""
    path = Path(f"/proc/{pid}/smaps_rollup")
    return _kib_field(path, "Rss:"), _kib_field(path, "Pss:")


async def sc_memory(t: Target) -> Metrics:
    """RSS and PSS of the children of 50 idle sessions (the old backend has none: its
    per-session figure is its own growth), and the server's own growth per session."""
    await quiet()
    server = t.server.pid
    before = rollup(server)
    sids = [new_sid() for _ in range(50)]
    pids = []
    for sid in sids:
        await expect_output(t, sid, MEMORY_CODE, "")
        # Binds no name: the namespace stays the workload's.
        data = await execute(t, sid, "print(__import__('os').getpid())")
        pids.append(int(str(data.get("output", "0")).strip() or 0))
    await settle(server)
    after = rollup(server)
    tree = process_tree(server)
    children = [pid for pid in pids if pid != server]
    stray = [pid for pid in children if pid not in tree]
    if stray:  # a pid namespace (bubblewrap) hides the real pids
        raise BenchError(f"session pids {stray[:3]} are not in the server's process tree")
    if len(set(children)) not in (0, 50):
        raise BenchError(f"50 sessions report {len(set(children))} distinct processes")
    server_rss = (after[0] - before[0]) / 50
    if children:
        mem = [rollup(pid) for pid in children]
        rss = sum(r for r, _ in mem) / 50
        pss = sum(p for _, p in mem) / 50
    else:
        rss, pss = server_rss, (after[1] - before[1]) / 50
    await forget(t, sids)
    print(
        f"    {t.name}: {len(set(children))} session processes; per session RSS "
        f"{rss / 1024:.2f} MiB, PSS {pss / 1024:.2f} MiB; server grew {server_rss:.0f} KiB each"
    )
    kb_to_mb = 1024 / 1e6
    return {
        "rss_per_session": rss * kb_to_mb,
        "pss_per_session": pss * kb_to_mb,
        "server_rss_per_session": server_rss * kb_to_mb,
    }


STREAM5 = "import time\nfor i in range(5):\n    print({tag!r}, i, flush=True)\n    time.sleep(0.02)"


async def sc_scale(t: Target) -> Metrics:
    """Errors are counted, not raised: the old backend is expected to mix streams up."""
    sids = [new_sid() for _ in range(1000)]
    sem = asyncio.Semaphore(32)
    deadline = time.monotonic() + 120
    idle_errors, first_error = 0, ""

    async def idle(sid: str) -> bool:
        nonlocal idle_errors, first_error
        async with sem:
            try:
                if time.monotonic() > deadline or mem_available_mib() < 512:
                    raise BenchError("skipped: deadline passed or MemAvailable < 512 MiB")
                await expect_output(t, sid, "x = 1", "")
                return True
            except Exception as e:  # noqa: BLE001 -- counted: scale never fails the run
                idle_errors += 1
                first_error = first_error or f"{type(e).__name__}: {e}"
                return False

    t0 = time.perf_counter()
    ok = await asyncio.gather(*(idle(s) for s in sids))
    idle_wall = time.perf_counter() - t0
    rss, pss, nproc = tree_memory(t.server.pid)
    live = [s for s, good in zip(sids, ok, strict=True) if good][:200]
    live += [new_sid() for _ in range(200 - len(live))]

    async def streamer(sid: str) -> str:
        tag = f"sid={sid}"
        try:
            events = await stream(t, sid, STREAM5.format(tag=tag))
            check_stream(events, "".join(f"{tag} {i}\n" for i in range(5)))
            return ""
        except Exception as e:  # noqa: BLE001 -- counted: scale never fails the run
            return f"{type(e).__name__}: {e}"

    t0 = time.perf_counter()
    results = await asyncio.gather(*(streamer(s) for s in live))
    stream_wall = time.perf_counter() - t0
    stream_errors = [r for r in results if r]
    await forget(t, sids)
    print(
        f"    {t.name}: {1000 - idle_errors}/1000 idle sessions ok ({nproc} processes), "
        f"{200 - len(stream_errors)}/200 streams ok"
    )
    for what, msg in (("idle", first_error), ("stream", stream_errors[0] if stream_errors else "")):
        if msg:
            print(f"    {t.name}: first {what} error: {msg[:300]}")
    return {
        "idle_errors": idle_errors,
        "idle_wall": idle_wall,
        "idle_rss_total": rss,
        "idle_pss_total": pss,
        "stream_errors": len(stream_errors),
        "stream_wall": stream_wall,
    }


SCENARIOS: dict[str, Callable[[Target], Awaitable[Metrics]]] = {
    "warm": sc_warm,
    "arrivals": sc_arrivals,
    "burst": sc_burst,
    "lag": sc_lag,
    "throughput": sc_throughput,
    "concurrency": sc_concurrency,
    "memory": sc_memory,
    "neighbours": sc_neighbours,
    "first": sc_first,
    "throughput_1k": sc_throughput_1k,
    "concurrent": sc_concurrent,
    "memory_tree": sc_memory_tree,
    "scale": sc_scale,
}


# ---------------------------------------------------------------- reporting


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    a = abs(v)
    return (
        f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3f}"
    )


def ratio(ours: float | None, old: float | None) -> str:
    if ours is None or old is None:
        return "-"
    if old == 0:
        return "1.00x" if ours == 0 else "inf"
    r = ours / old
    return ">1000x" if r > 1000 else "<0.001x" if 0 < r < 0.001 else f"{r:.2f}x"


Side = dict[str, Any]  # {"metrics": {...}} or {"error": "..."}


def rows(scenario: str, sides: dict[str, Side]) -> list[tuple[str, str, str, str, str, str]]:
    out = []
    for metric, (unit, better) in METRICS[scenario].items():
        vals = [sides.get(n, {}).get("metrics", {}).get(metric) for n in NAMES]
        cells = [
            "FAIL" if "error" in sides.get(n, {}) else fmt(v)
            for n, v in zip(NAMES, vals, strict=True)
        ]
        out.append(
            (
                scenario,
                f"{metric} ({unit})",
                cells[0],
                cells[1],
                ratio(vals[0], vals[1]),
                f"{better} is better",
            )
        )
    return out


def print_table(scenario: str, sides: dict[str, Side]) -> None:
    head = ("metric", "ours", "old", "ours/old", "")
    body = [r[1:] for r in rows(scenario, sides)]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(5)]
    print(f"  [{scenario}]")
    for r in [head, *body]:
        print("    " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    for name, side in sides.items():
        if "error" in side:
            print(f"    !!! {name} FAILED: {side['error']}")


def medians(
    runs: list[dict[str, dict[str, Side]]], scenarios: list[str], names: list[str]
) -> dict[str, dict[str, Side]]:
    result: dict[str, dict[str, Side]] = {}
    for sc in scenarios:
        result[sc] = {}
        for name in names:
            ok = [r[sc][name]["metrics"] for r in runs if "metrics" in r.get(sc, {}).get(name, {})]
            if ok:
                result[sc][name] = {
                    "metrics": {m: statistics.median(x[m] for x in ok) for m in METRICS[sc]},
                    "runs_ok": len(ok),
                }
            else:
                errors = [r[sc][name].get("error") for r in runs if name in r.get(sc, {})]
                result[sc][name] = {"error": errors[0] if errors else "not run"}
    return result


def markdown(summary: dict[str, dict[str, Side]], n_runs: int) -> str:
    lines = [
        (
            f"Median of {n_runs} run(s), load average {os.getloadavg()[1]:.1f} (5 min). "
            "Ratio = ours/old; time, memory and error counts: lower is better; "
            "MB/s and exec/s: higher is better."
        ),
        "",
        "| scenario | metric | ours | old | ours/old | better |",
        "|---|---|---:|---:|---:|---|",
    ]
    for sc, sides in summary.items():
        lines += ["| " + " | ".join(r) + " |" for r in rows(sc, sides)]
    return "\n".join(lines)


def goal_rows(summary: dict[str, dict[str, Side]]) -> list[tuple[str, ...]]:
    """One row per target of issue 11 whose scenario ran: figures, ratio, met or not."""
    out: list[tuple[str, ...]] = []
    for goal in GOALS:
        if goal.scenario not in summary:
            continue
        sides = summary[goal.scenario]
        ours, old = (sides.get(n, {}).get("metrics", {}).get(goal.metric) for n in NAMES)
        unit = METRICS[goal.scenario][goal.metric][0]
        value = ours if goal.absolute else (None if ours is None or not old else ours / old)
        if value is None:
            met = "not measured"
        elif goal.op == "<=":
            met = "met" if value <= goal.limit else "not met"
        else:
            met = "met" if value >= goal.limit else "not met"
        out.append(
            (
                goal.label,
                f"{fmt(ours)} {unit}" if ours is not None else "FAIL",
                f"{fmt(old)} {unit}" if old is not None else "FAIL",
                ratio(ours, old),
                goal.describe(),
                met,
            )
        )
    return out


def goals_markdown(summary: dict[str, dict[str, Side]]) -> str:
    body = goal_rows(summary)
    if not body:
        return ""
    lines = [
        "| target of issue 11 | ours | old | ours/old | target | met? |",
        "|---|---:|---:|---:|---|---|",
    ]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


# ---------------------------------------------------------------- main


async def one_run(
    servers: list[Server], client: aiohttp.ClientSession, scenarios: list[str]
) -> dict[str, dict[str, Side]]:
    for s in servers:
        s.start()
    await asyncio.gather(
        *(s.wait_healthy(client, 60 if s.name == "ours" else 300) for s in servers)
    )
    print("  servers up: " + ", ".join(f"{s.name} pid {s.pid} on :{s.port}" for s in servers))
    result: dict[str, dict[str, Side]] = {}
    for sc in scenarios:
        result[sc] = {}
        for s in servers:
            t = Target(s.name, s, client)
            t0 = time.perf_counter()
            try:
                if not s.alive():
                    raise BenchError(f"server exited earlier:\n{s.log_tail()}")
                metrics = await asyncio.wait_for(
                    SCENARIOS[sc](t), SCENARIO_TIMEOUT_S.get(sc, DEFAULT_TIMEOUT_S)
                )
                result[sc][s.name] = {"metrics": metrics, "seconds": time.perf_counter() - t0}
            except Exception as e:  # noqa: BLE001 -- recorded and reported; the others still run
                msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                result[sc][s.name] = {"error": msg, "seconds": time.perf_counter() - t0}
        print_table(sc, result[sc])
    for s in servers:
        s.stop()
    return result


async def amain(args: argparse.Namespace, servers: list[Server]) -> dict[str, Any]:
    scenarios: list[str] = args.scenarios
    runs: list[dict[str, dict[str, Side]]] = []
    loads: list[tuple[float, float, float]] = []
    conn = aiohttp.TCPConnector(limit=300, limit_per_host=300, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=150, sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as client:
        for i in range(args.runs):
            # Other work on the machine moves every figure: the load is part of the result.
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"== run {i + 1}/{args.runs} (load average {load}, {os.cpu_count()} cores)")
            loads.append(os.getloadavg())
            runs.append(await one_run(servers, client, scenarios))
    names = [s.name for s in servers]
    summary = medians(runs, scenarios, names)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "uname_m": platform.machine(),
        "nproc": len(os.sched_getaffinity(0)),
        "python": sys.version,
        "load_average_at_run_start": loads,
        "servers": {s.name: s.cmd for s in servers},
        "ours_env": {**OURS_ENV, **dict(args.env)},
        "scenarios": scenarios,
        "metrics": {
            sc: {m: {"unit": u, "better": b} for m, (u, b) in METRICS[sc].items()}
            for sc in scenarios
        },
        "runs": runs,
        "median": summary,
        "markdown": markdown(summary, len(runs)),
        "goals": goals_markdown(summary),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--scenarios",
        default="issue",
        help="comma separated, in order; `issue` (default): the workloads of issue 11; `all`",
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results.json", help="JSON results file"
    )
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat everything N times (servers restarted), report medians",
    )
    p.add_argument(
        "--only", choices=("both", "ours", "old"), default="both", help="which servers to run"
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra env for our server (repeatable)",
    )
    p.add_argument(
        "--seed-run", default=SEED_RUN, help="old backend start script, called as SCRIPT PORT"
    )
    p.add_argument(
        "--seed-venv", default=SEED_VENV, help="the old backend's venv (made on first use)"
    )
    args = p.parse_args(argv)
    groups = {"issue": list(ISSUE_SCENARIOS), "all": list(SCENARIOS)}
    args.scenarios = [
        name
        for part in args.scenarios.split(",")
        if part.strip()
        for name in groups.get(part.strip(), [part.strip()])
    ]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        p.error(f"unknown scenario(s) {unknown}; choose from issue, all, {','.join(SCENARIOS)}")
    if not 1 <= args.runs <= 20:
        p.error("--runs must be between 1 and 20")
    if any("=" not in e for e in args.env):
        p.error("--env takes KEY=VALUE")
    args.env = [tuple(e.split("=", 1)) for e in args.env]
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    logs = Path(tempfile.mkdtemp(prefix="replbench-"))
    servers = []
    if args.only in ("both", "ours"):
        env = {**os.environ, **OURS_ENV, **dict(args.env)}
        cmd = [sys.executable, "-m", "replserver", "--host", HOST, "--port", "{port}"]
        servers.append(Server("ours", cmd, REPO, env, logs / "ours.log"))
    if args.only in ("both", "old"):
        servers.append(
            Server(
                "old",
                [args.seed_run, "{port}"],
                REPO,
                {**os.environ, "SEED_VENV": args.seed_venv},
                logs / "old.log",
            )
        )
    print(f"server logs in {logs}")
    try:
        report = asyncio.run(amain(args, servers))
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped, no results written", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"\nbenchmark aborted: {e}", file=sys.stderr)
        return 1
    finally:
        for s in servers:
            s.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + report["markdown"])
    if report["goals"]:
        print("\n" + report["goals"])
    print(f"\nresults: {args.out}")
    failed = [
        (sc, n)
        for sc, sides in report["median"].items()
        for n, side in sides.items()
        if "error" in side
    ]
    if failed:
        print(f"FAILED scenarios: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
