"""HTTP handlers of completion and inspection: POST /complete/{id} and /inspect/{id}.

A session that does not exist yet is created, as /execute creates it: a page asks for
completions before it has run anything, and builtins, keywords and modules are there
to complete.
"""

from __future__ import annotations

from aiohttp import web

from .completion import JediCache, Op, Query
from .routes import ISOLATION, MANAGER, read_object, session_id

JEDI_CACHE = web.AppKey("jedi_cache", JediCache)


async def _answer(request: web.Request, op: Op) -> web.Response:
    sid = session_id(request)
    query = Query.from_body(op, await read_object(request))
    session = await request.app[MANAGER].get(sid)
    reply = await session.ask(query)
    request.app[JEDI_CACHE].ensure()  # after the answer: it must not compete with it
    return web.json_response(reply)


async def complete(request: web.Request) -> web.Response:
    """{"matches", "cursorStart", "cursorEnd"}: each match replaces code[start:end]."""
    return await _answer(request, "complete")


async def inspect(request: web.Request) -> web.Response:
    """{"found", "data": {"text/plain"}}: signature and docstring at the cursor."""
    return await _answer(request, "inspect")


async def _close_cache(app: web.Application) -> None:
    await app[JEDI_CACHE].close()


def add_routes(app: web.Application) -> list[web.AbstractRoute]:
    """The two routes, and the shared jedi cache they build (after ISOLATION is set)."""
    isolation = app[ISOLATION]
    app[JEDI_CACHE] = JediCache(isolation.python, isolation.runner_dir, enabled=isolation.root)
    app.on_cleanup.append(_close_cache)
    return [
        app.router.add_post("/complete/{session_id}", complete),
        app.router.add_post("/inspect/{session_id}", inspect),
    ]
