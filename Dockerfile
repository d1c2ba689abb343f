# replserver container image: the server and its per-session children in one image.
# Build: docker build -t replserver .    Run: docker run -p 8000:8000 replserver
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package needs to install: pyproject.toml, README.md (the long description),
# the package and the child scripts. The same `pip install .` is exercised by the tests.
COPY pyproject.toml README.md runner_child.py runner_repl.py ./
COPY replserver ./replserver
RUN pip install . && python -m compileall -q /usr/local/lib/python3.11/site-packages \
    && useradd --system --uid 10001 --home-dir /home/repl --create-home repl

USER repl
WORKDIR /home/repl
EXPOSE 8000
# SIGTERM: the server stops accepting, ends every session's process group, and exits.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"
CMD ["python", "-m", "replserver", "--host", "0.0.0.0", "--port", "8000"]
