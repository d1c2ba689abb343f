"""Sessions outlive their process: saved on culling, eviction and shutdown, restored on the
id's next use, in a real child, from a real directory store or a real Redis server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from replserver.routes import MANAGER
from replserver.snapshots import restore_notice
from replserver.snapshots.envelope import Meta, seal, unseal

from . import redisserver, servers
from .conftest import Client, MakeClient, execute, stream

STATE = """\
import json, collections
import os.path as osp
from functools import reduce
x = 41
def f():
    return x + 1
class Point:
    def __init__(self, a, b):
        self.a, self.b = a, b
    def total(self):
        return self.a + self.b + f()
p = Point(1, 2)
shared = [1, 2, 3]
alias = shared
counts = collections.Counter("hello")
square = lambda n: n * n
def outer():
    k = 10
    def inner():
        return k
    return inner
closure = outer()
fh = open('/etc/hostname')
gen = (i for i in range(3))
open('notes.txt', 'w').write('kept on disk')
"""

CHECK = """\
x = 100
print(f(), p.total(), square(3), closure(), alias is shared, type(p) is Point,
      json.dumps([1]), osp.join('a', 'b'), reduce(int.__add__, [1, 2]), counts['l'],
      open('notes.txt').read())
"""
CHECKED = "101 104 9 10 True True [1] a/b 3 2 kept on disk\n"


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 15) -> None:
    """Poll `predicate` against a deadline (never a fixed sleep)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


def snapshot_file(store: Path, sid: str) -> Path:
    return store / f"{sid}.snapshot"


async def cull(client: Client, store: Path, sid: str) -> None:
    """Wait for the idle culler to end `sid` and its snapshot to be written."""
    manager = client.app[MANAGER]
    await wait_until(lambda: manager.find(sid) is None)
    assert manager.snapshots is not None
    await manager.snapshots.settled()
    assert snapshot_file(store, sid).exists()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "snapshots"


async def test_culled_session_comes_back_with_its_namespace_and_files(
    make_client: MakeClient, store: Path
) -> None:
    client = await make_client(snapshot_store=str(store), session_idle_s=0.5)
    body = await execute(client, "s1", STATE)
    assert body["returnCode"] == 0, body
    await cull(client, store, "s1")
    body = await execute(client, "s1", CHECK)
    assert body["output"] == CHECKED, body
    restored = body["restored"]
    assert restored["reason"] == "culled"
    assert restored["skipped"] == {
        "fh": "cannot pickle '_io.TextIOWrapper' object",
        "gen": "cannot pickle 'generator' object",
    }
    assert restored["names"] >= 13 and restored["files"] == 1
    assert restored["takenAt"].endswith("Z")
    assert body["restarted"] is False  # a restore is not a restart
    again = await execute(client, "s1", "print(x)")
    assert "restored" not in again and again["output"] == "100\n"


async def test_evicted_session_is_restored_and_says_so_in_the_stream(
    make_client: MakeClient, store: Path
) -> None:
    client = await make_client(snapshot_store=str(store), max_sessions=1)
    await execute(client, "a", "secret = 'from a'")
    await execute(client, "b", "other = 1")  # the cap evicts a
    snapshots = client.app[MANAGER].snapshots
    assert snapshots is not None
    await wait_until(lambda: client.app[MANAGER].find("a") is None)
    await snapshots.settled()
    assert snapshot_file(store, "a").exists()
    events = await stream(client, "a", "print(secret)")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "restore", events
    assert events[0]["reason"] == "evicted" and events[0]["skipped"] == {}
    assert "restart" not in kinds
    assert "".join(e["content"] for e in events if e["type"] == "output") == "from a\n"


