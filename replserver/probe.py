"""At start-up, run one child under full confinement and see which layers really hold.

Configured is not the same as in force: a container may refuse namespaces, a kernel may
lack seccomp. The probe child reports what it observes from the inside (its uid, groups,
/proc ownership, sockets, network namespace, directory, root, rlimits, environment and
cgroup), and /health shows that, not the configuration.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from contextlib import aclosing
from typing import Any

from .child import child_environment
from .errors import ChildStartError
from .execution import T_STDOUT
from .isolation import Isolation, Layers
from .pool import ChildPool
from .session import Session
from .settings import Settings

log = logging.getLogger(__name__)

PROBE_CODE = """\
import json, os, socket
seen = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
# A non-dumpable process's /proc files belong to root, whatever its own uid.
seen["procOwner"] = os.stat("/proc/self/mem").st_uid
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    seen["inet"] = "allowed"
except PermissionError:
    seen["inet"] = "refused"
seen["netns"] = os.readlink("/proc/self/ns/net")
seen["cwdMode"] = oct(os.stat(".").st_mode & 0o777)
seen["rootReadOnly"] = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
import resource
seen["rlimits"] = {
    name: resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper()))
    for name in ("as", "cpu", "fsize", "nofile", "nproc")
}
seen["environ"] = sorted(os.environ)
seen["cgroups"] = open("/proc/self/cgroup").read()
# Temporary directories: which they are, whether they are ours to write, on what filesystem.
seen["cwdDev"] = os.stat(".").st_dev
vfs = os.statvfs(".")
seen["cwdBytes"] = vfs.f_blocks * vfs.f_frsize
seen["temp"] = {}
for path in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
    try:
        st = os.stat(path)
    except OSError:
        continue
    seen["temp"][path] = [st.st_dev, st.st_ino, os.access(path, os.W_OK)]
# The seccomp deny-list, seen from a fork: can it make a user namespace, reach the keyrings?
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
pid = os.fork()
if pid == 0:
    code = 0 if libc.unshare(0x10000000) == 0 else ctypes.get_errno()
    os._exit(code)
seen["unshareUser"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
libc.syscall.restype = ctypes.c_long
keyctl = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
seen["keyctl"] = 0 if keyctl is None or libc.syscall(keyctl, 0, -2, 0) >= 0 else ctypes.get_errno()
print(json.dumps(seen))
"""


async def verify(settings: Settings, isolation: Isolation) -> Layers:
    """Update isolation.layers from what a confined child observes; raise if required
    layers are missing (REPL_REQUIRE_ISOLATION)."""
    layers = isolation.layers
    out = await _run_probe_until_it_starts(settings, isolation)
    try:
        seen = json.loads(out)
    except ValueError:
        raise RuntimeError(f"the isolation probe child failed: {out[-500:]!r}") from None
    me = os.getuid()
    layers.uid_separation = isolation.root and seen["uid"] not in (0, me) and not seen["groups"]
    layers.non_dumpable = seen["uid"] != 0 and seen["procOwner"] != seen["uid"]
    layers.network_namespace = seen["netns"] != os.readlink("/proc/self/ns/net")
    layers.seccomp = seen["inet"] == "refused"
    layers.private_workdir = seen["cwdMode"] == "0o700"
    layers.bubblewrap = isolation.bwrap is not None and seen["rootReadOnly"]
    layers.rlimits = all(
        seen["rlimits"][name] == [limit, limit] for name, limit in settings.rlimits.items()
    )
    # Only what the server put there: the variables it passes, less those the runner
    # consumes at start-up.
    layers.minimal_environment = set(seen["environ"]) <= set(child_environment(settings))
    tree = isolation.cgroups
    layers.pids_cgroup = tree is not None and f"/{tree.base.name}/child-" in seen["cgroups"]
    layers.private_tmp, layers.disk_quota = _temp_dirs(seen, settings)
    # Refused kernel interfaces: keyctl by the filter alone; a user namespace by the filter,
    # or under bubblewrap (which needs namespaces itself) by its --disable-userns.
    if seen["keyctl"] == errno.EPERM:
        layers.seccomp_mode = "deny-list" if seen["unshareUser"] != 0 else "partial"
    else:
        layers.seccomp_mode = "off"
    log.info("isolation in force: %s", layers.as_json())
    missing = missing_layers(settings, isolation)
    # Root without CAP_SYS_ADMIN (a default container) falls back to shared temporary
    # directories with umask 077 and a clean-up per uid, and says so in the notes.
    quota = layers.disk_quota or not settings.limit_disk_bytes
    if (isolation.may_mount or not isolation.root) and not (layers.private_tmp and quota):
        missing.append("private temporary directories and a disk quota")
    if isolation.has_seccomp and layers.seccomp_mode != "deny-list":
        missing.append("the seccomp deny-list")
    if missing:
        message = "required isolation layers are not in force: " + ", ".join(missing)
        if settings.require_isolation:
            raise RuntimeError(message + " (REPL_REQUIRE_ISOLATION=1)")
        log.warning("%s", message)
        layers.notes.append(message)
    return layers


def _temp_dirs(seen: dict[str, Any], settings: Settings) -> tuple[bool, int | None]:
    """Private temporary directories (none is the server's, or none writable) and the
    quota over them and the working directory (the size of the one filesystem they share)."""
    private = True
    shared_fs = True
    for path, (dev, ino, writable) in seen["temp"].items():
        try:
            host = os.stat(path)
        except OSError:
            continue
        if writable and (host.st_dev, host.st_ino) == (dev, ino):
            private = False
        if writable and dev != seen["cwdDev"]:
            shared_fs = False
    limit = settings.limit_disk_bytes
    bounded = 0 < seen["cwdBytes"] <= limit + os.sysconf("SC_PAGE_SIZE")
    return private, seen["cwdBytes"] if limit and bounded and shared_fs else None


async def _run_probe_until_it_starts(settings: Settings, isolation: Isolation) -> bytes:
    """The probe's output; when the children's uid may not execute the interpreter, try
    the one it links to, then the server's own uid (RuntimeError once nothing is left)."""
    remedies = iter((isolation.fall_back_to_base_python, isolation.run_children_as_server))
    while True:
        try:
            return await _run_probe(settings, isolation)
        except ChildStartError as exc:
            denied = isinstance(exc.__cause__, PermissionError)
            if not denied or not any(remedy() for remedy in remedies):
                raise RuntimeError(f"cannot start a confined child: {exc}") from None


async def _run_probe(settings: Settings, isolation: Isolation) -> bytes:
    pool = ChildPool(settings, isolation=isolation, size=0)
    session = Session("isolation-probe", settings=settings, pool=pool)
    try:
        run = await session.start(PROBE_CODE, timeout_s=10)
        out = bytearray()
        async with aclosing(run.execution.follow()) as entries:
            async for batch in entries:
                for _, kind, data in batch:
                    if kind == T_STDOUT:
                        out += data
        return bytes(out)
    finally:
        session.close()
        await pool.close()


def missing_layers(settings: Settings, isolation: Isolation) -> list[str]:
    """The configured layers that the probe did not find in force."""
    layers = isolation.layers
    missing = []
    if not layers.uid_separation:
        missing.append(f"uid separation ({isolation.uid_separation_problem})")
    if not layers.non_dumpable:
        missing.append("non-dumpable children")
    if settings.network == "none" and not (layers.network_namespace or layers.seccomp):
        missing.append("network isolation (neither a network namespace nor seccomp)")
    if settings.bubblewrap and not layers.bubblewrap:
        missing.append("bubblewrap")
    return missing
