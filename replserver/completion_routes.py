"""HTTP handlers of completion and inspection: POST /complete/{id} and /inspect/{id}.

A session that does not exist yet is created, as /execute creates it: a page asks for
completions before it has run anything, and builtins, keywords and modules are there
to complete.
"""

from __future__ import annotations

from aiohttp import web

from .completion import Op, Query
from .routes import MANAGER, read_object, session_id


async def _answer(request: web.Request, op: Op) -> web.Response:
    sid = session_id(request)
    query = Query.from_body(op, await read_object(request))
    session = await request.app[MANAGER].get(sid)
    return web.json_response(await session.ask(query))


async def complete(request: web.Request) -> web.Response:
    """{"matches", "cursorStart", "cursorEnd"}: each match replaces code[start:end]."""
    return await _answer(request, "complete")


async def inspect(request: web.Request) -> web.Response:
    """{"found", "data": {"text/plain"}}: signature and docstring at the cursor."""
    return await _answer(request, "inspect")


def add_routes(app: web.Application) -> list[web.AbstractRoute]:
    return [
        app.router.add_post("/complete/{session_id}", complete),
        app.router.add_post("/inspect/{session_id}", inspect),
    ]
