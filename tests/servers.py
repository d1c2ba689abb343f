"""Real `python -m replserver` processes for tests: on free loopback ports, ready, stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import aiohttp

from .slow_callbacks import SLOW_CALLBACK_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
SLOW_CALLBACK_REPORT = "asyncio: Executing "  # how a slow callback's report starts in the log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pid_gone(pid: int) -> bool:
    """True if no such process runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it went while being read
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def live_children(parent: int) -> list[int]:
    """Pids of `parent`'s children that have not exited (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile (ENOENT, or ESRCH while read)
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[1]) == parent and fields[0] != "Z":
                found.append(int(entry.name))
    return found


async def wait_gone(pids: list[int], within_s: float = 5.0) -> list[int]:
    """Poll until every pid is gone or `within_s` seconds pass; the pids still alive."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [pid for pid in pids if not pid_gone(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.05)


class Replica:
    """One server process and where it listens."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path | None) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = log

    def __repr__(self) -> str:
        return f"<Replica pid={self.proc.pid} port={self.port} rc={self.proc.returncode}>"

    def log_tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log and self.log.exists() else ""

    def slow_callbacks(self) -> list[str]:
        """asyncio's reports of callbacks that held the loop (start with slow_callback_s)."""
        text = self.log.read_text() if self.log and self.log.exists() else ""
        return [line for line in text.splitlines() if SLOW_CALLBACK_REPORT in line]

    async def wait_ready(self, timeout_s: float = 20) -> None:
        """Poll /health until it answers 200; fail at once if the process exits."""
        async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
            while True:
                assert self.proc.returncode is None, f"exited at start-up:\n{self.log_tail()}"
                with suppress(aiohttp.ClientConnectionError):
                    async with http.get(f"{self.base}/health") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)

    async def stop(self, timeout_s: float = 10) -> int:
        """SIGTERM, as an orchestrator stops a container; the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def kill(self) -> None:
        """SIGKILL the whole process group (cleanup after a test, whatever happened)."""
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


async def start(
    port: int | None = None,
    *,
    prefix: Sequence[str] = (),
    log: Path | None = None,
    slow_callback_s: float | None = None,
    python: str = sys.executable,
    **env: str,
) -> Replica:
    """Start `[prefix...] python -m replserver` with a clean REPL_* environment plus `env`.

    `slow_callback_s`: run it with asyncio's debug mode reporting, in `log`, every callback
    that held the event loop longer (see Replica.slow_callbacks).
    """
    port = port or free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REPL_")}
    clean.pop("ENVIRONMENT", None)
    clean.pop("CORS_ORIGINS", None)
    clean.update(
        REPL_HOST="127.0.0.1",
        REPL_PORT=str(port),
        REPL_LOG_LEVEL="warning",
        REPL_SHUTDOWN_GRACE_S="1",
        REPL_SNAPSHOT_STORE="off",  # a test that wants snapshots names its store
    )
    clean.update(env)
    module = "replserver"
    if slow_callback_s is not None:
        assert log is not None, "the reports go to the log"
        module = "tests.slow_callbacks"
        clean[SLOW_CALLBACK_ENV] = str(slow_callback_s)
    out = log.open("ab") if log is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            *prefix,
            python,
            "-m",
            module,
            cwd=REPO_ROOT,
            env=clean,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out or asyncio.subprocess.DEVNULL,
            stderr=out or asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()
    return Replica(proc, port, log)
