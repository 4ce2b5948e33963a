# CIRIS Billing. `make run` serves the API; `make test` runs every check. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv run test lint browser test-e2e-python test-local test-ha bench soak clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-e clients/python -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Serve on $(HOST):$(PORT) (default 127.0.0.1:8000); migrates first. DATABASE_URL unset: an
## embedded PostgreSQL with its data in .data/postgres (kept; stopped with the service).
run: venv
	$(BIN)/ciris-billing serve --host $(HOST) --port $(PORT)

## Lint, format, types, migrations vs models, and the whole test suite, on PostgreSQL:
## TEST_POSTGRES_URL when it answers, else an embedded server for the run. Two pytest processes
## (PYTEST_WORKERS), each taking whole test files; every process has its own databases.
PYTEST_WORKERS ?= 2
test: venv lint browser
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

lint: venv
	$(BIN)/ruff check src tests scripts bench clients/python
	$(BIN)/ruff format --check src tests scripts bench clients/python
	$(BIN)/mypy
	$(BIN)/python scripts/alembic_check.py >/dev/null

## The browser tests' Chromium: found, else installed (Debian's package when root, else
## Playwright's download), else one line saying how (scripts/provision-browser).
browser: venv
	scripts/provision-browser

## The guide's local stack: Docker Compose (API, PostgreSQL, Prometheus, Grafana) if the engine
## answers, else migrate + serve with local processes.
test-local: venv
	scripts/test-local

## The guide's end-to-end suite: the guide's flows over HTTP, sandbox and Stripe (localstripe).
E2E_TESTS := tests/e2e/test_guide_flow.py tests/payments/test_purchases_sandbox.py \
	tests/webhooks/test_webhooks.py tests/payments/test_refunds_disputes.py \
	tests/e2e/test_e2e_stripe.py tests/operations/test_multiprocess.py \
	tests/checkout/test_checkout.py tests/checkout/test_checkout_browser.py \
	tests/checkout/test_buy_link.py tests/client/test_client.py
test-e2e-python: venv
	$(BIN)/pytest $(E2E_TESTS)

## Real PostgreSQL failovers under load, all on 127.0.0.1 (scripts/ha/): etcd, two Patroni
## nodes in synchronous mode, HAProxy (database -> leader, HTTP -> 3 instances), Redis; freezes
## (SIGSTOP 30 s) the leader's postgres, then its whole node, kills its postgres, then its
## Patroni, freezes an instance 20 s, kills one; after each round `acknowledged but lost` must
## be 0. About 4 minutes (bounded under 10); apt-installs etcd/haproxy/redis if missing, Patroni
## from pyproject.toml's `ha` pins in .venv-ha.
test-ha: venv
	scripts/ha/test-ha

## Throughput and latency of the hot path against PostgreSQL's own limit (prints a table).
bench: venv
	$(BIN)/python bench/run.py

## Minutes of mixed traffic (checks, charges, purchases with webhooks) on PostgreSQL, several
## workers; prints totals that must reconcile exactly (SOAK_SECONDS, SOAK_CONCURRENCY, ...).
soak: venv
	$(BIN)/python scripts/soak.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
