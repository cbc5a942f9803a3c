# `make demo` and `make test` work on a fresh machine: each creates .venv and installs
# what it needs on first use.
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench browser

# The demo needs the service alone; the tests add their tools (moto, mypy, selenium, ...).
$(RUNTIME): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet --editable '.[dev]'
	touch $(STAMP)

demo: $(RUNTIME)
	$(BIN)/cos-webhook demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint browser
	$(BIN)/pytest

# The dashboard's browser test drives the system's Chromium and chromedriver (nothing is downloaded
# by Selenium): installed here when missing and we are root on a Debian-like system, else it skips.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
		else \
			echo "chromium or chromedriver missing: the dashboard's browser test will skip (CI=true: fail)"; \
		fi; \
	fi

bench: $(STAMP)
	$(BIN)/python bench/fetch_memory.py --jobs 8
