"""Session files: upload, download, delete and list, against hostile session code.

The app runs in-process as root (the default here), so each session has its own uid and,
where the server may mount, its own size-limited tmpfs: the case the confinement is for.
Traversal attempts are sent as raw HTTP bytes, so no client library normalises them first.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from replserver.files import MAX_DEPTH, UPLOAD_PREFIX, SessionDir
from replserver.routes import ISOLATION, MANAGER

from . import servers
from .conftest import Client, MakeClient, execute
from .test_confinement import NOBODY, readable_by_nobody

MiB = 1024 * 1024
QUOTA = 8 * MiB

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="uid separation needs a root server")


@pytest.fixture(params=["tmpfs", "plain-dir"])
async def files_client(make_client: MakeClient, request: pytest.FixtureRequest) -> Client:
    """A root server whose sessions' directories are on their own tmpfs (with a quota), or
    plain directories on the host's disk (REPL_LIMIT_DISK_BYTES=0)."""
    disk = QUOTA if request.param == "tmpfs" else 0
    return await make_client(limit_disk_bytes=disk, max_upload_bytes=4 * MiB, pool_size=1)


@pytest.fixture
def canary() -> Iterator[Path]:
    """A root-only directory outside every session, holding a file no request may touch."""
    place = Path("/tmp") / f"files-canary-{secrets.token_hex(4)}"
    place.mkdir(mode=0o700)
    (place / "canary.txt").write_text(CANARY_TEXT)
    yield place
    shutil.rmtree(place)


CANARY_TEXT = "canary: nothing may read or change this\n"


def assert_canary_intact(place: Path) -> None:
    assert sorted(os.listdir(place)) == ["canary.txt"]
    assert (place / "canary.txt").read_text() == CANARY_TEXT


def session_dir(client: Client, sid: str) -> SessionDir:
    session = client.app[MANAGER].find(sid)
    assert session is not None
    directory = session.files()
    assert directory is not None
    return directory


async def out(client: Client, sid: str, code: str) -> str:
    reply = await execute(client, sid, code)
    assert reply["returnCode"] == 0, reply
    text: str = reply["output"]
    return text


