"""Server configuration: one frozen dataclass, read from the environment in one place."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

MiB = 1024 * 1024
MAX_PRELOAD = 100  # modules in REPL_PRELOAD (a child's start-up report lists each)


def default_runner_path() -> str:
    """Where runner_child.py is installed (found without importing it)."""
    spec = importlib.util.find_spec("runner_child")
    if spec is None or spec.origin is None:
        raise RuntimeError("runner_child.py is not installed next to the replserver package")
    return spec.origin


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything configurable; each field has an environment variable (see ENV_VARS)."""

    host: str = "127.0.0.1"
    port: int = 8000
    environment: str = "production"
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 * MiB
    # One file uploaded to a session (PUT /sessions/{id}/files/...): streamed to its
    # directory, so not bounded by max_body_bytes; the session's own limits apply too.
    max_upload_bytes: int = 100 * MiB
    # Frames carry at most one output chunk (256 KiB) or one request (the body limit),
    # so this only has to catch corruption before it becomes a huge allocation.
    max_frame_bytes: int = 8 * MiB
    # Unsent output held per stream before the child's pipe is paused (backpressure).
    stream_buffer_bytes: int = 1 * MiB
    # Execution control: wall-clock limits, the interrupt's grace period, output cap.
    timeout_s: float = 30.0
    max_timeout_s: float = 300.0
    interrupt_grace_s: float = 2.0
    max_output_bytes: int = 16 * MiB
    # A repr (the result of a final expression, a display's text) or a prompt longer than
    # this is cut, with a marker saying how long it was.
    max_result_chars: int = 100_000
    # Per-child resource limits (setrlimit, soft = hard); 0 means unlimited.
    limit_memory_bytes: int = 1024 * MiB
    limit_cpu_s: int = 3600
    limit_file_bytes: int = 1024 * MiB
    limit_open_files: int = 1024
    limit_processes: int = 256
    # Everything a session may write (working directory, /tmp, /var/tmp, /dev/shm): the size
    # of its own tmpfs, where the server may mount one (SECURITY.md); 0: no quota, on disk.
    limit_disk_bytes: int = 1024 * MiB
    # "auto": a pids cgroup per child where the server may create one; "off": never.
    cgroups: str = "auto"
    # Isolation (SECURITY.md). "none": no network for user code; "host": the host's.
    network: str = "none"
    # Children of a root server run as distinct uids from this range (gid = uid).
    uid_range: str = "61000-64999"
    # Where per-child private working directories are made ("" = the system temp dir).
    work_dir: str = ""
    # Run each child under bubblewrap (read-only root, private /tmp) where bwrap exists.
    bubblewrap: bool = False
    bubblewrap_path: str = "bwrap"
    # Fork new children from a fork server that has imported the runner (a new session
    # costs a fork, not an interpreter start); off: every child is a fresh interpreter.
    fork_server: bool = True
    # Refuse to start when a configured isolation layer cannot be put in place.
    require_isolation: bool = False
    # Sessions at scale: warm children, idle culling, replay buffers for reattaching.
    pool_size: int = 2
    # The reserve grows up to this when requests find it empty, and shrinks back when idle.
    pool_max: int = 8
    session_idle_s: float = 1800.0
    replay_buffer_bytes: int = 1 * MiB
    log_format: str = "text"
    # One access log line per request costs the server about a tenth of its CPU per
    # small execution (a log record, a formatted time, a write to stderr): opt-in.
    access_log: bool = False
    # API access.
    api_token: str = ""
    max_sessions: int = 64
    python: str = sys.executable
    runner_path: str = field(default_factory=default_runner_path)
    spawn_timeout_s: float = 20.0
    shutdown_grace_s: float = 2.0
    log_level: str = "info"
    # Notebook start-up: modules every child imports before joining the warm pool, and a
    # Python file run in every new namespace (replserver/startup.py).
    preload: tuple[str, ...] = ()
    startup: str = ""
    # Snapshots (replserver/snapshots): where ("" = a directory under the state directory,
    # a path, redis://..., or "off"), their size cap, their lifetime, how long a session is
    # idle before it is saved against a crash (0 = never), and the HMAC key.
    snapshot_store: str = ""
    snapshot_max_bytes: int = 64 * MiB
    snapshot_ttl_s: float = 7 * 24 * 3600.0
    snapshot_idle_s: float = 120.0
    snapshot_key: str = field(default="", repr=False)
    # Names this server in the X-Replica header and /health, so that a client or test
    # behind a load balancer sees which replica answered (the pod name on Kubernetes).
    replica_id: str = field(default_factory=socket.gethostname)

    @property
    def development(self) -> bool:
        return self.environment == "development"

    @property
    def uids(self) -> tuple[int, int]:
        first, _, last = self.uid_range.partition("-")
        try:
            return int(first), int(last or first)
        except ValueError:
            raise ValueError(f"REPL_UID_RANGE={self.uid_range!r} is not FIRST-LAST") from None

    @property
    def rlimits(self) -> dict[str, int]:
        """The child's resource limits by RLIMIT_* suffix, unlimited ones left out."""
        limits = {
            "as": self.limit_memory_bytes,
            "cpu": self.limit_cpu_s,
            "fsize": self.limit_file_bytes,
            "nofile": self.limit_open_files,
            "nproc": self.limit_processes,
        }
        return {name: value for name, value in limits.items() if value > 0}

    def __post_init__(self) -> None:
        self._check_snapshots()
        if self.timeout_s <= 0 or self.max_timeout_s < self.timeout_s:
            raise ValueError("need 0 < REPL_TIMEOUT_S <= REPL_MAX_TIMEOUT_S")
        if self.network not in ("none", "host"):
            raise ValueError("REPL_NETWORK must be 'none' or 'host'")
        first, last = self.uids
        if not 0 < first <= last:
            raise ValueError("REPL_UID_RANGE must be FIRST-LAST with 0 < FIRST <= LAST")
        if self.max_sessions < 1:
            raise ValueError("REPL_MAX_SESSIONS must be at least 1")
        if self.log_format not in ("text", "json"):
            raise ValueError("REPL_LOG_FORMAT must be 'text' or 'json'")
        if self.cgroups not in ("auto", "off"):
            raise ValueError("REPL_CGROUPS must be 'auto' or 'off'")
        if self.max_body_bytes >= self.max_frame_bytes:
            raise ValueError("REPL_MAX_BODY_BYTES must be below REPL_MAX_FRAME_BYTES")
        bad = [name for name in self.preload if not _MODULE_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"REPL_PRELOAD: {bad[0]!r} is not a module name")
        if len(self.preload) > MAX_PRELOAD:
            raise ValueError(f"REPL_PRELOAD: at most {MAX_PRELOAD} modules")
        if self.startup:
            from .startup import read_startup  # here, not above: startup.py imports us

            read_startup(self.startup)  # refuse to start with a file that cannot be used
        if not (self.replica_id.isascii() and self.replica_id.isprintable()):
            raise ValueError("REPL_REPLICA_ID must be printable ASCII (it is sent as a header)")

    def _check_snapshots(self) -> None:
        if self.snapshot_max_bytes < 1024 or self.snapshot_ttl_s <= 0:
            raise ValueError("need REPL_SNAPSHOT_MAX_BYTES >= 1024 and REPL_SNAPSHOT_TTL_S > 0")
        if self.snapshot_store.startswith("redis") and not self.snapshot_key:
            raise ValueError(
                "REPL_SNAPSHOT_KEY is required with a shared snapshot store: whoever can"
                " write to the store must not be able to plant code in a session"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from environment variables, then explicit overrides (CLI flags, tests)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[name] = _parse(name, var, raw, str(types[name]))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _parse(name: str, var: str, raw: str, type_name: str) -> object:
    try:
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered not in _BOOLS:
                raise ValueError
            value: object = _BOOLS[lowered]
        elif type_name == "int":
            value = int(raw)
        elif type_name == "float":
            value = float(raw)
        elif type_name.startswith("tuple"):
            value = tuple(part.strip() for part in raw.split(",") if part.strip())
        else:
            value = raw
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid {type_name} (for {name})") from None
    if isinstance(value, (int, float)) and value < 0:
        raise ValueError(f"{var} must not be negative, got {raw!r}")
    return value


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}

