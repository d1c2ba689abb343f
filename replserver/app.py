"""The application factory: settings, sessions, routes, CORS and shutdown wired together."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp_cors
from aiohttp import web
from aiohttp.typedefs import Middleware

from . import completion_routes, file_routes, probe, routes
from .isolation import Isolation
from .manager import SessionManager
from .metrics import Metrics
from .middleware import json_errors, require_token
from .settings import Settings

ResponseHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def _cors_defaults(settings: Settings) -> dict[str, aiohttp_cors.ResourceOptions]:
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False, expose_headers="*", allow_headers="*", allow_methods="*"
    )
    origins = ("*",) if settings.development else settings.cors_origins
    return {origin: options for origin in origins}


async def _start(app: web.Application) -> None:
    try:
        await probe.verify(app[routes.SETTINGS], app[routes.ISOLATION])
    except BaseException:
        # aiohttp runs no cleanup after a failed start-up: directories, uid locks and
        # cgroups go now, or outlive the server.
        await app[routes.MANAGER].close_all()
        raise
    app[routes.MANAGER].start()


def _stamp_replica(replica_id: str) -> ResponseHook:
    """X-Replica on every response, streams and errors included: behind a balancer, the
    client sees which replica holds its session (on_response_prepare runs for all)."""

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Replica"] = replica_id

    return stamp


async def _close_sessions(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for open requests: ending the children first
    # lets streams of never-ending code finish instead of holding shutdown up.
    await app[routes.MANAGER].close_all()


def create_app(settings: Settings | None = None) -> web.Application:
    """A ready-to-run application; `settings` defaults to the environment's."""
    settings = settings or Settings.from_env()
    # json_errors outermost: a refused token leaves as JSON too.
    # Without a token there is nothing to check: no middleware, one await less per request.
    middlewares: list[Middleware] = [json_errors]
    if settings.api_token:
        middlewares.append(require_token(settings.api_token))
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[routes.SETTINGS] = settings
    isolation = Isolation(settings)
    app[routes.ISOLATION] = isolation
    metrics = Metrics()
    app[routes.METRICS] = metrics
    app[routes.MANAGER] = SessionManager(settings, isolation, metrics)
    app.on_startup.append(_start)
    app.on_response_prepare.append(_stamp_replica(settings.replica_id))
    app.on_shutdown.append(_close_sessions)
    app.on_cleanup.append(_close_sessions)
    cors = aiohttp_cors.setup(app, defaults=_cors_defaults(settings))
    for route in (
        *routes.add_routes(app),
        *completion_routes.add_routes(app),
        *file_routes.add_routes(app),
    ):
        cors.add(route)
    return app
