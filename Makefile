# One command surface for humans and CI: `make run` serves, `make test` checks everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run dev test check lint format type-check pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Editable in "compat" mode: a plain path entry, so runner_child.py is found in this tree
# and the child pays for no import hook at start-up.
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

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