# Field name -> environment variable. The README's configuration table lists the same.
ENV_VARS: dict[str, str] = {
    "host": "REPL_HOST",
    "port": "REPL_PORT",
    "environment": "ENVIRONMENT",
    "cors_origins": "CORS_ORIGINS",
    "max_body_bytes": "REPL_MAX_BODY_BYTES",
    "max_upload_bytes": "REPL_MAX_UPLOAD_BYTES",
    "max_frame_bytes": "REPL_MAX_FRAME_BYTES",
    "stream_buffer_bytes": "REPL_STREAM_BUFFER_BYTES",
    "timeout_s": "REPL_TIMEOUT_S",
    "max_timeout_s": "REPL_MAX_TIMEOUT_S",
    "interrupt_grace_s": "REPL_INTERRUPT_GRACE_S",
    "max_output_bytes": "REPL_MAX_OUTPUT_BYTES",
    "max_result_chars": "REPL_MAX_RESULT_CHARS",
    "limit_memory_bytes": "REPL_LIMIT_MEMORY_BYTES",
    "limit_cpu_s": "REPL_LIMIT_CPU_S",
    "limit_file_bytes": "REPL_LIMIT_FILE_BYTES",
    "limit_open_files": "REPL_LIMIT_OPEN_FILES",
    "limit_processes": "REPL_LIMIT_PROCESSES",
    "limit_disk_bytes": "REPL_LIMIT_DISK_BYTES",
    "cgroups": "REPL_CGROUPS",
    "network": "REPL_NETWORK",
    "uid_range": "REPL_UID_RANGE",
    "work_dir": "REPL_WORK_DIR",
    "bubblewrap": "REPL_BUBBLEWRAP",
    "bubblewrap_path": "REPL_BUBBLEWRAP_PATH",
    "fork_server": "REPL_FORK_SERVER",
    "require_isolation": "REPL_REQUIRE_ISOLATION",
    "pool_size": "REPL_POOL_SIZE",
    "pool_max": "REPL_POOL_MAX",
    "session_idle_s": "REPL_SESSION_IDLE_S",
    "replay_buffer_bytes": "REPL_REPLAY_BUFFER_BYTES",
    "log_format": "REPL_LOG_FORMAT",
    "access_log": "REPL_ACCESS_LOG",
    "api_token": "REPL_API_TOKEN",
    "max_sessions": "REPL_MAX_SESSIONS",
    "python": "REPL_PYTHON",
    "runner_path": "REPL_RUNNER_PATH",
    "spawn_timeout_s": "REPL_SPAWN_TIMEOUT_S",
    "shutdown_grace_s": "REPL_SHUTDOWN_GRACE_S",
    "log_level": "REPL_LOG_LEVEL",
    "replica_id": "REPL_REPLICA_ID",
    "preload": "REPL_PRELOAD",
    "startup": "REPL_STARTUP",
    "snapshot_store": "REPL_SNAPSHOT_STORE",
    "snapshot_max_bytes": "REPL_SNAPSHOT_MAX_BYTES",
    "snapshot_ttl_s": "REPL_SNAPSHOT_TTL_S",
    "snapshot_idle_s": "REPL_SNAPSHOT_IDLE_S",
    "snapshot_key": "REPL_SNAPSHOT_KEY",
}
