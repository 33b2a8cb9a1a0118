# Quick start on a fresh clone (each command sets up .venv the first time, then reuses it):
#   make demo   run the main job end to end (`flexmoe demo`; outputs in demo_out/; DEMO_ARGS=--fast for the small preset)
#   make test   run the whole test suite (the quick loop: .venv/bin/python -m pytest -m "not slow")
#   make lint   ruff check, ruff format --check and lint-imports (the import floors in pyproject.toml)
#
# Set-up installs torch==2.13.0 first: with no torch installed, pip would resolve the looser
# `torch>=...` requirement to a multi-GB CUDA build. Override with `make TORCH=torch==X ...`.
# It reruns only when pyproject.toml or setup.py is newer than the stamp file.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
OUT ?= demo_out
PYTEST_ARGS ?=
DEMO_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.flexmoe-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/flexmoe demo --out $(OUT) --overwrite $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every check runs, so one `make lint` reports all that is wrong; it fails if any did.
# lint-imports runs from the repository root: it finds `callbacks/` there (see pyproject.toml).
lint: $(STAMP)
	status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/lint-imports || status=1; \
	exit $$status

clean:
	rm -rf $(OUT) build dist .pytest_cache
