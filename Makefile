# `make demo` trains the quickstart on the embedded synthetic catalog and prints its evaluation;
# `make test` runs the test suite. Each creates or refreshes .venv first (demo installs the
# package, test adds the `test` extra).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: demo test install install-test browser clean clean-runs

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

test: install-test browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# tests/test_serve.py drives the search page in headless Chromium. On a fresh machine (CI runs as
# root) this installs Debian's chromium + chromium-driver; PRODCLIP_SKIP_BROWSER=1 opts out, and the
# test then skips instead of failing.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$${PRODCLIP_SKIP_BROWSER:-0}" = 1 ]; then echo "make: PRODCLIP_SKIP_BROWSER=1: not installing chromium"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO="sudo -n"; \
	  else echo "make: the browser test needs chromium and chromium-driver; install them" \
	    "(apt-get install chromium chromium-driver) or set PRODCLIP_SKIP_BROWSER=1" >&2; exit 1; fi; \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

# `clean` keeps runs/ (every run's checkpoints and results); `clean-runs` deletes it.
clean:
	rm -rf $(VENV) .pytest_cache

clean-runs:
	rm -rf runs
