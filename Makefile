# ltpipe: `make setup run` sets up and runs the embedded default; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# Stage commands in dvc.yaml call `python`: put the environment's first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-fast test-part lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: setup
	dvc repro
	dvc metrics show metrics/zeroshot.json metrics/eval.json
	cat metrics/summary.md

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# One part of the suite by marker expression (markers: pyproject.toml): make test-part PART="reliability and not slow"
test-part: setup
	@test -n '$(PART)' || { echo 'usage: make test-part PART=<marker expression>, e.g. PART=realdata'; exit 2; }
	$(BIN)/python -m pytest -q -m '$(PART)'

lint: setup
	$(BIN)/ruff check ltpipe stages tests bench

clean:
	rm -rf data/weights data/prepared data/features data/models .dvc/tmp/runs
