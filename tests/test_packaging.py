"""The install and start commands of the Dockerfile work in a fresh virtual environment."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import aiohttp
import pytest

from replserver.isolation import install_runner

from . import dockerfile
from .dockerfile import DOCKERFILE, ROOT


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
    # The child's script and package sit side by side in the venv, as the child imports them.
    names = ("runner_child", "replchild", "replchild.wire")
    code = f"import importlib.util as u\nfor n in {names}: print(u.find_spec(n).origin)"
    origins = subprocess.run(
        [python, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=env_dir,
    ).stdout.split()
    runner, package, wire = map(Path, origins)
    assert runner.is_relative_to(env_dir), f"runner_child found outside the venv: {runner}"
    assert package.parent.parent == runner.parent and package.parent.name == "replchild"
    assert wire.parent == package.parent
    # jedi, completion's engine, is a dependency: installed with the package.
    subprocess.run([python, "-c", "import jedi"], check=True, cwd=env_dir)
    return python


def test_install_runner_copies_the_child_package(tmp_path: Path) -> None:
    """What a child's uid gets: the runner and the whole child package, readable, compiled."""
    installed = Path(install_runner(str(ROOT / "runner_child.py"), tmp_path / "runner"))
    sources = sorted(p.name for p in (ROOT / "replchild").glob("*.py"))
    copied = sorted(p.name for p in (installed.parent / "replchild").glob("*.py"))
    assert sources == copied and "wire.py" in copied and "repl.py" in copied
    for module in [installed, *(installed.parent / "replchild").glob("*.py")]:
        assert module.read_bytes() == (ROOT / module.relative_to(installed.parent)).read_bytes()
        assert module.stat().st_mode & 0o777 == 0o644
        cached = module.parent / "__pycache__" / f"{module.stem}.{sys.implementation.cache_tag}.pyc"
        assert cached.is_file(), f"{module.name} is not compiled"


@pytest.mark.timeout(300)
async def test_pip_install_and_dockerfile_cmd(installed_python: Path, tmp_path: Path) -> None:
    """The image's CMD with the image's ENV (all configuration is by environment), its
    HEALTHCHECK command against it, and a graceful stop on its STOPSIGNAL."""
    python = installed_python
    assert "RUN pip install . " in DOCKERFILE.read_text(), "install the way the Dockerfile does"
    cmd = dockerfile.exec_form("CMD")
    assert cmd == ["python", "-m", "replserver"], "flags would override the environment"
    image_env = dockerfile.env()
    assert image_env["REPL_HOST"] == "0.0.0.0"
    port = free_port()
    # The image binds 0.0.0.0:8000; tests stay on loopback, on a free port.
    env = {**os.environ, **image_env, "REPL_HOST": "127.0.0.1", "REPL_PORT": str(port)}
    args = [str(python), *cmd[1:]]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=tmp_path, env=env, start_new_session=True
    )
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
            async with http.post(url, json={"code": "x = 6 * 7\nprint(x)"}) as resp:
                body = await resp.json()
            # The REPL front ends (replchild/repl.py) are installed next to the child script.
            async with http.post(url, json={"code": "display(6 * 7)\n6 * 7"}) as resp:
                extras = await resp.json()
            # Completion's child side (replchild/complete.py) is installed with the package.
            # (This venv sits where the children's uids cannot read it, under a root
            # server: they run the base interpreter, and the stdlib floor answers.)
            complete = f"http://127.0.0.1:{port}/complete/pkg"
            async with http.post(complete, json={"code": "import jso"}) as resp:
                completed = await resp.json()
            assert completed["matches"][:1] == ["json"], completed
            # The web REPL page and its files are package data.
            pages = []
            for path in ("/", "/static/app.js", "/static/editor.js", "/static/style.css"):
                async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                    pages.append((resp.status, len(await resp.read())))
        assert extras["result"] == "42" and extras["displays"] == [{"text/plain": "42"}], extras
        assert all(status == 200 and size > 500 for status, size in pages), pages
        assert body["output"] == "42\n", body
        check = dockerfile.exec_form("HEALTHCHECK")
        assert check[0] == "python"
        health = await asyncio.create_subprocess_exec(str(python), *check[1:], env=env)
        assert await asyncio.wait_for(health.wait(), 10) == 0, "HEALTHCHECK failed"
        stop_signal = dict(dockerfile.instructions())["STOPSIGNAL"]
        started = time.monotonic()
        proc.send_signal(getattr(signal, stop_signal))
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, "the server did not exit cleanly on the image's STOPSIGNAL"
    assert time.monotonic() - started < 5
