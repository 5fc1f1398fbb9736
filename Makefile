# billy-tools: every target says what it does. `make demo` and `make test` are the
# two entry points; both set the machine up first (scripts/setup.sh is idempotent).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PYTHON := $(VENV)/bin/python
TOOLS_DIRS := --tools-dir tool-images --tools-dir tests/tools
# The embedded registry that scripts/setup.sh started (none: images stay local). An
# explicit BILLY_REGISTRY wins; `BILLY_REGISTRY= make images` pushes nowhere.
EMBEDDED_REGISTRY_FILE := $${BILLY_STATE_DIR:-.billy}/registry/address
PYTEST_ARGS ?=

.PHONY: help setup images test lint format demo down bench bench-startup clean schemas

help:
	@echo "make demo   set up, build images, start the stack and run doc-stats on GPL-3"
	@echo "make test   set up, build images, ruff format --check, ruff check, pytest"
	@echo "make setup | images | lint | format | schemas | down | bench | bench-startup | clean"

setup:
	@echo "==> setup: Debian packages, Docker daemon, .venv"
	@bash scripts/setup.sh

images: setup
	@echo "==> images: base images billy/base:bookworm and billy/busybox:local"
	@bash tool-images/base/build-local.sh
	@bash tool-images/busybox/build-local.sh
	@echo "==> images: tool images of tool-images/ and tests/tools/, pushed to the registry if any"
	@BILLY_REGISTRY=$${BILLY_REGISTRY-$$(cat $(EMBEDDED_REGISTRY_FILE) 2>/dev/null || true)} \
		$(PYTHON) -m shared.images build $(TOOLS_DIRS)

lint: setup
	@echo "==> lint: ruff format --check, ruff check"
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/ruff check .

format: setup
	@echo "==> format: ruff format, ruff check --fix"
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

test: setup images lint
	@echo "==> test: pytest"
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: setup images
	@echo "==> demo: start the stack and run doc-stats on /usr/share/common-licenses/GPL-3"
	@$(PYTHON) -m shared.demo

schemas: setup
	@echo "==> schemas: regenerate docs/schemas/ from shared/wire.py"
	@$(PYTHON) -m shared.schemas

down:
	@echo "==> down: stop the stack that 'billy-tools up' started"
	@$(VENV)/bin/billy-tools down

bench: setup images
	@echo "==> bench: bench/run.py"
	@$(PYTHON) bench/run.py

bench-startup: setup images
	@echo "==> bench-startup: container start-up latency, runc vs runsc (gVisor)"
	@$(PYTHON) -m bench.startup

clean:
	@echo "==> clean: caches, build output and image locks (images and .venv stay)"
	@rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	@find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
	@rm -f tool-images/images.lock.json tests/tools/images.lock.json
