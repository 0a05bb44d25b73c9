# lungserve: the two commands of the README, plus the lock.
#
#   make serve   serving-only .venv (requirements/serve.txt), then serve the bundled model on 127.0.0.1:8000
#   make test    full .venv (requirements/dev.txt), then ruff + mypy + the whole pytest suite
#   make lock    regenerate requirements/{serve,gpu,dev,build}.txt (uv pip compile)
#
# Installs are pinned and hashed (--require-hashes); the project itself goes in with --no-deps
# --no-build-isolation, its build backend (setuptools) coming from the hashed requirements/build.txt,
# so nothing is fetched that a lock does not name. The Dockerfile uses
# the same steps. A stamp file inside .venv records each install and depends on its lock, so a
# re-run skips an up-to-date install and a changed lock reinstalls.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --no-input
HOST ?= 127.0.0.1
PORT ?= 8000

# The same arguments as the header uv writes into each lock (keep them in sync).
UV_COMPILE := pip compile pyproject.toml
UV_TARGET := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28

.DEFAULT_GOAL := help
.PHONY: help serve test dev lint typecheck lock clean s3-demo

help:
	@echo "make serve   install the serving lock into .venv and serve the bundled model on $(HOST):$(PORT)"
	@echo "make test    install the full dev lock into .venv and run ruff, mypy and pytest"
	@echo "make dev     only install the full dev lock into .venv"
	@echo "make lock    regenerate requirements/*.txt with uv"
	@echo "make s3-demo local S3 (moto) on 127.0.0.1:$(S3_DEMO_PORT), upload the bundled model, serve it from there"

serve: $(VENV)/serve.stamp
	$(BIN)/lungserve serve --host $(HOST) --port $(PORT)

# A local S3 endpoint (moto, from the dev lock) with dummy credentials, the bundled model uploaded
# by `lungserve upload`, and the server fetching it from there. Ctrl-C stops both.
S3_DEMO_PORT ?= 9100
S3_DEMO := AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
s3-demo: $(VENV)/dev.stamp
	@set -e; \
	$(BIN)/moto_server -H 127.0.0.1 -p $(S3_DEMO_PORT) > $(VENV)/s3-demo-moto.log 2>&1 & moto=$$!; \
	trap 'kill $$moto 2>/dev/null' EXIT INT TERM; \
	until $(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', $(S3_DEMO_PORT)), 1)" 2>/dev/null; do \
		kill -0 $$moto 2>/dev/null || { cat $(VENV)/s3-demo-moto.log; exit 1; }; sleep 0.2; \
	done; \
	$(S3_DEMO) $(BIN)/lungserve upload service/bundled_model s3://lungserve-demo/lung/ \
		--endpoint-url http://127.0.0.1:$(S3_DEMO_PORT) --create-bucket; \
	$(S3_DEMO) LUNGSERVE_MODEL_URI=s3://lungserve-demo/lung/ LUNGSERVE_S3_ENDPOINT_URL=http://127.0.0.1:$(S3_DEMO_PORT) \
		LUNGSERVE_MODEL_CACHE_DIR=$(VENV)/s3-demo-cache LUNGSERVE_ADMIN_TOKEN=demo \
		$(BIN)/lungserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/dev.stamp
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "lungserve needs Python 3.11 (the locks are resolved for it); set PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Serving only: never TensorFlow, never onnxruntime-gpu.
$(VENV)/serve.stamp: requirements/serve.txt requirements/build.txt pyproject.toml | $(BIN)/python
	$(PIP) install --require-hashes -r requirements/serve.txt
	$(PIP) install --require-hashes -r requirements/build.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	@# The venv may no longer match the dev lock exactly: make test must re-check it.
	@rm -f $(VENV)/dev.stamp
	@touch $@

# Everything: serve + export + dev tools. dev.txt holds the same onnxruntime (CPU) as serve.txt,
# so running this after `make serve` upgrades the same venv in place.
$(VENV)/dev.stamp: requirements/dev.txt requirements/build.txt pyproject.toml | $(BIN)/python
	$(PIP) install --require-hashes -r requirements/dev.txt
	$(PIP) install --require-hashes -r requirements/build.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	@touch $@

# Just the full install (what `lungserve train/evaluate/export` need), without running anything.
dev: $(VENV)/dev.stamp

lint: $(VENV)/dev.stamp
	$(BIN)/ruff check .

typecheck: $(VENV)/dev.stamp
	$(BIN)/mypy

# uv is only needed here; without one on PATH it goes into a throw-away tool venv.
lock:
	@set -e; \
	uv=$$(command -v uv || true); \
	if [ -z "$$uv" ]; then \
		tools=$$(mktemp -d); trap 'rm -rf "$$tools"' EXIT; \
		$(PYTHON) -m venv "$$tools"; "$$tools/bin/pip" install --quiet uv; uv="$$tools/bin/uv"; \
	fi; \
	"$$uv" $(UV_COMPILE) --extra cpu $(UV_TARGET) -o requirements/serve.txt; \
	"$$uv" $(UV_COMPILE) --extra gpu $(UV_TARGET) -o requirements/gpu.txt; \
	"$$uv" $(UV_COMPILE) --extra cpu --extra export --extra dev $(UV_TARGET) -o requirements/dev.txt; \
	"$$uv" pip compile requirements/build.in -c requirements/dev.txt $(UV_TARGET) -o requirements/build.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
