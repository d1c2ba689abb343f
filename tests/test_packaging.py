"""The install and start commands of the Dockerfile work in a fresh virtual environment."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import venv
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent


def dockerfile_cmd() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)
    assert match, "Dockerfile has no exec-form CMD"
    cmd: list[str] = json.loads(match.group(1))
    assert "RUN pip install . " in text, "the test installs the way the Dockerfile does"
    return cmd


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the package installed non-editable, as the image's `pip install .`."""
    env_dir = tmp_path_factory.mktemp("pkg") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", str(ROOT)],
        check=True,
        timeout=240,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    origin = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('runner_child').origin)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=env_dir,
    ).stdout.strip()
    assert origin.startswith(str(env_dir)), f"runner_child found outside the venv: {origin}"
    return python


@pytest.mark.timeout(300)
async def test_pip_install_and_dockerfile_cmd(installed_python: Path, tmp_path: Path) -> None:
    python = installed_python
    cmd = dockerfile_cmd()
    assert cmd[:3] == ["python", "-m", "replserver"]
    port = free_port()
    args = [str(python), *cmd[1:]]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"  # the image binds 0.0.0.0; tests stay on loopback
    proc = await asyncio.create_subprocess_exec(*args, cwd=tmp_path, start_new_session=True)
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                        assert (await resp.json())["status"] == "ok"
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            url = f"http://127.0.0.1:{port}/execute/pkg"
            code = "import runner_child, sys\nprint(runner_child.__file__.startswith(sys.prefix))"
            async with http.post(url, json={"code": code}) as resp:
                body = await resp.json()
            # The REPL extras (runner_repl.py) are installed next to the child script.
            async with http.post(url, json={"code": "display(6 * 7)\n6 * 7"}) as resp:
                extras = await resp.json()
            # The web REPL page and its files are package data.
            pages = []
            for path in ("/", "/static/app.js", "/static/style.css"):
                async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                    pages.append((resp.status, len(await resp.read())))
        assert body["output"] == "True\n", body
        assert extras["result"] == "42" and extras["displays"] == [{"text/plain": "42"}], extras
        assert all(status == 200 and size > 500 for status, size in pages), pages
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0 or proc.returncode == -15
