# One command surface for humans and CI: `make run` serves, `make test` checks everything.
# Children of a root server run as unprivileged uids that must be able to execute the
# venv's interpreter: prefer a system-wide Python 3.11+ (pyenv's under /root is private).
PYTHON ?= $(shell for p in /usr/bin/python3 /usr/local/bin/python3 python3; do \
	$$p -c 'import sys, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run dev test check lint format type-check pytest bench clean page

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Editable in "compat" mode: a plain path entry, so runner_child.py and replchild/ are found
# in this tree and the child pays for no import hook at start-up.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m replserver

dev: $(STAMP)
	ENVIRONMENT=development REPL_LOG_LEVEL=debug $(BIN)/python -m replserver

test: $(STAMP) check pytest

pytest: $(STAMP)
	$(BIN)/python -m pytest

check: lint type-check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

type-check: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/bench.py

# The page's editor bundle (replserver/static/editor.js and its licences), from the npm
# registry through page/package-lock.json; its output is committed, so installing and
# running the server need no Node.
page:
	cd page && npm ci --no-audit --no-fund && node build.mjs

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