async def raw(
    client: Client,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte (the target unnormalised): status, headers, body."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    fields = {"Host": "test", "Connection": "close", "Content-Length": str(len(body))}
    fields.update(headers or {})
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    writer.write(head.encode("latin-1") + b"\r\n" + body)
    await writer.drain()
    try:
        async with asyncio.timeout(20):
            status_line = await reader.readline()
            answer: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                answer[name.strip().lower()] = value.strip()
            length = int(answer.get("content-length", "-1"))
            data = await (reader.readexactly(length) if length >= 0 else reader.read())
    finally:
        writer.close()
    return int(status_line.split()[1]), answer, data


def detail(body: bytes) -> str:
    parsed: dict[str, Any] = json.loads(body)
    text: str = parsed["detail"]
    return text


# --- round trips ----------------------------------------------------------------------------


async def test_put_creates_the_session_and_its_code_reads_the_file(files_client: Client) -> None:
    blob = bytes(range(256)) * 1000 + b"\x00\xff\r\n"
    resp = await files_client.put("/sessions/f1/files/data/in/blob.bin", data=blob)
    assert resp.status == 201, await resp.text()
    assert await resp.json() == {"path": "data/in/blob.bin", "size": len(blob)}
    code = (
        "import os, hashlib\n"
        "data = open('data/in/blob.bin', 'rb').read()\n"
        "st = os.stat('data/in/blob.bin')\n"
        "print(hashlib.sha256(data).hexdigest(), st.st_uid == os.getuid(), oct(st.st_mode))\n"
        "print(os.stat('data').st_uid == os.getuid(), oct(os.stat('data').st_mode & 0o777))"
    )
    digest, owned, mode, dir_owned, dir_mode = (await out(files_client, "f1", code)).split()
    assert digest == hashlib.sha256(blob).hexdigest()
    assert (owned, mode, dir_owned, dir_mode) == ("True", "0o100600", "True", "0o700")
    resp = await files_client.get("/sessions/f1/files/data/in/blob.bin")
    assert resp.status == 200
    assert await resp.read() == blob
    assert resp.content_type == "application/octet-stream"
    assert resp.headers["Content-Disposition"].startswith("attachment;")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_file_the_code_wrote_is_listed_and_downloadable(files_client: Client) -> None:
    await out(
        files_client,
        "f2",
        "import os\nos.makedirs('out/deep/er')\n"
        "open('out/result.csv', 'w').write('a,b\\n1,2\\n')\n"
        "open('out/deep/er/x.txt', 'w').write('x' * 10)\n"
        "open('top.html', 'w').write('<script>alert(1)</script>')\n"
        "os.symlink('/etc/passwd', 'out/link')\n",
    )
    resp = await files_client.get("/sessions/f2/files")
    assert resp.status == 200
    listing = await resp.json()
    assert [(f["path"], f["size"]) for f in listing["files"]] == [
        ("out/deep/er/x.txt", 10),
        ("out/result.csv", 8),
        ("top.html", 25),
    ]
    assert listing["truncated"] is False
    assert all(f["modified"].endswith("Z") for f in listing["files"])
    resp = await files_client.get("/sessions/f2/files/out/result.csv")
    assert (resp.status, await resp.text()) == (200, "a,b\n1,2\n")
    assert resp.content_type == "text/csv"
    # An HTML file the code made is a download, never a page of the server's origin.
    resp = await files_client.get("/sessions/f2/files/top.html")
    assert resp.headers["Content-Security-Policy"].startswith("sandbox")
    assert resp.headers["Content-Disposition"] == (
        "attachment; filename=\"top.html\"; filename*=UTF-8''top.html"
    )


async def test_delete_and_missing(files_client: Client) -> None:
    resp = await files_client.get("/sessions/nobody-here/files/x.txt")
    assert resp.status == 404
    assert "no session" in (await resp.json())["detail"]
    resp = await files_client.get("/sessions/nobody-here/files")
    assert resp.status == 404
    resp = await files_client.put("/sessions/f3/files/sub/a.txt", data=b"abc")
    assert resp.status == 201
    resp = await files_client.get("/sessions/f3/files/sub/b.txt")
    assert resp.status == 404
    assert "no file" in (await resp.json())["detail"]
    resp = await files_client.get("/sessions/f3/files/sub")
    assert resp.status == 409
    assert "is a directory" in (await resp.json())["detail"]
    resp = await files_client.delete("/sessions/f3/files/sub")
    assert resp.status == 409  # not empty
    resp = await files_client.delete("/sessions/f3/files/sub/a.txt")
    assert (resp.status, await resp.json()) == (200, {"path": "sub/a.txt", "deleted": True})
    assert (await files_client.delete("/sessions/f3/files/sub")).status == 200
    assert await out(files_client, "f3", "import os; print(os.listdir('.'))") == "[]\n"
    assert (await files_client.delete("/sessions/f3/files/sub")).status == 404


async def test_reset_keeps_files_and_delete_ends_them(files_client: Client) -> None:
    await files_client.put("/sessions/f4/files/kept/upload.txt", data=b"uploaded")
    await out(files_client, "f4", "x = 1\nopen('made.txt', 'w').write('made by code')")
    before = session_dir(files_client, "f4").path
    resp = await files_client.post("/reset/f4", json={})
    assert resp.status == 200
    after = session_dir(files_client, "f4").path
    assert after != before  # a new process, with a new directory: the files followed it
    code = (
        "import os\nprint('x' in globals(), open('made.txt').read(),"
        " open('kept/upload.txt').read(), os.stat('made.txt').st_uid == os.getuid())"
    )
    assert await out(files_client, "f4", code) == "False made by code uploaded True\n"
    # A process that dies (killed, crashed) is replaced the same way: the files stay.
    reply = await execute(files_client, "f4", "import os, signal; os.kill(os.getpid(), 9)")
    assert reply["returnCode"] != 0
    assert await out(files_client, "f4", "print(open('made.txt').read())") == "made by code\n"
    after = session_dir(files_client, "f4").path
    resp = await files_client.delete("/sessions/f4")
    assert resp.status == 200
    async with asyncio.timeout(10):
        while after.exists():
            await asyncio.sleep(0.02)
    assert (await files_client.get("/sessions/f4/files/made.txt")).status == 404


async def test_an_idle_session_culled_takes_its_files(files_client: Client) -> None:
    await files_client.put("/sessions/f15/files/a.txt", data=b"a")
    where = session_dir(files_client, "f15").path
    assert files_client.app[MANAGER].cull(now=time.time() + 10**6) >= 1
    async with asyncio.timeout(10):
        while where.exists():
            await asyncio.sleep(0.02)


async def test_large_streamed_upload_past_the_body_limit(make_client: MakeClient) -> None:
    client = await make_client(pool_size=1)  # REPL_MAX_BODY_BYTES stays at its 1 MiB
    size = 24 * MiB
    piece = secrets.token_bytes(MiB)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // MiB):
            yield piece

    resp = await client.put("/sessions/big/files/big.bin", data=body())
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["size"] == size
    digest = hashlib.sha256()
    resp = await client.get("/sessions/big/files/big.bin")
    assert resp.headers["Content-Length"] == str(size)
    async for chunk in resp.content.iter_chunked(MiB):
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(piece * (size // MiB)).hexdigest()


# --- limits ---------------------------------------------------------------------------------


async def test_too_large_content_length_is_refused_before_the_body(files_client: Client) -> None:
    # Headers only: the body never comes, so an answer proves the server did not wait for it.
    status, _, body = await raw(
        files_client, "PUT", "/sessions/f5/files/huge.bin", headers={"Content-Length": str(GiB)}
    )
    assert status == 413
    assert "REPL_MAX_UPLOAD_BYTES" in detail(body)
    assert files_client.app[MANAGER].find("f5") is None


GiB = 1024 * MiB


async def test_chunked_upload_over_the_limit_is_counted(files_client: Client) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(6):  # 6 MiB against a 4 MiB limit, with no Content-Length
            yield b"\0" * MiB

    resp = await files_client.put("/sessions/f6/files/big.bin", data=body())
    assert resp.status == 413
    assert "REPL_MAX_UPLOAD_BYTES" in (await resp.json())["detail"]
    resp = await files_client.get("/sessions/f6/files")
    assert (await resp.json())["files"] == []
    assert await out(files_client, "f6", "import os; print(os.listdir('.'))") == "[]\n"


async def test_an_upload_cut_off_leaves_nothing_behind(files_client: Client) -> None:
    await files_client.put("/sessions/f16/files/keep.txt", data=b"old")
    home = session_dir(files_client, "f16").path
    _, writer = await asyncio.open_connection(files_client.server.host, files_client.server.port)
    writer.write(
        b"PUT /sessions/f16/files/keep.txt HTTP/1.1\r\nHost: t\r\n"
        b"Content-Length: 2000000\r\n\r\n" + b"new" * 100_000
    )
    await writer.drain()
    async with asyncio.timeout(10):  # the upload is under way: its hidden file exists
        while not any(n.startswith(UPLOAD_PREFIX) for n in os.listdir(home)):
            await asyncio.sleep(0.01)
    writer.close()
    async with asyncio.timeout(10):
        while any(n.startswith(UPLOAD_PREFIX) for n in os.listdir(home)):
            await asyncio.sleep(0.01)
    assert os.listdir(home) == ["keep.txt"]
    assert await (await files_client.get("/sessions/f16/files/keep.txt")).read() == b"old"


async def test_the_sessions_file_size_limit_applies_to_uploads(make_client: MakeClient) -> None:
    # The server writes as root, which RLIMIT_FSIZE would not stop: counted instead.
    client = await make_client(limit_file_bytes=MiB, pool_size=1)
    resp = await client.put("/sessions/f13/files/two.bin", data=io.BytesIO(b"\0" * 2 * MiB))
    assert resp.status == 413
    assert "file-size limit" in (await resp.json())["detail"]
    resp = await client.put("/sessions/f13/files/one.bin", data=io.BytesIO(b"\0" * MiB))
    assert resp.status == 201


async def test_quota_filling_upload_gets_507_and_space_comes_back(make_client: MakeClient) -> None:
    client = await make_client(limit_disk_bytes=QUOTA, pool_size=1)
    if client.app[ISOLATION].layers.disk_quota is None:
        pytest.skip("this host refuses the per-session tmpfs: no disk quota to fill")

    async def fill() -> AsyncIterator[bytes]:
        for _ in range(QUOTA // MiB + 1):
            yield b"\1" * MiB

    resp = await client.put("/sessions/f7/files/fill.bin", data=fill())
    assert resp.status == 507
    assert "quota" in (await resp.json())["detail"]
    # Nothing partial is left, and the space is free again for the code and for uploads.
    assert (await (await client.get("/sessions/f7/files")).json())["files"] == []
    code = "open('after.bin', 'wb').write(b'x' * (4 << 20)); print('ok')"
    assert await out(client, "f7", code) == "ok\n"
    resp = await client.put("/sessions/f7/files/small.bin", data=b"\2" * MiB)
    assert resp.status == 201
    # The code fills it; an upload then fails cleanly, and works after the code deletes.
    code = (
        "try:\n"
        "    open('fill.bin', 'wb').write(b'x' * (16 << 20))\n"
        "except OSError as exc:\n"
        "    print(exc.errno)"
    )
    assert await out(client, "f7", code) == "28\n"
    assert (await client.put("/sessions/f7/files/more.bin", data=b"\3" * MiB)).status == 507
    await out(client, "f7", "import os; os.remove('fill.bin')")
    assert (await client.put("/sessions/f7/files/more.bin", data=b"\3" * MiB)).status == 201


# --- paths ----------------------------------------------------------------------------------

# Every path below is sent as these exact bytes; none may reach the canary, which sits at
# /tmp/<canary>/canary.txt in the server's view (sessions' /tmp is their own).
TRAVERSALS = [
    "../../../../../../tmp/{c}/canary.txt",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/tmp/{c}/canary.txt",
    "..%2f..%2f..%2f..%2f..%2f..%2ftmp%2f{c}%2fcanary.txt",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2ftmp%2f{c}%2fcanary.txt",
    "%252e%252e%252f%252e%252e%252ftmp%252f{c}%252fcanary.txt",
    "a/../../../../../../../tmp/{c}/canary.txt",
    "%2ftmp%2f{c}%2fcanary.txt",
    "/tmp/{c}/canary.txt",
    "..\\..\\..\\tmp\\{c}\\canary.txt",
    "..%5c..%5c..%5ctmp%5c{c}%5ccanary.txt",
    "./canary.txt",
    "a//canary.txt",
    "canary.txt%00.png",
    "%c0%ae%c0%ae/%c0%ae%c0%ae/tmp/{c}/canary.txt",
    "x" * 300,
]


async def test_encoded_traversal_never_escapes(files_client: Client, canary: Path) -> None:
    await files_client.put("/sessions/f8/files/inside.txt", data=b"inside")
    answers = []
    for template in TRAVERSALS:
        target = "/sessions/f8/files/" + template.format(c=canary.name)
        for method in ("GET", "PUT", "DELETE"):
            status, _, body = await raw(files_client, method, target, b"evil" * 4)
            answers.append((method, template, status, body[:120]))
            assert CANARY_TEXT.encode() not in body
            assert status in (400, 404, 201, 200), (method, template, status, body)
            if status >= 400:
                json.loads(body)  # a JSON detail, never an HTML error page
    assert_canary_intact(canary)
    # What was accepted was written inside, under a literal name: double encoding is one
    # decoding only; an overlong UTF-8 sequence is not a dot.
    listing = await (await files_client.get("/sessions/f8/files")).json()
    for entry in listing["files"]:
        assert entry["path"] == "inside.txt" or "%2e" in entry["path"] or "%c0" in entry["path"]
    print("\n".join(f"{m} {t[:60]!r}: {s} {b!r}" for m, t, s, b in answers))


# --- hostile session code -------------------------------------------------------------------


async def test_planted_symlinks_are_never_followed(files_client: Client, canary: Path) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    await out(
        files_client,
        "f9",
        "import os\n"
        "os.symlink('/etc/passwd', 'pw')\n"
        "os.symlink('/', 'root')\n"
        f"os.symlink('/tmp/{canary.name}', 'canary-dir')\n"
        f"os.symlink('/tmp/{canary.name}/canary.txt', 'canary.txt')\n"
        "os.mkfifo('fifo')",
    )
    answers = {}
    for path in ("pw", "root/etc/passwd", "canary-dir/canary.txt", "canary.txt", "fifo"):
        resp = await files_client.get(f"/sessions/f9/files/{path}")
        body = await resp.read()
        answers[f"GET {path}"] = resp.status
        assert resp.status in (403, 404), (path, resp.status, body)
        assert passwd not in body and CANARY_TEXT.encode() not in body
        assert "detail" in json.loads(body)
    for path in ("pw", "root/etc/passwd", "canary-dir/new.txt", "canary.txt", "root/tmp/x"):
        resp = await files_client.put(f"/sessions/f9/files/{path}", data=b"owned\n")
        answers[f"PUT {path}"] = resp.status
        assert resp.status == 403, (path, resp.status, await resp.text())
    assert answers["GET fifo"] == 403
    assert Path("/etc/passwd").read_bytes() == passwd
    assert not Path("/tmp/x").exists()
    assert_canary_intact(canary)
    # Deleting a link removes the link, not what it points to.
    assert (await files_client.delete("/sessions/f9/files/pw")).status == 200
    assert Path("/etc/passwd").read_bytes() == passwd
    print(answers)


async def test_hard_link_to_a_root_owned_file_is_refused(files_client: Client) -> None:
    await files_client.put("/sessions/f10/files/mine.txt", data=b"mine")
    directory = session_dir(files_client, "f10")
    # The session cannot link a root-owned file in itself (protected_hardlinks, and its
    # tmpfs is its own filesystem): made here as root, for the server to meet as if it could.
    # Linked within one mount: the workdir is a bind of <base>/fs-<name>/home (sessionfs.py)
    # where the server mounts; a plain directory of <base> where it does not.
    root = directory.path.with_name("f" + directory.path.name)
    holder, home = (
        (root, root / "home") if root.is_dir() else (directory.path.parent, directory.path)
    )
    secret = holder / f"root-secret-{secrets.token_hex(3)}"
    secret.write_bytes(b"root's secret")
    secret.chmod(0o600)
    try:
        os.link(secret, home / "hl")
        resp = await files_client.get("/sessions/f10/files/hl")
        assert resp.status == 403
        assert "another user" in (await resp.json())["detail"]
        resp = await files_client.put("/sessions/f10/files/hl", data=b"overwritten")
        assert resp.status == 403
        assert secret.read_bytes() == b"root's secret"
        listing = await (await files_client.get("/sessions/f10/files")).json()
        assert [f["path"] for f in listing["files"]] == ["mine.txt"]
    finally:
        secret.unlink()


# renameat2(RENAME_EXCHANGE) swaps the directory 'd' and a symlink 'dl' to the canary's
# directory atomically, as fast as it can: 'd' is never missing (a request would otherwise
# make it afresh), and is the link about half of the time.
SWAPPER = """
import os, subprocess, sys
loop = '''
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs('d/sub', exist_ok=True)
open('d/sub/inside.txt', 'w').write('inside')
os.symlink({target!r}, 'dl')
end = time.monotonic() + 60
swaps = 0
while time.monotonic() < end and not os.path.exists('stop'):
    for _ in range(100):
        if libc.renameat2(-100, b'd', -100, b'dl', 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
            swaps += 1
open('swaps', 'w').write(str(swaps))
'''
subprocess.Popen([sys.executable, '-c', loop])
print('started')
"""


async def test_a_directory_swapped_for_a_link_during_requests(
    files_client: Client, canary: Path
) -> None:
    await out(files_client, "f11", SWAPPER.format(target=f"/tmp/{canary.name}"))
    async with asyncio.timeout(10):
        while (await files_client.get("/sessions/f11/files/d/sub/inside.txt")).status == 404:
            await asyncio.sleep(0.02)  # the loop has not made its directory yet
    statuses: dict[str, int] = {}
    try:
        for i in range(300):
            put = await files_client.put(f"/sessions/f11/files/d/sub/up-{i}.txt", data=b"u")
            get = await files_client.get("/sessions/f11/files/d/sub/inside.txt")
            body = await get.read()
            get2 = await files_client.get("/sessions/f11/files/d/canary.txt")
            body2 = await get2.read()
            assert CANARY_TEXT.encode() not in body + body2
            assert get.status in (200, 403, 404, 409), (get.status, body)
            assert put.status in (201, 403, 404, 409), (put.status, await put.text())
            assert get2.status in (403, 404, 409), (get2.status, body2)
            for key in (f"PUT {put.status}", f"GET {get.status}", f"GET-canary {get2.status}"):
                statuses[key] = statuses.get(key, 0) + 1
            assert_canary_intact(canary)
    finally:
        await out(files_client, "f11", "open('stop', 'w').close()")
    async with asyncio.timeout(20):
        while "swaps" not in await out(files_client, "f11", "import os; print(os.listdir())"):
            await asyncio.sleep(0.05)
    swaps = int(await out(files_client, "f11", "print(open('swaps').read())"))
    files_url = "/sessions/f11/files"
    assert_canary_intact(canary)
    # The race happened: the code swapped many times and some requests met the link.
    assert swaps > 1000
    assert statuses.get("PUT 201", 0) > 0 and statuses.get("GET 200", 0) > 0, statuses
    assert statuses.get("PUT 403", 0) > 0 and statuses.get("GET 403", 0) > 0, statuses
    # Every upload that succeeded is inside: in 'd' or in 'dl', whichever name the real
    # directory has now.
    listed = [f["path"] for f in (await (await files_client.get(files_url)).json())["files"]]
    uploaded = [p for p in listed if "/up-" in p]
    assert len(uploaded) == statuses["PUT 201"]
    assert all(p.startswith(("d/sub/up-", "dl/sub/up-")) for p in uploaded)
    print(f"swaps={swaps} {statuses}")


async def test_listing_is_bounded_in_depth(files_client: Client) -> None:
    deep = "/".join(["d"] * (MAX_DEPTH + 5))
    await out(
        files_client,
        "f12",
        f"import os\nos.makedirs({deep!r})\nopen({deep!r} + '/x', 'w').close()\n"
        "open('top.txt', 'w').close()",
    )
    listing = await (await files_client.get("/sessions/f12/files")).json()
    assert listing["truncated"] is True
    assert "top.txt" in [f["path"] for f in listing["files"]]


async def test_listing_is_bounded_in_count(files_client: Client) -> None:
    await out(
        files_client,
        "f14",
        "import os\nfor d in ('a', 'b'):\n    os.mkdir(d)\n"
        "    for i in range(6):\n        open(f'{d}/{i}', 'w').close()",
    )
    directory = session_dir(files_client, "f14")
    files, truncated = await asyncio.to_thread(directory.listing, limit=12)
    assert (len(files), truncated) == (12, False)
    files, truncated = await asyncio.to_thread(directory.listing, limit=8)
    assert (len(files), truncated) == (8, True)


# --- a real `python -m replserver` ----------------------------------------------------------


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def test_real_server_streams_big_files_in_bounded_memory(
    tmp_path: Path, canary: Path
) -> None:
    size = 96 * MiB  # under the default REPL_MAX_UPLOAD_BYTES (100 MiB)
    piece = secrets.token_bytes(MiB)
    replica = await servers.start(
        None,
        log=tmp_path / "server.log",
        REPL_LIMIT_DISK_BYTES=str(256 * MiB),
        REPL_POOL_SIZE="1",
    )
    try:
        await replica.wait_ready()
        base = f"{replica.base}/sessions/real/files"
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{base}/warm-up.txt", data=b"x") as resp:
                assert resp.status == 201
            pid = replica.proc.pid
            # Peak RSS from here on: writing 5 to clear_refs resets VmHWM to the current RSS.
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            before = memory_kib(pid, "VmHWM")

            async def body() -> AsyncIterator[bytes]:
                for _ in range(size // MiB):
                    yield piece

            async with http.put(f"{base}/big.bin", data=body()) as resp:
                assert resp.status == 201, await resp.text()
            digest = hashlib.sha256()
            async with http.get(f"{base}/big.bin") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(MiB):
                    digest.update(chunk)
            assert digest.hexdigest() == hashlib.sha256(piece * (size // MiB)).hexdigest()
            grown_mib = (memory_kib(pid, "VmHWM") - before) / 1024
            # 96 MiB went through; the server's peak grew by a few chunks' worth at most.
            assert grown_mib < 24, grown_mib
            # The traversals and planted links meet the same refusals in this process.
            async with http.put(f"{base}/ok.txt", data=b"ok") as resp:
                assert resp.status == 201
            for target in TRAVERSALS[:8]:
                url = yarl.URL(f"{base}/{target.format(c=canary.name)}", encoded=True)
                async with http.get(url) as resp:
                    assert resp.status in (400, 404), (target, resp.status)
                    assert CANARY_TEXT.encode() not in await resp.read()
            async with http.post(
                f"{replica.base}/execute/real",
                json={"code": f"import os; os.symlink('/tmp/{canary.name}', 'c')"},
            ) as resp:
                assert (await resp.json())["returnCode"] == 0
            async with http.get(f"{base}/c/canary.txt") as resp:
                assert resp.status == 403
            async with http.put(f"{base}/c/new.txt", data=b"x") as resp:
                assert resp.status == 403
            assert_canary_intact(canary)
        print(f"server peak RSS grew {grown_mib:.1f} MiB for a {size // MiB} MiB round trip")
    finally:
        await replica.stop()


async def test_a_server_running_as_nobody_follows_no_link_either(
    tmp_path: Path, canary: Path
) -> None:
    """Without root the code has the server's uid: links are still refused, files are its."""
    if not await readable_by_nobody():
        pytest.skip("this checkout or its venv is not readable by nobody")
    # A canary nobody may read: if the server followed a link, the content would show.
    canary.chmod(0o755)
    (canary / "canary.txt").chmod(0o644)
    replica = await servers.start(None, prefix=NOBODY, log=tmp_path / "nobody.log")
    try:
        await replica.wait_ready()
        base = f"{replica.base}/sessions/nb/files"
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{base}/in/a.txt", data=b"abc") as resp:
                assert resp.status == 201, await resp.text()
            code = (
                f"import os; os.symlink('{canary}', 'c'); os.symlink('{canary}/canary.txt', 'f')\n"
                "print(open('in/a.txt').read())"
            )
            async with http.post(f"{replica.base}/execute/nb", json={"code": code}) as resp:
                assert (await resp.json())["output"] == "abc\n"
            for path in ("c/canary.txt", "f"):
                async with http.get(f"{base}/{path}") as resp:
                    assert resp.status == 403, path
                    assert CANARY_TEXT.encode() not in await resp.read()
                async with http.put(f"{base}/{path}", data=b"x") as resp:
                    assert resp.status == 403, path
            async with http.get(f"{base}/in/a.txt") as resp:
                assert await resp.read() == b"abc"
        assert_canary_intact(canary)
    finally:
        await replica.stop()
