# gen2embed: `make demo` runs the pipeline on the built-in miniature world, `make test` tests it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench up clean

setup: $(STAMP)

# torch first, pinned: the CPU build on disk. An unpinned torch pulls a multi-GB CUDA build.
# The stamp makes a second `make setup` with nothing changed a no-op.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/gen2embed run --preset tiny

test: setup lint
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# CPU benchmarks, each against a baseline measured in the same run (see bench/RESULTS.md).
bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/mine.py

up: setup
	$(BIN)/gen2embed up

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
