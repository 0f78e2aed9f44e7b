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

# Two pytest workers, one torch thread each: most tests wait on servers and subprocesses, so
# two files at a time fit two cores (15 min 20 s serial, 10 min 24 s so; bench/RESULTS.md).
# A test module stays on one worker (--dist loadfile): module fixtures start servers once.
TEST_WORKERS ?= 2
test: setup lint
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

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
