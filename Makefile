# One entry point for newcomers, CI and operators. Everything runs from a local .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup broker broker-rabbitmq4 postgres receiver-kit demo run receiver test test-rabbitmq4 check lint typecheck chaos chaos-smoke loadtest loadtest-smoke bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml signing/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e './signing[aiohttp,fast]'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

broker:
	scripts/ensure-broker

## A RabbitMQ 4 node on 127.0.0.1:5673, beside the broker on 5672 (built once per machine, as root).
broker-rabbitmq4:
	scripts/ensure-rabbitmq4

postgres:
	scripts/ensure-postgres

## Apache httpd + mod_auth_openidc and Node.js + jose, for the receiver-recipe tests.
receiver-kit:
	scripts/ensure-receiver-kit

## The main job: the whole local loop once (broker, dispatcher, receivers, events), then a summary.
demo: setup broker
	$(BIN)/dispatcher demo

## The daemon with config/dispatcher.toml (pair it with `make receiver` in another terminal).
run: setup broker
	$(BIN)/dispatcher --config config/dispatcher.toml run

receiver: setup
	$(BIN)/python -m example_receiver --listen 127.0.0.1:9000 \
	  --jwks-url http://127.0.0.1:8088/.well-known/jwks.json \
	  --issuer https://mail.example.com --db sqlite:///var/receiver.sqlite3

## Unit, integration and smoke-chaos/load tests against the real broker (what CI runs).
test: setup broker postgres receiver-kit
	$(BIN)/pytest -q

## The tests that talk to the broker (integration, chaos smoke) again, against RabbitMQ 4 on
## 5673 with quorum queues, the production default (what CI runs after `make test`).
RABBITMQ4_URL := amqp://guest:guest@127.0.0.1:5673/
# Not again on 4: suites whose outcome is the receiver's or the signer's, not the broker's
# (they run on 3.10 in `make test`); they would add about two minutes to CI.
RABBITMQ4_SKIP := \
	--deselect tests/integration/test_example_receiver_batches.py \
	--deselect tests/integration/test_receiver_recipes.py \
	--deselect tests/integration/test_logging.py \
	--deselect tests/integration/test_accounts.py \
	--deselect tests/integration/test_rotation.py::test_rotation_under_load \
	--deselect tests/chaos/test_chaos_receivers.py \
	--deselect tests/chaos/test_chaos_security.py
test-rabbitmq4: setup broker-rabbitmq4 postgres receiver-kit
	DISPATCHER_TEST_BROKER_URL=$(RABBITMQ4_URL) DISPATCHER_TEST_QUEUE_TYPE=quorum \
	  DISPATCHER_TEST_RABBITMQCTL="$(CURDIR)/scripts/ensure-rabbitmq4 ctl" \
	  $(BIN)/pytest -q -m broker $(RABBITMQ4_SKIP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

check: lint typecheck test

## Fault injection at full scale (tens of thousands of events, repeated kills and link cuts).
chaos: setup broker
	CHAOS_SCALE=full $(BIN)/pytest tests/chaos -q -s -p no:cacheprovider --timeout 3600

chaos-smoke: setup broker
	$(BIN)/pytest tests/chaos -q -s

## Load tests: baseline vs dispatcher, fan-out, latency, backlog, isolation (see loadtest/RESULTS.md).
loadtest: setup broker
	$(BIN)/python -m loadtest run --scenario all

loadtest-smoke: setup broker
	$(BIN)/python -m loadtest run --scenario smoke

bench: setup
	$(BIN)/python loadtest/bench_signing.py
	$(BIN)/python loadtest/bench_hot_path.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info loadtest/out
