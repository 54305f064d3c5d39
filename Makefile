# The two quickstart commands: `make demo` and `make test` (see README.md).
# Each creates the virtualenv in .venv from the project's own pinned files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hcd-installed

.PHONY: setup demo test clean-demo

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) tools/demo --workspace=demo_workspace

# One pytest worker per core, each test file on one worker (its module
# fixtures, e.g. the tiny shards, are built once). Much of a test's time is
# single-threaded Python, imports and tracing, so on 2 cores two workers run
# the suite 1.7x faster than one process (9m19s vs 15m50s, same box).
test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -n auto --dist loadfile

clean-demo:
	rm -rf demo_workspace
