# Every target creates .venv when it is missing and installs the project into it from the pinned
# constraints, so a fresh clone needs nothing but python3 (>= 3.10) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.torchsgd-installed

.PHONY: help setup demo test lint fuzz bench clean

help:
	@echo "make demo   - set up, then train on the digits data with torch.optim.SGD and torchsgd"
	@echo "make test   - set up, then run the whole test suite"
	@echo "make lint   - ruff (lint and format check) and mypy, as CI runs them"
	@echo "make bench  - set up, then measure step time and memory against torch; writes docs/benchmarks.md"
	@echo "make fuzz   - the long parity fuzz profile"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[cli,dev,frameworks,cuda]'
	$(BIN)/torchsgd build
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/torchsgd demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests -k fuzz

bench: $(STAMP)
	$(BIN)/python -m torchsgd bench --write-docs docs/benchmarks.md
	$(BIN)/python -m torchsgd bench --memory --write-docs docs/benchmarks.md

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
