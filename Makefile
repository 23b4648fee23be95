# `make demo` trains the quickstart on the embedded synthetic catalog and prints its evaluation;
# `make test` runs the test suite. Each creates or refreshes .venv first (demo installs the
# package, test adds the `test` extra).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: demo test install install-test clean clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	rm -rf $(DEMO_WORKDIR)
	$(BIN)/prodclip train --config configs/quickstart.py --workdir $(DEMO_WORKDIR)

test: install-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# `clean` keeps runs/ (every run's checkpoints and results); `clean-runs` deletes it.
clean:
	rm -rf $(VENV) .pytest_cache

clean-runs:
	rm -rf runs
