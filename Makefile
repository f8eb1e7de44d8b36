# mailwarden — see README.md.  `make test` works on a fresh Debian machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: deps venv test unit lint demo demo-stop demo-directory demo-directory-stop bench clean

deps: $(STAMP)

$(STAMP): pyproject.toml scripts/install-deps.sh
	scripts/install-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

## lint + types, then the whole suite (real slapd and redis-server) with coverage
test: deps lint
	$(BIN)/pytest --cov --cov-report=term $(PYTEST_ARGS)

## fast tests only (fakes, no daemons)
unit: deps
	$(BIN)/pytest -m "not slapd and not redis" $(PYTEST_ARGS)

lint: deps
	$(BIN)/ruff check .
	$(BIN)/mypy

## the whole topology in containers (front, mailbox hosts, slapd, redis, DNS, Internet host)
demo: deps
	$(BIN)/python -m harness.demo_stack up

demo-stop:
	$(BIN)/python -m harness.demo_stack down

## only the directory: slapd with the sample data + redis on loopback (seconds, no Docker)
demo-directory: deps
	$(BIN)/python -m harness.demo up

demo-directory-stop:
	$(BIN)/python -m harness.demo down

bench: deps
	$(BIN)/python -m bench.bench_policy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage build *.egg-info
