"""HTTP handlers of session files: upload, download, delete and list (files.py does the I/O).

Uploads stream from the request to the session's directory chunk by chunk and downloads
stream back, each blocking step in a thread, so neither a large file nor a slow disk holds
the event loop or the server's memory.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import os
import time
from urllib.parse import quote

from aiohttp import web

from .errors import NotFound
from .files import CHUNK_BYTES, FileError, SessionDir, Upload, read_chunk, split_path
from .routes import MANAGER, SETTINGS, session_id
from .session import Session

log = logging.getLogger(__name__)

# A session's files are the code's output, hostile: a browser must download them, never
# render one as a page of this origin (an .html file would otherwise run as our own script).
DOWNLOAD_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "Cache-Control": "no-store",
}


def _session(request: web.Request) -> Session:
    sid = session_id(request)
    session = request.app[MANAGER].find(sid)
    if session is None:
        raise NotFound(f"no session {sid!r} on this server")
    return session


def _directory(session: Session) -> SessionDir:
    directory = session.files()
    if directory is None:
        raise FileError("the session has no working directory yet", status=404)
    return directory


def _parts(request: web.Request) -> tuple[str, ...]:
    # match_info is percent-decoded once (%2F included): what the client meant, checked here.
    return split_path(request.match_info["path"])


def _upload_limit(request: web.Request) -> tuple[int, str]:
    settings = request.app[SETTINGS]
    limit, name = settings.max_upload_bytes, "REPL_MAX_UPLOAD_BYTES"
    if 0 < settings.limit_file_bytes < limit:
        limit, name = settings.limit_file_bytes, "the session's file-size limit"
    return limit, name


async def put_file(request: web.Request) -> web.Response:
    """PUT: the raw body becomes the file; a new session is created (with its child)."""
    sid = session_id(request)
    parts = _parts(request)
    limit, limit_name = _upload_limit(request)
    # Before anything is read: a declared size over the limit is refused at once.
    if request.content_length is not None and request.content_length > limit:
        raise FileError(f"the file is larger than {limit_name} ({limit} bytes)", status=413)
    session = await request.app[MANAGER].get(sid)
    await session.ensure_child()
    directory = _directory(session)
    upload: Upload = await asyncio.to_thread(directory.begin_upload, parts)
    try:
        async for chunk in request.content.iter_chunked(CHUNK_BYTES):
            if upload.size + len(chunk) > limit:
                # A chunked body gives no size up front: counted as it comes.
                raise FileError(f"the file is larger than {limit_name} ({limit} bytes)", status=413)
            await asyncio.to_thread(upload.write, chunk)
        await asyncio.to_thread(upload.commit)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(upload.abort))
        raise
    session.last_active = time.time()  # file work is activity: not culled as idle
    return web.json_response({"path": "/".join(parts), "size": upload.size}, status=201)


async def get_file(request: web.Request) -> web.StreamResponse:
    """GET: the file's bytes, streamed, with a type guessed from its name, as a download."""
    parts = _parts(request)
    session = _session(request)
    directory = _directory(session)
    session.last_active = time.time()
    fd, st = await asyncio.to_thread(directory.open_read, parts)
    try:
        ctype, encoding = mimetypes.guess_type(parts[-1])
        if ctype is None or encoding is not None:  # a .gz is sent as the bytes it is
            ctype = "application/octet-stream"
        resp = web.StreamResponse(headers=DOWNLOAD_HEADERS)
        resp.content_type = ctype
        resp.content_length = st.st_size
        resp.headers["Content-Disposition"] = _disposition(parts[-1])
        await resp.prepare(request)
        left = st.st_size
        while left > 0:
            chunk = await asyncio.to_thread(read_chunk, fd, min(CHUNK_BYTES, left))
            if not chunk:
                # Truncated by the code while we sent it: the connection closes short of
                # Content-Length, which the client sees as an incomplete download.
                log.info("%s shrank while it was sent", "/".join(parts))
                resp.force_close()
                break
            await resp.write(chunk)
            left -= len(chunk)
        await resp.write_eof()
        return resp
    finally:
        os.close(fd)


async def delete_file(request: web.Request) -> web.Response:
    parts = _parts(request)
    directory = _directory(_session(request))
    await asyncio.to_thread(directory.delete, parts)
    return web.json_response({"path": "/".join(parts), "deleted": True})


async def list_files(request: web.Request) -> web.Response:
    """The session's regular files, recursively (bounded: see files.MAX_LISTED)."""
    directory = _session(request).files()
    if directory is None:
        return web.json_response({"files": [], "truncated": False})
    files, truncated = await asyncio.to_thread(directory.listing)
    return web.json_response({"files": files, "truncated": truncated})


def _disposition(name: str) -> str:
    """attachment, with the name for old clients (ASCII) and new ones (RFC 6266 UTF-8)."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def add_routes(app: web.Application) -> list[web.AbstractRoute]:
    return [
        app.router.add_get("/sessions/{session_id}/files", list_files),
        app.router.add_put("/sessions/{session_id}/files/{path:.+}", put_file),
        app.router.add_get("/sessions/{session_id}/files/{path:.+}", get_file),
        app.router.add_delete("/sessions/{session_id}/files/{path:.+}", delete_file),
    ]
