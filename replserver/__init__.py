"""replserver: a Python code-execution server with one long-lived child process per session."""

from __future__ import annotations

__version__ = "0.1.0"