async def test_reset_and_delete_remove_the_snapshot(make_client: MakeClient, store: Path) -> None:
    client = await make_client(snapshot_store=str(store), session_idle_s=0.5)
    for sid in ("r", "d"):
        await execute(client, sid, "kept = 1")
        await cull(client, store, sid)
    resp = await client.post("/reset/r")
    assert resp.status == 200
    resp = await client.delete("/sessions/d")
    assert resp.status == 404  # not live here; its snapshot goes all the same
    snapshots = client.app[MANAGER].snapshots
    assert snapshots is not None
    await snapshots.settled()
    for sid in ("r", "d"):
        assert not snapshot_file(store, sid).exists()
        body = await execute(client, sid, "kept")
        assert "NameError" in body["error"] and "restored" not in body


async def test_a_live_session_reset_is_not_resurrected_by_its_idle_save(
    make_client: MakeClient, store: Path
) -> None:
    client = await make_client(snapshot_store=str(store), snapshot_idle_s=0.2)
    await execute(client, "s", "kept = 1")
    await wait_until(lambda: snapshot_file(store, "s").exists())
    resp = await client.post("/reset/s")
    assert resp.status == 200
    assert not snapshot_file(store, "s").exists()
    resp = await client.delete("/sessions/s")
    assert resp.status == 200
    body = await execute(client, "s", "kept")
    assert "NameError" in body["error"] and "restored" not in body


async def test_crash_restores_the_last_idle_save_labelled_as_older(
    make_client: MakeClient, store: Path
) -> None:
    client = await make_client(snapshot_store=str(store), snapshot_idle_s=0.2)
    await execute(client, "c", "before = 'saved while idle'")
    await wait_until(lambda: snapshot_file(store, "c").exists())
    taken = snapshot_file(store, "c").stat().st_mtime_ns
    body = await execute(client, "c", "after = 1\nimport os, signal\nos.kill(os.getpid(), 9)")
    assert body["returnCode"] == 1
    assert snapshot_file(store, "c").stat().st_mtime_ns == taken  # no save since
    body = await execute(client, "c", "print(before)\nafter")
    assert body["output"] == "saved while idle\n"
    assert "NameError" in body["error"]
    assert body["restored"]["reason"] == "crash"
    assert body["restarted"] is True  # what came after the save is lost


async def test_unpicklable_and_oversized_names_are_named_and_the_rest_kept(
    make_client: MakeClient, store: Path
) -> None:
    client = await make_client(
        snapshot_store=str(store), session_idle_s=0.5, snapshot_max_bytes=200_000
    )
    code = (
        "import threading, socket\n"
        "small = 'fits'\n"
        "big = bytes(300_000)\n"
        "lock = threading.Lock()\n"
        "def uses_lock():\n    return lock\n"
        "after = 'also fits'\n"
    )
    await execute(client, "cap", code)
    await cull(client, store, "cap")
    assert snapshot_file(store, "cap").stat().st_size < 200_000 + 10_000
    body = await execute(client, "cap", "print(small, after)")
    assert body["output"] == "fits also fits\n"
    skipped = body["restored"]["skipped"]
    assert set(skipped) == {"big", "lock", "uses_lock"}, skipped
    assert "size cap" in skipped["big"]
    assert "lock" in skipped["lock"]


