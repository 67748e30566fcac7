# Two entry points for a fresh machine: `make demo` (install, then the end-to-end demo) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(PYTHON) -m uv
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install demo test lint

install:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	@$(UV) sync --frozen --quiet --extra export

demo: install
	$(UV) run --frozen vision demo --out demo_out

test: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen pytest -q

lint: install
	$(UV) run --frozen ruff check .
