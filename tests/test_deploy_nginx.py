"""Three replicas behind nginx, configured by the shipped deploy/nginx/replserver.conf.

Every request of a session must reach the replica that holds it; streams must pass
unbuffered; stopping one replica must touch only its own sessions. Needs nginx (`.ci/run`
installs Debian's); skipped with the reason where it is missing. All traffic stays on
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import secrets
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from . import redisserver, servers
from .conftest import parse_sse
from .dockerfile import ROOT

NGINX_CONF = ROOT / "deploy" / "nginx" / "replserver.conf"
REPLICA_IDS = ("r1", "r2", "r3")
MiB = 1024 * 1024
SESSION_KEY = re.compile(r"session=(\S*)")


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def render(ports: list[int], listen: int) -> str:
    """The shipped file with the test's replica ports and listen address, nothing else."""
    text = NGINX_CONF.read_text()
    addresses = iter(f"server 127.0.0.1:{port}" for port in ports)
    text, servers_replaced = re.subn(r"server 127\.0\.0\.1:\d+", lambda _: next(addresses), text)
    text, listens_replaced = re.subn(r"listen \d+;", f"listen 127.0.0.1:{listen};", text)
    assert servers_replaced == len(ports) and listens_replaced == 1, "shipped file changed shape"
    return text


def main_conf(work: Path) -> str:
    """A minimal nginx.conf around the shipped file: paths in `work`, logs to files."""
    temp = "\n".join(
        f"    {name}_temp_path {work}/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
pid {work}/nginx.pid;
error_log {work}/error.log info;
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
{temp}
    include {work}/replserver.conf;
    access_log {work}/access.log replserver;
}}
"""


@dataclass
class Cluster:
    base: str
    replicas: dict[str, servers.Replica]
    work: Path
    by_port: dict[int, str] = field(default_factory=dict)

    def access_log(self) -> list[dict[str, str]]:
        """nginx's own record of each request: session key, upstream address, replica."""
        entries = []
        for line in (self.work / "access.log").read_text().splitlines():
            entries.append(dict(re.findall(r"(\w+)=(\S*)", line)))
        return entries


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as started:
        yield started


