# The two commands of the README. Both set up .venv first (see scripts/setup.sh).
PROFILE ?= cpu
ARGS ?=
VENV := .venv/bin

.PHONY: setup bench-deps report test lint clean

setup:
	@bash scripts/setup.sh

# Optional: llama-cpp-python built for this machine (about 5 minutes), the decoding benchmark's anchor.
bench-deps: setup
	@bash scripts/bench-deps.sh

report: setup
	$(VENV)/effllm report --profile $(PROFILE) $(ARGS)

lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports

test: lint
	$(VENV)/python -m pytest -q

clean:
	rm -rf .venv reports/*/
