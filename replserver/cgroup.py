"""Per-child pids cgroups: cap how many processes a session may run, and kill all of them.

A process group can be escaped (setsid, double fork); a cgroup cannot. Where the server may
create cgroups (root, cgroup v1 pids hierarchy or a delegated v2 subtree with the pids
controller), every child gets its own, with `pids.max` set: that bounds a fork bomb even when
RLIMIT_NPROC does not (root children, or many sessions sharing a uid). Elsewhere this is off,
and /health says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

V1_ROOT = Path("/sys/fs/cgroup/pids")
V2_ROOT = Path("/sys/fs/cgroup")
KILL_WITHIN_S = 2.0  # v1: how long kill passes go on while a fork loop refills the cgroup
KILL_PASS_INTERVAL_S = 0.005  # between passes: a killed process needs a moment to leave

_background: set[asyncio.Task[None]] = set()


def _own_path(controller: str) -> str | None:
    """This process's cgroup path in the hierarchy of `controller` ("" for v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


class CgroupTree:
    """The server's own directory of per-child pids cgroups."""

    def __init__(self, base: Path, version: int) -> None:
        self.base = base
        self.version = version
        self._serial = 0

    def __repr__(self) -> str:
        return f"<CgroupTree v{self.version} {self.base}>"

    @classmethod
    def create(cls) -> CgroupTree | None:
        """A fresh tree for this server, or None where cgroups cannot be managed here."""
        name = f"replserver-{os.getpid()}-{secrets.token_hex(3)}"
        own = _own_path("pids")
        if own is not None and (V1_ROOT / "tasks").exists():
            base = V1_ROOT / own.lstrip("/") / name
            version = 1
        else:
            own = _own_path("")
            controllers = V2_ROOT / "cgroup.controllers"
            if own is None or not controllers.exists() or "pids" not in controllers.read_text():
                return None
            parent = V2_ROOT / own.lstrip("/")
            if "pids" not in (parent / "cgroup.subtree_control").read_text().split():
                return None  # not delegated to us; enabling it would move other processes
            base = parent / name
            version = 2
        _remove_stale(base.parent)
        try:
            base.mkdir(exist_ok=True)
            if version == 2:
                (base / "cgroup.subtree_control").write_text("+pids")
        except OSError as exc:
            log.info("pids cgroups unavailable (%s): fork bombs are bounded by rlimits only", exc)
            return None
        return cls(base, version)

    def new(self, limit: int) -> ChildCgroup | None:
        self._serial += 1
        path = self.base / f"child-{self._serial}"
        try:
            path.mkdir()
            if limit > 0:
                (path / "pids.max").write_text(str(limit))
        except OSError as exc:
            log.warning("could not create %s: %s", path, exc)
            with contextlib.suppress(OSError):
                path.rmdir()  # made, but without its limit (EMFILE): not left behind
            return None
        return ChildCgroup(path)

    async def remove(self) -> None:
        for child in self.base.glob("child-*"):
            await ChildCgroup(child).destroy()
        try:
            self.base.rmdir()
        except OSError as exc:
            log.warning("could not remove %s: %s", self.base, exc)


def _remove_stale(parent: Path) -> None:
    """Remove the trees of servers that died without cleaning up (SIGKILL, a crash): their
    processes are gone (the children die with the server), only empty directories stay."""
    for tree in parent.glob("replserver-*-*"):
        try:
            pid = int(tree.name.split("-")[1])
            os.kill(pid, 0)
            continue  # that server still runs
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        for child in tree.glob("child-*"):
            ChildCgroup(child)._kill_pass(0)  # one pass: no loop may run yet (start-up)
            try:
                child.rmdir()
            except OSError:
                pass
        try:
            tree.rmdir()
        except OSError:
            pass


class ChildCgroup:
    """One child's cgroup."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"<ChildCgroup {self.path.name}>"

    async def add(self, pid: int) -> None:
        """Move `pid` here, in a worker thread: the kernel makes a move wait for an RCU grace
        period (cgroup v1, and v2 without favordynmods), 6-16 ms here when moves are spaced
        out, during which the event loop would serve nobody."""
        await asyncio.to_thread((self.path / "cgroup.procs").write_text, str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill_all(self, *, spare: int = 0) -> None:
        """SIGKILL every process in the cgroup but `spare`, escaped process groups included:
        one pass now, and the passes a fork loop may still need in the background."""
        if self._kill_pass(spare):
            task = asyncio.get_running_loop().create_task(self.kill_remaining(spare=spare))
            _background.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(_background.discard)

    async def kill_remaining(self, *, spare: int = 0) -> None:
        """Kill passes until nothing but `spare` is left, yielding to the loop between them."""
        # pids.max keeps a fork loop from outrunning this; bounded all the same.
        deadline = time.monotonic() + KILL_WITHIN_S
        while time.monotonic() < deadline:
            if not self._kill_pass(spare):
                return
            await asyncio.sleep(KILL_PASS_INTERVAL_S)

    def _kill_pass(self, spare: int) -> bool:
        """One round of SIGKILL; False once nothing is left to kill (as far as we can tell)."""
        kill_file = self.path / "cgroup.kill"
        if not spare and kill_file.exists():
            try:
                # v2: the kernel kills all of them, forks in flight included, at once.
                kill_file.write_text("1")
                return False
            except OSError:
                pass
        # v1 has no cgroup.kill: kill what is listed, pass after pass, until nothing is left.
        pids = [p for p in self.pids() if p != spare]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return bool(pids)

    async def destroy(self) -> None:
        """Kill what is left and remove the directory (bounded wait for the kernel)."""
        await self.kill_remaining()
        deadline = time.monotonic() + 5.0
        while True:
            try:
                # In a worker thread too: a removal waits for the kernel up to 6 ms here.
                await asyncio.to_thread(self.path.rmdir)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("could not remove %s: processes remain", self.path)
                    return
                await asyncio.sleep(0.01)
