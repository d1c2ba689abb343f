"""`python -m replserver`: run the server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import sys

from aiohttp import web

from . import __version__
from .app import create_app
from .metrics import AccessLogger, JsonAccessLogger
from .settings import ENV_VARS, Settings

log = logging.getLogger("replserver")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m replserver", description=__doc__)
    parser.add_argument(
        "--host", help=f"address to bind (env {ENV_VARS['host']}, default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, help=f"port (env {ENV_VARS['port']}, default 8000)")
    parser.add_argument("--log-level", help=f"env {ENV_VARS['log_level']}, default info")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(host=args.host, port=args.port, log_level=args.log_level)
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"replserver: {exc}\n")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Our formats show no process, thread or task: a record need not look them up (a
    # getpid() syscall and more for each access log line, one line per request).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]  # 3.12+
    try:
        serve(settings)
    except RuntimeError as exc:  # start-up refused (REPL_REQUIRE_ISOLATION, no confinement)
        log.error("%s", exc)
        raise SystemExit(1) from None


def prepare_process() -> None:
    """Process-wide settings a server with many children needs."""
    # Each session holds four descriptors (two protocol pipes, two output pipes): lift the
    # soft limit to the hard one so a thousand sessions fit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if sys.version_info < (3, 12):
        # Python 3.11 waits for each child in a thread of its own; a pidfd per child in the
        # event loop (3.12's default where available) scales to a thousand sessions.
        with contextlib.suppress(OSError, AttributeError):
            os.close(os.pidfd_open(os.getpid()))
            asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


async def _freeze_heap(app: web.Application) -> None:
    """Everything made during start-up (modules, the app, the routes) lives as long as the
    process: out of the collector's sight, a full collection no longer walks those ~40,000
    objects (17 to 90 ms here) in the middle of some request."""
    gc.freeze()


async def _stop_once(app: web.Application) -> None:
    """Shut down on the first SIGTERM or SIGINT; ignore the ones that follow.

    aiohttp's own handler raises GracefulExit on every signal, and a second one makes
    run_app cancel every task mid-shutdown: snapshot saves are cut short, and on Python
    3.11 and 3.12 a child start cancelled while its pipes connect never finishes (its
    exit waiters wait for a pipe task that was cancelled too), so the server never exits.
    A second signal is not always somebody's: a child forked by Popen is in the server's
    process group until its setsid(), and a group signal caught there reaches this
    process a second time through the wakeup descriptor the fork copied."""
    loop = asyncio.get_running_loop()
    stopping = False

    def stop(sig: signal.Signals) -> None:
        nonlocal stopping
        if stopping:
            log.info("%s while shutting down: ignored, the shutdown goes on", sig.name)
            return
        stopping = True
        log.info("%s: shutting down", sig.name)
        raise web.GracefulExit()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)


def serve(settings: Settings) -> None:
    prepare_process()
    app = create_app(settings)
    app.on_startup.append(_freeze_heap)  # after create_app's own start-up work
    app.on_startup.append(_stop_once)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log_class=JsonAccessLogger if settings.log_format == "json" else AccessLogger,
        # None: aiohttp makes no access logger, so a request pays for none of it.
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        shutdown_timeout=settings.shutdown_grace_s + 1,
        handle_signals=False,  # _stop_once instead
        print=lambda msg: log.info(
            "replserver %s listening on http://%s:%s", __version__, settings.host, settings.port
        ),
    )


if __name__ == "__main__":
    main()
