# Every target that runs code runs the idempotent setup first (seconds when nothing changed).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean-demo images

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m flowmon_cli.main demo

# pytest's exit code 5 means no test ran: a failure, said out loud.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The agent and operator images (podman; debian:12-slim made by debootstrap when missing). Skips an image
# whose inputs did not change.
images: setup
	@bash scripts/images.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Every benchmark once, with the arguments recorded in docs/BENCHMARKS.md (about 45 minutes, needs root).
bench: setup
	$(PY) -m bench.metadata_memory --pods 20000 --budget-mb 100
	$(PY) -m bench.aggregate_poll --flows 10000 --changing 1.0
	$(PY) -m bench.tracer_poll --flows 5000 --changing 0.1
	$(PY) -m bench.scrape_time --series 10000 --scrapes 60
	$(PY) -m bench.freshness --connections 220 --poll-interval 0.5
	$(PY) -m bench.kernel_overhead --rounds 7 --seconds 2
	$(PY) -m bench.churn_interleaved --chunks 12 --cycles 4
	$(PY) -m bench.images --starts 10

clean-demo: setup
	$(PY) -m flowmon_cli.main demo --cleanup
