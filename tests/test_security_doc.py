"""SECURITY.md names the test behind each promise: every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def test_every_test_security_md_names_exists() -> None:
    text = (ROOT / "SECURITY.md").read_text()
    cited = set(CITATION.findall(text))
    assert len(cited) > 30, "SECURITY.md names the tests behind its promises"
    missing = [
        f"{file}::{name}"
        for file, name in sorted(cited)
        if not re.search(
            rf"^(async )?def {name}\(", (ROOT / "tests" / file).read_text(), flags=re.MULTILINE
        )
    ]
    assert not missing, f"SECURITY.md names tests that do not exist: {missing}"