@contextlib.asynccontextmanager
async def running_cluster(**env: Any) -> AsyncIterator[Cluster]:
    """Three replicas (with `env`) behind nginx on the shipped configuration."""
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx; .ci/run does)")
    # Not tmp_path: nginx's workers (nobody) must reach their temp directories.
    work = Path(tempfile.mkdtemp(prefix="replserver-nginx-"))
    work.chmod(0o755)
    replicas = {
        rid: await servers.start(
            log=work / f"{rid}.log",
            REPL_REPLICA_ID=rid,
            REPL_MAX_SESSIONS="400",  # 200 sessions over three: no eviction in the way
            **env,
        )
        for rid in REPLICA_IDS
    }
    listen = servers.free_port()
    (work / "replserver.conf").write_text(render([r.port for r in replicas.values()], listen))
    (work / "nginx.conf").write_text(main_conf(work))
    proc = None
    try:
        await asyncio.gather(*(r.wait_ready() for r in replicas.values()))
        with (work / "nginx.out").open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *(nginx, "-p", str(work), "-e", str(work / "error.log")),
                *("-c", str(work / "nginx.conf"), "-g", "daemon off;"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{listen}"
        async with aiohttp.ClientSession() as http, asyncio.timeout(10):
            while True:
                assert proc.returncode is None, (work / "nginx.out").read_text()
                try:
                    async with http.get(f"{base}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
        by_port = {r.port: rid for rid, r in replicas.items()}
        yield Cluster(base=base, replicas=replicas, work=work, by_port=by_port)
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for replica in replicas.values():
            try:
                await replica.stop()
            finally:
                await replica.kill()
        shutil.rmtree(work, ignore_errors=True)


async def post(
    http: aiohttp.ClientSession, url: str, status: int = 200, **json_body: Any
) -> tuple[dict[str, Any], str]:
    """POST a JSON body; the JSON reply and the replica that answered."""
    async with http.post(url, json=json_body or None) as resp:
        text = await resp.text()
        assert resp.status == status, (url, resp.status, text)
        body: dict[str, Any] = json.loads(text)
        return body, resp.headers["X-Replica"]


def output_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["content"] for e in events if e["type"] == "output")


@dataclass
class SessionTrace:
    sid: str
    token: str
    replicas: list[str] = field(default_factory=list)


async def use_session(http: aiohttp.ClientSession, base: str, sid: str) -> SessionTrace:
    """Set a variable and read it back through every route kind; where each request went."""
    trace = SessionTrace(sid, secrets.token_hex(8))
    body, replica = await post(http, f"{base}/execute/{sid}", code=f"v = {trace.token!r}")
    trace.replicas.append(replica)
    body, replica = await post(http, f"{base}/execute/{sid}", code="print(v)")
    assert body["output"] == f"{trace.token}\n", body
    trace.replicas.append(replica)
    async with http.post(f"{base}/execute-stream/{sid}", json={"code": "print(v)"}) as resp:
        assert resp.status == 200
        events = parse_sse(await resp.text())
        assert output_of(events) == f"{trace.token}\n", events
        trace.replicas.append(resp.headers["X-Replica"])
    body, replica = await post(http, f"{base}/interrupt/{sid}")
    assert body == {"sessionId": sid, "interrupted": False}
    trace.replicas.append(replica)
    # A route without the id in its path: the X-Session-Id header decides.
    async with http.get(f"{base}/health", headers={"X-Session-Id": sid}) as resp:
        assert resp.status == 200
        trace.replicas.append(resp.headers["X-Replica"])
    return trace


async def bounded(limit: int, coros: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def test_health_through_nginx_reaches_any_replica(cluster: Cluster) -> None:
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession() as http:
        for _ in range(12):
            async with http.get(f"{cluster.base}/health") as resp:
                body = await resp.json()
                assert resp.status == 200 and body["status"] == "ok"
                assert body["replica"] == resp.headers["X-Replica"]
                seen[body["replica"]] += 1
    # No session id, an empty hash key: nginx balances these round-robin.
    assert len(seen) >= 2, seen


@pytest.mark.timeout(120)
async def test_sessions_stick_to_one_replica_and_survive_another_replica_stopping(
    cluster: Cluster,
) -> None:
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=20)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        started = time.monotonic()
        sids = [f"s{i:03d}-{secrets.token_hex(6)}" for i in range(200)]
        traces: list[SessionTrace] = await bounded(
            20, [use_session(http, cluster.base, sid) for sid in sids]
        )
        routing_s = time.monotonic() - started
        requests = sum(len(t.replicas) for t in traces)
        misroutes = [t for t in traces if len(set(t.replicas)) != 1]
        home = {t.sid: t.replicas[0] for t in traces}
        per_replica = Counter(home.values())
        assert misroutes == [], [(t.sid, t.replicas) for t in misroutes[:5]]
        assert set(per_replica) == set(REPLICA_IDS), per_replica
        assert min(per_replica.values()) >= 20, f"badly unbalanced: {per_replica}"
        # nginx's own log agrees: one upstream per session, and it is the replica that
        # the X-Replica header named.
        upstreams: dict[str, set[str]] = {}
        for entry in cluster.access_log():
            if entry.get("session") in home:
                upstreams.setdefault(entry["session"], set()).add(entry["upstream"])
                assert entry["replica"] == home[entry["session"]], entry
        assert len(upstreams) == len(sids)
        for sid, seen in upstreams.items():
            assert len(seen) == 1, (sid, seen)
            port = int(next(iter(seen)).rsplit(":", 1)[1])
            assert cluster.by_port[port] == home[sid]

        # Stop one replica (SIGTERM, as an orchestrator does) while a stream of one of its
        # sessions is running.
        victim = "r2"
        victims = [t for t in traces if home[t.sid] == victim]
        survivors = [t for t in traces if home[t.sid] != victim]
        url = f"{cluster.base}/execute-stream/{victims[0].sid}"
        code = "import time\nprint('working', flush=True)\ntime.sleep(30)"
        in_flight = await http.post(url, json={"code": code})
        assert in_flight.status == 200
        async with asyncio.timeout(5):  # past the opening `start` event, to the output
            while b"working" not in await in_flight.content.readline():
                pass
        stop_started = time.monotonic()
        exit_code = await cluster.replicas[victim].stop()
        stop_s = time.monotonic() - stop_started
        assert exit_code == 0
        assert stop_s < 2 * 1 + 2, f"shutdown took {stop_s:.1f} s (REPL_SHUTDOWN_GRACE_S=1)"
        # The running execution ends with the replica: its stream says so and completes,
        # instead of hanging or breaking off.
        rest = await asyncio.wait_for(in_flight.content.read(), 5)
        in_flight.close()
        ending = [e for e in parse_sse(rest.decode()) if e["type"] != "output"]
        assert [e["type"] for e in ending] == ["error", "complete"], ending
        assert "the server is shutting down" in ending[0]["content"], ending
        assert ending[-1]["returnCode"] == 1 and ending[-1]["namespaceSurvived"] is False
        in_flight_saw = f"{ending[0]['content'].strip()!r}, then complete {ending[-1]['reason']!r}"

        # Every session comes back. Those of the other replicas find their state where
        # they left it; those of the stopped one start afresh on another replica (nginx
        # skips the refused connection), and stay there.
        async def come_back(trace: SessionTrace) -> tuple[dict[str, Any], str]:
            return await post(http, f"{cluster.base}/execute/{trace.sid}", code="print(v)")

        kept = await bounded(20, [come_back(t) for t in survivors])
        for trace, (body, replica) in zip(survivors, kept, strict=True):
            assert body["output"] == f"{trace.token}\n", (trace.sid, body)
            assert replica == home[trace.sid], (trace.sid, replica)
        fresh = await bounded(20, [come_back(t) for t in victims])
        moved_to: dict[str, str] = {}
        for trace, (body, replica) in zip(victims, fresh, strict=True):
            assert replica != victim
            assert "NameError" in (body["error"] or ""), body
            assert body["executionCount"] == 1 and body["restarted"] is False, body
            moved_to[trace.sid] = replica
        again = await bounded(20, [come_back(t) for t in victims])
        for trace, (_, replica) in zip(victims, again, strict=True):
            assert replica == moved_to[trace.sid], "a moved session must stay on its new replica"

    print(
        f"\nnginx affinity: {len(sids)} sessions, {requests} requests in {routing_s:.1f} s,"
        f" misroutes {len(misroutes)}, per replica {dict(sorted(per_replica.items()))};"
        f" stopped {victim} (exit {exit_code} in {stop_s:.2f} s): {len(survivors)} other"
        f" sessions kept their state, {len(victims)} of its sessions came back fresh (NameError,"
        f" executionCount 1) on {dict(Counter(moved_to.values()))}; its running stream saw"
        f" {in_flight_saw}"
    )


async def test_stream_through_nginx_is_not_buffered(cluster: Cluster) -> None:
    code = "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')"
    async with aiohttp.ClientSession() as http:
        await post(http, f"{cluster.base}/execute/stream-check", code="pass")  # spawn first
        started = time.monotonic()
        async with http.post(
            f"{cluster.base}/execute-stream/stream-check", json={"code": code}
        ) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/event-stream"
            async with asyncio.timeout(5):  # the first output event, past `start`
                while True:
                    line = await resp.content.readline()
                    if line.startswith(b"data: ") and b'"output"' in line:
                        break
            first_s = time.monotonic() - started
            rest = await resp.content.read()
            total_s = time.monotonic() - started
    first = json.loads(line.decode().removeprefix("data: "))
    assert first["type"] == "output" and first["content"].startswith("first"), first
    events = [first, *parse_sse(rest.decode())]
    assert output_of(events) == "first\nsecond\n", events
    assert events[-1]["type"] == "complete"
    assert total_s >= 1.5
    assert first_s < 0.75, f"the first event took {first_s:.2f} s: buffered by the proxy?"


async def test_body_limit_of_nginx_and_server_agree(cluster: Cluster) -> None:
    def body_of(size: int) -> bytes:
        head, tail = b'{"code": "x = 1  #', b'"}'
        return head + b"a" * (size - len(head) - len(tail)) + tail

    exact, over = body_of(MiB), body_of(MiB + 1)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for target, answered_by_nginx in (
            (cluster.base, True),
            (cluster.replicas["r1"].base, False),
        ):
            async with http.post(
                f"{target}/execute/limit", data=io.BytesIO(over), headers=headers
            ) as resp:
                assert resp.status == 413
                assert resp.content_type == "application/json"
                assert (await resp.json())["detail"]
                # nginx refuses it before any replica sees it.
                assert ("X-Replica" not in resp.headers) is answered_by_nginx
            async with http.post(
                f"{target}/execute/limit", data=io.BytesIO(exact), headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["returnCode"] == 0


async def read_with_ids(
    resp: aiohttp.ClientResponse, until: str
) -> tuple[list[dict[str, Any]], int]:
    """Protocol-2 events (each a `data:` line, an `id:` line, a blank line) until an output
    that ends with `until`; the events and the last id."""
    events: list[dict[str, Any]] = []
    while True:
        data, id_line = await resp.content.readline(), await resp.content.readline()
        assert data.startswith(b"data: ") and id_line.startswith(b"id: "), (data, id_line)
        assert await resp.content.readline() == b"\n"
        events.append(json.loads(data.removeprefix(b"data: ")))
        if output_of(events).endswith(until):
            return events, int(id_line.removeprefix(b"id: "))


async def reattach_once(http: aiohttp.ClientSession, base: str, sid: str) -> str:
    """Start a stream, drop it, reattach by the execution id alone (no X-Session-Id header,
    as an EventSource does); the replica that ran it, which must answer every step."""
    code = "import time\nprint('up', flush=True)\ntime.sleep(0.8)\nprint('down')"
    body = {"code": code, "protocol": 2}
    async with http.post(f"{base}/execute-stream/{sid}", json=body) as resp:
        assert resp.status == 200
        home, execution_id = resp.headers["X-Replica"], resp.headers["X-Execution-Id"]
        seen, last_id = await read_with_ids(resp, "up\n")
    events_url = f"{base}/executions/{execution_id}/events"
    async with http.get(events_url, headers={"Last-Event-ID": str(last_id)}) as again:
        assert again.status == 200, (sid, again.status, await again.text())
        assert again.headers["X-Replica"] == home
        raw = (await again.read()).decode()  # ends by itself after `complete`
    rest = parse_sse(raw)
    assert output_of(seen) + output_of(rest) == "up\ndown\n", (seen, rest)
    assert rest[-1]["type"] == "complete" and rest[-1]["returnCode"] == 0
    final_id = raw.removesuffix("\n\n").rsplit("\nid: ", 1)[1]
    # The EventSource reconnects after the end: the same replica tells it to stop.
    async with http.get(events_url, headers={"Last-Event-ID": final_id}) as done:
        assert done.status == 204 and done.headers["X-Replica"] == home
    return home


@pytest.mark.timeout(60)
async def test_reattach_through_nginx_reaches_the_replica_that_runs_it(cluster: Cluster) -> None:
    sids = [f"reattach{i}-{secrets.token_hex(4)}" for i in range(9)]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        homes = await asyncio.gather(*(reattach_once(http, cluster.base, sid) for sid in sids))
    # Sessions on different replicas: a reattach balanced by anything but the session id
    # would have reached a replica that does not know the execution (404).
    assert len(set(homes)) >= 2, homes
    # nginx's own log: every reattach was keyed by its session id (two per session).
    lines = (cluster.work / "access.log").read_text().splitlines()
    keys = Counter(
        key for line in lines if '"GET /executions/' in line for key in SESSION_KEY.findall(line)
    )
    assert keys == dict.fromkeys(sids, 2), keys


async def test_a_stopped_replicas_sessions_continue_elsewhere_with_their_state(
    tmp_path: Path,
) -> None:
    """With a shared Redis store, stopping a replica saves its sessions; each continues on
    another replica with its variables, and the first reply there says `restored`."""
    async with (
        redisserver.running(tmp_path) as url,
        running_cluster(REPL_SNAPSHOT_STORE=url, REPL_SNAPSHOT_KEY=secrets.token_hex(32)) as c,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
    ):
        sids = [f"m{i:02d}-{secrets.token_hex(6)}" for i in range(60)]
        tokens = {sid: secrets.token_hex(8) for sid in sids}

        async def set_state(sid: str) -> str:
            code = f"v = {tokens[sid]!r}\ndef shout():\n    return v.upper()"
            _, replica = await post(http, f"{c.base}/execute/{sid}", code=code)
            return replica

        home = dict(zip(sids, await bounded(10, [set_state(s) for s in sids]), strict=True))
        victim = "r3"
        victims = [sid for sid in sids if home[sid] == victim]
        assert len(victims) >= 5, Counter(home.values())
        started = time.monotonic()
        assert await c.replicas[victim].stop(timeout_s=30) == 0
        stop_s = time.monotonic() - started

        async def come_back(sid: str) -> tuple[dict[str, Any], str]:
            return await post(http, f"{c.base}/execute/{sid}", code="print(shout())")

        replies = await bounded(10, [come_back(sid) for sid in sids])
        moved: Counter[str] = Counter()
        for sid, (body, replica) in zip(sids, replies, strict=True):
            assert body["output"] == f"{tokens[sid].upper()}\n", (sid, body)
            if home[sid] == victim:
                assert replica != victim
                assert body["restored"]["reason"] == "moved", body
                assert body["restored"]["skipped"] == {} and body["restarted"] is False
                moved[replica] += 1
            else:
                assert replica == home[sid] and "restored" not in body, (sid, body)
    print(
        f"\nsnapshots through nginx: stopped {victim} holding {len(victims)} of {len(sids)}"
        f" sessions in {stop_s:.2f} s (saves included); all continued with their state on"
        f" {dict(moved)}, each reply saying restored/moved"
    )
