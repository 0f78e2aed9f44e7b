# gen2embed: `make demo` runs the pipeline on the built-in miniature world, `make test` tests it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch first, pinned: the CPU build on disk. An unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# The versions the test suite passed with (`make lock` writes it).
CONSTRAINTS := constraints.txt

.PHONY: setup lock demo test lint format bench up clean

setup: $(STAMP)

# Every version from constraints.txt. The stamp makes a second `make setup` with nothing
# changed a no-op; a new constraints.txt or pyproject.toml reinstalls.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) $(TORCH)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

# Upgrade the pins: a fresh temporary venv gets torch, then the newest versions pyproject.toml
# allows, and its `pip freeze` becomes constraints.txt (not gen2embed, pip, setuptools, wheel;
# local labels such as torch's +cpu dropped, so the pin also matches the build elsewhere).
# Then `make test`, and commit constraints.txt if it passes.
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; py="$$tmp/venv/bin/python"; \
	$$py -m pip install --quiet --upgrade pip; \
	$$py -m pip install --quiet $(TORCH); \
	$$py -m pip install --quiet -e '.[dev]'; \
	$$py -m pip freeze --exclude-editable > "$$tmp/freeze"; \
	{ echo "# The versions the test suite passed with: \`make setup\` installs with pip's -c $(CONSTRAINTS)."; \
	  echo "# Written by \`make lock\` with Python $$($$py -c 'import platform; print(platform.python_version())'), $$(date -u +%F)."; \
	  echo "# Upgrade: \`make lock\` (the newest versions pyproject.toml allows), \`make test\`, commit."; \
	  grep -v -i -E '^(gen2embed|pip|setuptools|wheel)==' "$$tmp/freeze" \
	    | sed -E 's/^([^=]+==[^+]+)\+.*/\1/' | LC_ALL=C sort -f -t= -k1,1; } > "$$tmp/constraints.txt"; \
	mv "$$tmp/constraints.txt" $(CONSTRAINTS)

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
