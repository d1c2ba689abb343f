"""Completion and inspection for runner_child.py: what Tab and Shift+Tab ask of a session.

runner_child.py imports this module on the first query (never at start-up) and calls answer()
with the query's JSON and the session's live namespace. Completion uses jedi's
Interpreter mode where jedi is importable in the child's environment (what IPython uses;
it is imported on the first completion, so idle sessions never pay for it), and the
stdlib's rlcompleter, plus module names and dictionary keys, where it is not.
Inspection looks the dotted name at the cursor up in the live namespace (signature and
docstring by the inspect module), and asks jedi about anything else.

Anything a query touches may run user code (__dir__, __getattr__, properties): output it
writes is kept from the session's stream, warnings are silenced, and a hang is the
server's to interrupt. Stdlib only at import time.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import sys

TYPE_CHECKING = False  # typing costs ~10 ms to import; mypy honours this name
if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import ModuleType
    from typing import Any

MAX_MATCHES = 1000
MAX_TEXT = 100_000  # characters of an inspection before it is cut
MAX_STRING_FORM = 200  # characters of an object's repr in an inspection

_jedi: list[ModuleType | None] = []  # [jedi] or [None] once its import was tried


def answer(request: bytes, namespace: dict[str, Any]) -> bytes:
    """The JSON answer to a JSON query {"op", "code", "cursor"}."""
    query = json.loads(request)
    op, code, cursor = query["op"], query["code"], query["cursor"]
    with _quiet():
        if op == "complete":
            reply: dict[str, Any] = complete(code, cursor, namespace)
        else:
            reply = inspect_at(code, cursor, namespace)
    return json.dumps(reply).encode()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Output and warnings of user code run by a query go nowhere (Python level; what
    reaches fds 1 and 2 arrives at the server outside any execution and is dropped)."""
    import warnings

    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout, sys.stderr = saved


def _load_jedi() -> ModuleType | None:
    """jedi, imported on first use; None where it is not installed."""
    if not _jedi:
        try:
            import jedi
        except ImportError:
            _jedi.append(None)
        else:
            _jedi.append(jedi)
            # In the runner's directory, beside this package (see replserver/completion.py).
            package = os.path.dirname(os.path.abspath(__file__))
            shared = os.path.join(os.path.dirname(package), "jedi-cache")
            if _read_only_for_us(shared):
                jedi.settings.cache_directory = shared
    return _jedi[0]