def _tamper(path: Path, how: str, key: bytes) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif how == "foreign key":
        meta, blob = unseal(key, "t", data, max_age_s=1e9)
        path.write_bytes(seal(b"k" * 32, meta, blob))
    elif how == "too old":
        meta, blob = unseal(key, "t", data, max_age_s=1e9)
        old = Meta(meta.session_id, meta.cause, time.time() - 30 * 86400, meta.replica)
        path.write_bytes(seal(key, old, blob))


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("truncated", "truncated"),
        ("flipped", "damaged or was not written with this server's key"),
        ("foreign key", "damaged or was not written with this server's key"),
        ("too old", "too old"),
        ("another session's", "belongs to another session"),
        ("garbage", "truncated or not a snapshot"),
    ],
)
async def test_a_bad_snapshot_gives_a_fresh_session_and_a_clear_note(
    make_client: MakeClient, store: Path, how: str, why: str
) -> None:
    client = await make_client(snapshot_store=str(store), session_idle_s=0.5)
    await execute(client, "t", "kept = 1")
    await cull(client, store, "t")
    path = snapshot_file(store, "t")
    key = (store / "key").read_bytes()
    if how == "another session's":
        await execute(client, "u", "planted = 1")
        await cull(client, store, "u")
        shutil.copyfile(snapshot_file(store, "u"), path)
    elif how == "garbage":
        path.write_bytes(b"\x80\x04not a snapshot")
    else:
        _tamper(path, how, key)
    events = await stream(client, "t", "print('fresh', 'kept' in dir(), 'planted' in dir())")
    restart = [e for e in events if e["type"] == "restart"]
    assert len(restart) == 1 and why in restart[0]["reason"], events
    assert "not restored" in restart[0]["reason"]
    assert not [e for e in events if e["type"] == "restore"]
    assert "".join(e["content"] for e in events if e["type"] == "output") == "fresh False False\n"
    assert events[-1]["type"] == "complete" and events[-1]["returnCode"] == 0
    await wait_until(lambda: not path.exists())  # refused once, then deleted


async def test_store_directory_and_key_are_private(make_client: MakeClient, store: Path) -> None:
    await make_client(snapshot_store=str(store))
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    key = store / "key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32


async def test_metrics_count_saves_and_restores(make_client: MakeClient, store: Path) -> None:
    client = await make_client(snapshot_store=str(store), session_idle_s=0.5)
    await execute(client, "m", "kept = 1")
    await cull(client, store, "m")
    await execute(client, "m", "kept")
    text = await (await client.get("/metrics")).text()
    assert 'replserver_snapshots_total{operation="save",outcome="ok",reason="culled"} 1.0' in text
    assert 'replserver_snapshots_total{operation="restore",outcome="ok",reason="culled"} 1.0' in (
        text
    )
    assert "replserver_snapshot_bytes_count 1.0" in text


