# replserver container image: the server and its per-session children in one image.
# Build: docker build -t replserver .    Run: docker run -p 8000:8000 replserver
# Flags for each isolation layer, and running many replicas: docs/deploy.md.
FROM python:3.11-slim

# Configuration is by environment only (README's table): the CMD passes no flags, so
# `docker run -e REPL_PORT=9000 ...` or a Kubernetes env list changes any setting.
# Bytecode is compiled at build time (below), so nothing is written at run time and the
# root filesystem may be mounted read-only.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REPL_HOST=0.0.0.0 \
    REPL_PORT=8000

WORKDIR /app
# Only what the package needs to install: pyproject.toml, README.md (the long description),
# the server package, the child's script and package; `pip install .` brings the runtime
# dependencies only (aiohttp, aiohttp-sse, aiohttp-cors, prometheus-client, cloudpickle,
# redis, orjson), not the dev tools. The tests run
# the same command.
COPY pyproject.toml README.md runner_child.py ./
COPY replserver ./replserver
COPY replchild ./replchild
RUN pip install . && python -m compileall -q /usr/local/lib/python3.11/site-packages

# The server runs as root, on purpose, and user code never does. Each session's process is
# started as its own unprivileged uid from REPL_UID_RANGE, with no groups, no_new_privs,
# seccomp (no sockets but AF_UNIX), a private 0700 directory and, given CAP_SYS_ADMIN, an
# empty network namespace (SECURITY.md). Handing out uids needs CAP_SETUID and CAP_SETGID;
# making each session's directory its own needs CAP_CHOWN, and removing it afterwards
# CAP_DAC_OVERRIDE; stopping a session's processes, which belong to another uid, needs
# CAP_KILL. A non-root USER has none of these after exec (neither Docker nor Kubernetes
# grant ambient capabilities), so every session would share one uid and could signal the
# others' processes and read their files. Those five capabilities are all the server needs
# (tests/test_container.py runs the whole server with only them): drop the rest with
# `docker run --cap-drop ALL --cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add KILL
# --cap-add SETGID --cap-add SETUID --security-opt no-new-privileges` (deploy/k8s does).
WORKDIR /srv
EXPOSE 8000
# SIGTERM: the server stops accepting connections, saves every idle session where a
# snapshot store is configured (REPL_SNAPSHOT_STORE: a mounted directory, or Redis for
# many replicas; at most REPL_TIMEOUT_S), ends every session's process group (all at once:
# stdin closed, SIGTERM, SIGKILL, within REPL_SHUTDOWN_GRACE_S), lets the open requests
# finish, and exits 0: at most 2 x REPL_SHUTDOWN_GRACE_S + 1 s (5 s by default) without
# snapshots, inside Docker's 10 s stop timeout; with them, give `docker stop -t` or the
# grace period (deploy/k8s: 60 s) the save time as well.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('REPL_PORT', '8000'), timeout=2).status != 200)"]
CMD ["python", "-m", "replserver"]