def _read_only_for_us(path: str) -> bool:
    """The server's pickled parse of jedi's stubs (replserver/completion.py), if there is
    one we cannot write to: a pickle another session could have written is never loaded.
    Elsewhere jedi keeps its cache in our own home, the session's directory."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return info.st_uid != os.getuid() and not info.st_mode & 0o022


def _position(code: str, cursor: int) -> tuple[int, int]:
    """jedi's (line, column) of a character offset: 1-based line, 0-based column. Lines
    end as parso ends them: at \r\n, \r or \n."""
    import re

    lines = re.split(r"\r\n|\r|\n", code[:cursor])
    return len(lines), len(lines[-1])


# --- completion -----------------------------------------------------------------------------
def complete(code: str, cursor: int, namespace: dict[str, Any]) -> dict[str, Any]:
    """{"matches", "cursorStart", "cursorEnd"}: each match replaces code[start:end]."""
    jedi = _load_jedi()
    if jedi is not None:
        try:
            return _jedi_complete(jedi, code, cursor, namespace)
        except Exception:  # noqa: BLE001 - jedi fails on odd input; the floor still answers
            pass
    try:
        start, matches = basic_complete(code[:cursor], namespace)
    except Exception:  # noqa: BLE001 - user code raised in __dir__ or a getattr
        start, matches = cursor, []
    return {"matches": matches[:MAX_MATCHES], "cursorStart": start, "cursorEnd": cursor}


def _jedi_complete(
    jedi: ModuleType, code: str, cursor: int, namespace: dict[str, Any]
) -> dict[str, Any]:
    line, column = _position(code, cursor)
    completions = jedi.Interpreter(code, [namespace]).complete(line, column)
    matches: list[str] = []
    start = cursor
    for item in completions:
        prefix = item.get_completion_prefix_length()
        if not matches:
            start = cursor - prefix
        elif cursor - prefix != start:
            continue  # one replacement range for all matches
        matches.append(item.name_with_symbols)
        if len(matches) >= MAX_MATCHES:
            break
    return {"matches": matches, "cursorStart": start, "cursorEnd": cursor}


# `import a, b.c` / `from a` (module names), `from a.b import c, d` (names in a.b)
_IMPORT = r"^\s*(?:from\s+([\w.]+)\s+import\s+(?:.*,\s*)?|(?:from|import)\s+(?:.*,\s*)?)([\w.]*)\Z"


def basic_complete(before: str, namespace: dict[str, Any]) -> tuple[int, list[str]]:
    """Completion without jedi (the floor): (start, matches) for the text before the cursor."""
    import re

    end = len(before)
    imported = re.search(_IMPORT, before, re.M)
    if imported is not None:
        word = imported.group(2)
        module = imported.group(1)
        found = _module_attributes(module) if module else _module_names(word)
        return end - len(word), sorted(n for n in found if n.startswith(word))
    key = re.search(r"([A-Za-z_][\w.]*)\[\s*(['\"]?)([^'\"\[\]]*)$", before)
    if key is not None:
        target = _resolve(key.group(1), namespace)
        if isinstance(target, dict):
            quote = key.group(2) or "'"
            typed = key.group(3)
            keys = [k for k in target if isinstance(k, str) and k.startswith(typed)]
            start = end - len(typed) - len(key.group(2))
            return start, [f"{quote}{k}{quote}" for k in keys]
    word = re.search(r"[A-Za-z_][\w.]*$|$", before).group(0)  # type: ignore[union-attr]
    import rlcompleter

    completer = rlcompleter.Completer(namespace)
    raw = completer.attr_matches(word) if "." in word else completer.global_matches(word)
    matches = list(dict.fromkeys(m.rstrip("(: ") for m in raw))
    prefix = word.rpartition(".")[0]
    names = [m[len(prefix) + 1 :] if prefix else m for m in matches]
    return end - len(word.rpartition(".")[2]), names


def _module_names(word: str) -> set[str]:
    """Top-level module names (or submodules of an imported package) for `import word`."""
    import pkgutil

    package, _, _ = word.rpartition(".")
    if not package:
        names = {m.name for m in pkgutil.iter_modules()}
        return names | set(sys.builtin_module_names)
    module = sys.modules.get(package)
    path = getattr(module, "__path__", None)
    if path is None:
        return set()
    return {f"{package}.{m.name}" for m in pkgutil.iter_modules(path)}


def _module_attributes(name: str) -> set[str]:
    """Names `from name import` offers, for a module already imported (never imports)."""
    module = sys.modules.get(name)
    names = set(dir(module)) if module is not None else set()
    return {n for n in names if not n.startswith("_")} | _module_names(f"{name}.")


# --- inspection -----------------------------------------------------------------------------
def inspect_at(code: str, cursor: int, namespace: dict[str, Any]) -> dict[str, Any]:
    """{"found", "data": {"text/plain"}}: signature and docstring of what is at the cursor."""
    name, end = name_at(code, cursor)
    text = ""
    if name:
        try:
            text = describe(name, _resolve(name, namespace, strict=True))
        except LookupError:
            pass
        except Exception:  # noqa: BLE001 - a property or __getattr__ of user code raised
            pass
    if name and not text:
        jedi = _load_jedi()  # not in the namespace (not yet run, say): what jedi infers
        if jedi is not None:
            try:
                text = _jedi_describe(jedi, code, end, namespace)
            except Exception:  # noqa: BLE001 - jedi fails on odd input
                text = ""
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + f"\n[... cut: {len(text)} characters in all]"
    return {"found": bool(text), "data": {"text/plain": text} if text else {}}


def name_at(code: str, cursor: int) -> tuple[str, int]:
    """The dotted name under (or just before) the cursor, and where it ends; inside a
    call's parentheses with no name there, the called name, as Shift+Tab in a notebook."""
    import re

    left = re.search(_NAME_BEFORE, code[:cursor]).group(0)  # type: ignore[union-attr]
    right = re.match(r"\w*", code[cursor:]).group(0)  # type: ignore[union-attr]
    if left and not left[0].isdigit():
        end = cursor + len(right)
        return (left + right).rstrip("."), end - (left + right).endswith(".")
    depth = 0
    for at in range(cursor - 1, -1, -1):
        char = code[at]
        if char in ")]}":
            depth += 1
        elif char in "([{":
            if depth or char != "(":
                depth -= 1
                if depth < 0:
                    break
                continue
            callee = code[:at].rstrip()
            return re.search(_NAME_BEFORE, callee).group(0), len(callee)  # type: ignore[union-attr]
    return "", cursor


_NAME_BEFORE = r"[A-Za-z_][\w.]*$|$"


_MISSING = object()


def _resolve(name: str, namespace: dict[str, Any], *, strict: bool = False) -> Any:
    """The object a dotted name stands for in the namespace (or builtins), by getattr only:
    nothing is called or evaluated. LookupError (strict) or None if there is none."""
    first, *rest = name.split(".")
    value = namespace.get(first, _MISSING)
    if value is _MISSING:
        value = getattr(builtins, first, _MISSING)
    for part in rest:
        if value is _MISSING:
            break
        value = getattr(value, part, _MISSING)
    if value is _MISSING:
        if strict:
            raise LookupError(name)
        return None
    return value


def describe(name: str, value: object) -> str:
    """IPython's `name?` in short: signature, type, string form, docstring."""
    import inspect

    lines = []
    if callable(value):
        try:
            lines.append(f"Signature: {name}{inspect.signature(value)}")
        except (TypeError, ValueError):
            pass
    lines.append(f"Type:      {type(value).__name__}")
    if not (inspect.isroutine(value) or inspect.isclass(value) or inspect.ismodule(value)):
        form = repr(value)
        if len(form) > MAX_STRING_FORM:
            form = form[:MAX_STRING_FORM] + "..."
        lines.append(f"String form: {form}")
    module = inspect.getmodule(value)
    if module is not None and getattr(module, "__file__", None):
        lines.append(f"File:      {module.__file__}")
    doc = inspect.getdoc(value)
    lines.append("Docstring:" + (f"\n{doc}" if doc else " <no docstring>"))
    return "\n".join(lines)


def _jedi_describe(jedi: ModuleType, code: str, end: int, namespace: dict[str, Any]) -> str:
    """What jedi infers the name ending at `end` to be: signature and docstring."""
    line, column = _position(code, end)
    names = jedi.Interpreter(code, [namespace]).infer(line, column)
    texts = [n.docstring() for n in names[:3]]
    return "\n\n".join(t for t in texts if t)