async def test_a_restarted_server_finds_every_session(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env: dict[str, Any] = {"REPL_SNAPSHOT_STORE": str(store), "REPL_REPLICA_ID": "one"}
    log = tmp_path / "server.log"
    sids = [f"sess-{n}" for n in range(5)]
    first = await servers.start(log=log, **env)
    try:
        await first.wait_ready()
        async with aiohttp.ClientSession() as http:
            for n, sid in enumerate(sids):
                code = f"value = {n} * 7\ndef twice():\n    return value * 2"
                async with http.post(f"{first.base}/execute/{sid}", json={"code": code}) as r:
                    assert r.status == 200
        assert await first.stop() == 0, first.log_tail()
    finally:
        await first.kill()
    assert {p.name for p in store.glob("*.snapshot")} == {f"{s}.snapshot" for s in sids}
    second = await servers.start(log=log, **env)
    try:
        await second.wait_ready()
        async with aiohttp.ClientSession() as http:
            for n, sid in enumerate(sids):
                code = "print(twice())"
                async with http.post(f"{second.base}/execute/{sid}", json={"code": code}) as r:
                    body = await r.json()
                assert body["output"] == f"{n * 14}\n", body
                assert body["restored"]["reason"] == "shutdown", body
    finally:
        await second.stop()
        await second.kill()


# --- the shared store: a real Redis server -----------------------------------------------------


@pytest.fixture
async def redis_url(tmp_path: Path) -> AsyncIterator[str]:
    async with redisserver.running(tmp_path) as url:
        yield url


async def test_redis_store_moves_a_session_to_another_replica_with_a_ttl(
    make_client: MakeClient, redis_url: str
) -> None:
    import redis.asyncio as redis

    common = {"snapshot_store": redis_url, "snapshot_key": "k" * 32, "snapshot_ttl_s": 3600.0}
    first = await make_client(replica_id="r1", **common)
    second = await make_client(replica_id="r2", **common)
    await execute(first, "m", "data = {'n': 1}\ndef get():\n    return data['n']")
    await first.app[MANAGER].close_all()  # the shutdown's save
    client = redis.Redis.from_url(redis_url)
    try:
        ttl_ms = await client.pttl("replserver:snapshot:m")
        assert 3500_000 < ttl_ms <= 3600_000
    finally:
        await client.aclose()
    body = await execute(second, "m", "print(get())")
    assert body["output"] == "1\n"
    assert body["restored"]["reason"] == "moved"


async def test_redis_store_refuses_a_snapshot_under_another_key(
    make_client: MakeClient, redis_url: str
) -> None:
    first = await make_client(snapshot_store=redis_url, snapshot_key="a" * 32)
    second = await make_client(snapshot_store=redis_url, snapshot_key="b" * 32)
    await execute(first, "k", "planted = 'code from someone with store access'")
    await first.app[MANAGER].close_all()
    events = await stream(second, "k", "print('planted' in dir())")
    restart = [e for e in events if e["type"] == "restart"]
    assert restart and "not written with this server's key" in restart[0]["reason"]
    assert "".join(e["content"] for e in events if e["type"] == "output") == "False\n"


def test_a_shared_store_needs_a_key() -> None:
    from replserver.settings import Settings

    with pytest.raises(ValueError, match="REPL_SNAPSHOT_KEY is required"):
        Settings.from_env({"REPL_SNAPSHOT_STORE": "redis://127.0.0.1:1/0"})


# --- what survives: the child's module on its own, in a real interpreter -----------------------

SURVIVES = {
    "numbers": "v = (1, 2.5, 3j, 10**30)",
    "text and bytes": "v = ('é', b'\\x00', bytearray(b'ab'))",
    "containers": "v = [{1: {2}}, frozenset({3}), collections.OrderedDict(a=1)]",
    "dataclass instance": (
        "import dataclasses\n@dataclasses.dataclass\nclass D:\n    n: int\nv = D(3)"
    ),
    "enum member": "import enum\nclass Color(enum.Enum):\n    RED = 1\nv = Color.RED",
    "class with classmethod": (
        "class K:\n    @classmethod\n    def make(cls):\n        return cls()\nv = K.make"
    ),
    "exception instance": "v = ValueError('bad')",
    "datetime and decimal": (
        "import datetime, decimal\nv = (datetime.date(2026, 1, 2), decimal.Decimal('1.5'))"
    ),
    "compiled regex": "import re\nv = re.compile('a+')",
    "recursive structure": "v = []\nv.append(v)",
    "partial": "import functools\nv = functools.partial(int, base=2)",
    "module": "import math as v",
    "function from a module": "from os.path import join as v",
    "StringIO": "import io\nv = io.StringIO('text')",
}
LOST = {
    "open file": ("v = open('/etc/hostname')", "cannot pickle"),
    "generator": ("v = (i for i in range(2))", "cannot pickle 'generator'"),
    "lock": ("import threading\nv = threading.Lock()", "cannot pickle '_thread.lock'"),
    "thread": ("import threading\nv = threading.Thread(target=print)", "cannot pickle"),
    "socket": ("import socket\nv = socket.socketpair()[0]", "cannot pickle"),
    "coroutine": ("async def c():\n    pass\nv = c()", "cannot pickle 'coroutine'"),
    "frame": ("import sys\nv = sys._getframe()", "cannot pickle 'frame'"),
    "subprocess": (
        "import subprocess\nv = subprocess.Popen(['true'])\nv.wait()",
        "cannot pickle",
    ),
}

ROUND_TRIP = """\
import sys, types, collections, pickle
sys.path.insert(0, {repo!r})
from replchild import snapshot
def fresh():
    module = types.ModuleType('__main__')
    sys.modules['__main__'] = module
    return module.__dict__
ns = fresh()
ns['collections'] = collections
exec({code!r}, ns)
before = pickle.dumps(ns['v']) if {compare} else None
blob, summary = snapshot.save(ns, {root!r}, 1 << 24)
ns2 = fresh()
report = snapshot.restore(blob, ns2, {root!r})
if 'v' in ns2 and {compare}:
    assert pickle.dumps(ns2['v']) == before or repr(ns2['v']) == repr(ns['v'])
print(repr(report['skipped'].get('v', 'kept')))
"""


def round_trip(code: str, root: Path, compare: bool = False) -> str:
    """Save and restore `code`'s `v` in a fresh interpreter; 'kept' or why not."""
    import subprocess

    script = ROUND_TRIP.format(
        repo=str(servers.REPO_ROOT), code=code, root=str(root), compare=compare
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=root
    )
    assert done.returncode == 0, done.stderr
    return str(eval(done.stdout))


@pytest.mark.parametrize("kind", sorted(SURVIVES))
def test_object_kinds_that_survive(kind: str, tmp_path: Path) -> None:
    assert round_trip(SURVIVES[kind], tmp_path) == "kept"


@pytest.mark.parametrize("kind", sorted(LOST))
def test_object_kinds_that_do_not(kind: str, tmp_path: Path) -> None:
    code, why = LOST[kind]
    assert why in round_trip(code, tmp_path)


def test_envelope_binds_the_session_and_the_key() -> None:
    key = hashlib.sha256(b"k").digest()
    sealed = seal(key, Meta("a", "culled", time.time(), "r"), b"payload")
    assert unseal(key, "a", sealed, max_age_s=60)[1] == b"payload"
    for sid, k in (("b", key), ("a", b"other" * 8)):
        with pytest.raises(Exception, match=r"another session|this server's key"):
            unseal(k, sid, sealed, max_age_s=60)


def test_protocol_1_notice_names_what_was_not_restored() -> None:
    assert restore_notice({"reason": "culled", "skipped": {}}) is None
    notice = restore_notice({"reason": "moved", "skipped": {"fh": "x", "gen": "y"}})
    assert notice == "[session restored (moved); not restored: fh, gen]\n"
    many = {f"n{i}": "why" for i in range(8)}
    notice = restore_notice({"reason": "culled", "skipped": many})
    assert notice is not None and notice.endswith("n4 and 3 more]\n")


def test_default_store_lives_under_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from replserver.settings import Settings
    from replserver.snapshots import StoreError, open_store

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    opened = open_store(Settings.from_env({}))
    assert opened is not None
    assert opened[0].description == f"directory {tmp_path}/state/replserver/snapshots"
    # Unusable: the default turns snapshots off (with a warning); a named path refuses.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker))
    assert open_store(Settings.from_env({})) is None
    with pytest.raises(StoreError, match="REPL_SNAPSHOT_STORE="):
        open_store(Settings.from_env({"REPL_SNAPSHOT_STORE": str(blocker / "x")}))


async def test_shutdown_relabels_an_idle_save_instead_of_pickling_again(
    make_client: MakeClient, store: Path
) -> None:
    first = await make_client(snapshot_store=str(store), snapshot_idle_s=0.2)
    await execute(first, "i", "kept = 'as of the idle save'")
    await wait_until(lambda: snapshot_file(store, "i").exists())
    await first.app[MANAGER].close_all()
    text = await (await first.get("/metrics")).text()
    relabelled = 'operation="save",outcome="relabelled",reason="shutdown"} 1.0'
    assert relabelled in text
    second = await make_client(snapshot_store=str(store))
    body = await execute(second, "i", "print(kept)")
    assert body["output"] == "as of the idle save\n"
    assert body["restored"]["reason"] == "shutdown" and body["restarted"] is False


SLOW_REDUCE = """\
class Slow:
    def __reduce__(self):
        import time
        time.sleep(3600)
stuck = Slow()
"""


async def test_a_save_that_hangs_is_bounded_and_the_others_are_kept(
    make_client: MakeClient, store: Path
) -> None:
    client = await make_client(snapshot_store=str(store), timeout_s=1.0)
    await execute(client, "slow", SLOW_REDUCE)
    await execute(client, "fine", "kept = 1")
    async with asyncio.timeout(20):  # a hang guard: the bound is REPL_TIMEOUT_S per save
        await client.app[MANAGER].close_all()
    assert snapshot_file(store, "fine").exists()
    assert not snapshot_file(store, "slow").exists()
    text = await (await client.get("/metrics")).text()
    assert 'operation="save",outcome="failed",reason="shutdown"} 1.0' in text


async def test_an_unreachable_redis_costs_a_note_not_the_request(make_client: MakeClient) -> None:
    url = f"redis://127.0.0.1:{servers.free_port()}/0"
    client = await make_client(snapshot_store=url, snapshot_key="k" * 32)
    events = await stream(client, "x", "print('ran')")
    restart = [e for e in events if e["type"] == "restart"]
    assert restart and "could not be read" in restart[0]["reason"], events
    assert "".join(e["content"] for e in events if e["type"] == "output") == "ran\n"


FORGE = """\
import gc, os, struct
runner = next(o for o in gc.get_objects() if type(o).__name__ == 'Runner')
frame = struct.pack('>BI', {kind}, len({payload!r})) + {payload!r}
os.write(runner.proto_out, frame)
import time
time.sleep(5)
"""


@pytest.mark.parametrize(
    ("kind", "payload"),
    [(0x50, b"planted piece"), (0x73, b'{"names": 1}'), (0x6C, b'{"names": 99}')],
)
async def test_snapshot_frames_nobody_asked_for_end_the_process(
    make_client: MakeClient, store: Path, kind: int, payload: bytes
) -> None:
    client = await make_client(snapshot_store=str(store))
    body = await execute(client, "h", FORGE.format(kind=kind, payload=payload))
    assert body["reason"] == "crashed" and "a frame of unknown type" in body["error"], body
    body = await execute(client, "h", "print('fresh')")
    assert body["output"] == "fresh\n" and body["restarted"] is True


async def test_the_directory_store_sweeps_what_expired(tmp_path: Path) -> None:
    from replserver.snapshots.dir_store import DirStore

    store = DirStore(tmp_path / "s", ttl_s=3600)
    await store.put("old", b"x")
    await store.put("new", b"y")
    (tmp_path / "s" / ".tmp-crashed").write_bytes(b"half")
    past = time.time() - 7200
    for name in ("old.snapshot", ".tmp-crashed"):
        os.utime(tmp_path / "s" / name, (past, past))
    assert await store.sweep() == 2
    assert await store.get("old") is None and await store.get("new") == b"y"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["new.snapshot"]


async def test_the_default_stream_gets_one_error_line_for_what_was_not_restored(
    make_client: MakeClient, store: Path
) -> None:
    """Protocol 1 (the old backend's stream) has no `restore` event: one short `error`
    line names what was not restored, and nothing is said when everything was."""
    client = await make_client(snapshot_store=str(store), session_idle_s=0.5)
    await execute(client, "p1", "kept = 1\nfh = open('/etc/hostname')")
    await execute(client, "p2", "kept = 2")
    for sid in ("p1", "p2"):
        await cull(client, store, sid)
    events = await stream(client, "p1", "print(kept)", protocol=None)
    assert events[:-1] == [
        {"type": "error", "content": "[session restored (culled); not restored: fh]\n"},
        {"type": "output", "content": "1\n"},
    ]
    assert events[-1]["type"] == "complete" and events[-1]["restarted"] is False
    events = await stream(client, "p2", "print(kept)", protocol=None)
    assert events[:-1] == [{"type": "output", "content": "2\n"}]
    assert events[-1]["type"] == "complete" and "restored" not in events[-1]
