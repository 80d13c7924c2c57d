# Two entry points (see README): `make demo` and `make test`.
# Each installs what it needs by itself into .venv (pinned CPU torch from local disk).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tangentlab-installed

.PHONY: demo test install data lint bench-kernel bench-deps

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tangentlab forecast --example fashion-lite0 --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest -q -m "not slow" tests
	$(VENV)/bin/pytest -q -m slow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench-kernel: $(STAMP)
	$(PY) benchmarks/kernel.py

# the issue-13 benchmarks' extra weights and data (holdout*.py, deephead.py, subspace.py)
bench-deps: $(STAMP)
	bash scripts/install_bench.sh $(VENV)
