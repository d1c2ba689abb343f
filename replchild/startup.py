"""Preloaded modules and startup code for runner_child.py, run before a child is ready.

REPL_PRELOAD's modules are imported into sys.modules (not into the namespace), so that a
session's first `import numpy` finds it loaded; REPL_STARTUP's code runs as a module body
in the fresh namespace. Both run under the child's own uid and limits, their output goes
nowhere, and neither can stop the child from starting: a failure is reported (to the
server for its log and /health, and to the session in its first execution's error).
runner_child.py loads this file only when one of the two is set. Stdlib only.
"""

from __future__ import annotations

import io
import json
import sys

TYPE_CHECKING = False  # typing costs ~10 ms to import; mypy honours this name
if TYPE_CHECKING:
    from typing import Any

MAX_ERROR = 10_000  # characters of one failure's text sent to the server


def prepare(preload: str, name: str, code: str, namespace: dict[str, Any]) -> tuple[bytes, str]:
    """Import the comma-separated `preload` modules, run `code` (from file `name`) in
    `namespace`; the JSON report for the server, and the startup traceback ("" if none)."""
    loaded: list[str] = []
    failed: dict[str, str] = {}
    error = ""
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    try:
        for module in filter(None, (m.strip() for m in preload.split(","))):
            try:
                __import__(module)
            except BaseException as exc:  # noqa: BLE001 - SystemExit in a module is a failure too
                failed[module] = _cut(f"{type(exc).__name__}: {exc}")
            else:
                loaded.append(module)
        if code:
            error = run_startup(name, code, namespace)
    finally:
        sys.stdout, sys.stderr = saved
    report = {"loaded": loaded, "failed": failed, "startupError": _cut(error) or None}
    return json.dumps(report).encode(), error


def run_startup(name: str, code: str, namespace: dict[str, Any]) -> str:
    """Run the startup code as a module body; its traceback without our frame, or ""."""
    import linecache

    # The child's uid may not be able to read the file: the server sent its text.
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    try:
        exec(compile(code, name, "exec", dont_inherit=True), namespace)
    except BaseException as exc:  # noqa: BLE001 - whatever it raised is reported
        import traceback

        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        lines = traceback.format_exception(type(exc), exc, tb)
        return f"Error in the startup code ({name}):\n" + "".join(lines)
    return ""


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "..."
