"""Preloaded modules and startup code: what every child does before it joins the warm pool.

REPL_PRELOAD names modules each child imports before it is ready, so a session's first
`import numpy` is free; REPL_STARTUP names a Python file whose code runs in every new
namespace (each new session, each reset). The server reads the file once, at start, and
hands its text to the children (their uid may not be able to read it). The children
report what happened (replchild/startup.py); a failure is logged and shown in /health, and
never stops a child from serving.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from .settings import MAX_PRELOAD, Settings

log = logging.getLogger(__name__)

# The text travels in one environment variable, which Linux caps at 128 KiB.
MAX_STARTUP_BYTES = 100 * 1024


@functools.lru_cache(maxsize=8)
def read_startup(path: str) -> str:
    """The startup file's text; ValueError if it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STARTUP_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"REPL_STARTUP={path!r} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_STARTUP_BYTES:
        raise ValueError(f"REPL_STARTUP={path!r} is over {MAX_STARTUP_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"REPL_STARTUP={path!r} is not UTF-8 text") from None
    if "\0" in text:
        raise ValueError(f"REPL_STARTUP={path!r} contains a NUL byte")
    return text


def startup_environment(settings: Settings) -> dict[str, str]:
    """The child's environment variables for preloads and startup code (none if unset)."""
    env = {}
    if settings.preload:
        env["REPL_PRELOAD"] = ",".join(settings.preload)
    if settings.startup:
        env["REPL_STARTUP"] = os.path.abspath(settings.startup)
        env["REPL_STARTUP_CODE"] = read_startup(settings.startup)
    return env


@dataclass(frozen=True, slots=True)
class StartupReport:
    """What one child's preloads and startup code did, as it reported it."""

    loaded: tuple[str, ...]
    failed: dict[str, str]
    startup_error: str | None

    @classmethod
    def decode(cls, payload: bytes) -> StartupReport:
        """The report from the child's JSON; ValueError if it is malformed."""
        try:
            data = json.loads(payload)
        except ValueError:
            raise ValueError("malformed start-up report") from None
        if not isinstance(data, dict):
            raise ValueError("malformed start-up report")
        loaded, failed, error = data.get("loaded"), data.get("failed"), data.get("startupError")
        if (
            not isinstance(loaded, list)
            or not isinstance(failed, dict)
            or len(loaded) + len(failed) > MAX_PRELOAD
            or not all(isinstance(m, str) for m in loaded)
            or not all(isinstance(v, str) for v in failed.values())
            or not (error is None or isinstance(error, str))
        ):
            raise ValueError("malformed start-up report")
        return cls(tuple(loaded), dict(failed), error)


class PreloadStatus:
    """What the latest child reported, for /health; each new kind of failure is logged."""

    def __init__(self, settings: Settings) -> None:
        self.modules = settings.preload
        self.startup = settings.startup
        self.latest: StartupReport | None = None
        self._logged: set[str] = set()  # failures already in the log (one line per kind)

    def record(self, report: StartupReport | None) -> None:
        if report is None:
            return
        self.latest = report
        for module, error in report.failed.items():
            self._log_once(f"REPL_PRELOAD: module {module!r} failed to import: {error}")
        if report.startup_error:
            self._log_once(f"REPL_STARTUP: the startup code raised:\n{report.startup_error}")

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.warning("%s", message)

    def as_json(self) -> dict[str, Any]:
        latest = self.latest
        return {
            "modules": list(self.modules),
            "loaded": list(latest.loaded) if latest else [],
            "failed": dict(latest.failed) if latest else {},
        }
