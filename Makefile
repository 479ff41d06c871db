# Every target that runs code runs the idempotent setup first (seconds when nothing changed).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean-demo

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m flowmon_agent.cli demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) -m bench.run_all

clean-demo: setup
	$(PY) -m flowmon_agent.cli demo --cleanup
