"""Reading the Dockerfile the way the tests need it: instructions, ENV, CMD, HEALTHCHECK."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) in order, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    result = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def env() -> dict[str, str]:
    """Every variable the image's ENV instructions set."""
    values: dict[str, str] = {}
    for keyword, rest in instructions():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                values[name] = value
    return values


def exec_form(keyword: str) -> list[str]:
    """The exec-form (JSON) command of CMD, or of HEALTHCHECK's CMD; fails on shell form."""
    for kw, rest in instructions():
        if kw != keyword:
            continue
        if kw == "HEALTHCHECK":
            _, _, rest = rest.partition("CMD ")
        parsed = json.loads(rest)
        assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), rest
        return parsed
    raise AssertionError(f"the Dockerfile has no {keyword}")


def documented_capabilities() -> tuple[set[str], bool]:
    """The capabilities the Dockerfile's comment says the server needs (its --cap-add
    flags), and whether it says no-new-privileges."""
    text = DOCKERFILE.read_text()
    caps = set(re.findall(r"--cap-add (\w+)", text))
    return caps, "--security-opt no-new-privileges" in text
