# The two commands of the README. Each installs what it needs (idempotent).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= ./data
export HF_HUB_OFFLINE := 1

.PHONY: serve test lint install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/difficulty serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

test: $(VENV)/.installed
	bash scripts/test-services.sh
	bash scripts/install-browser.sh
	$(BIN)/ruff check service trainer tests benchmarks
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check service trainer tests benchmarks
