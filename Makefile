# lungserve: the two commands of the README, plus the lock.
#
#   make serve   serving-only .venv (requirements/serve.txt), then serve the bundled model on 127.0.0.1:8000
#   make test    full .venv (requirements/dev.txt), then ruff + mypy + the whole pytest suite, and beside
#                them the unit + app layers and the wheel test on every other supported Python found
#                (tools/matrix.py, venvs in .venv-matrix/)
#   make wheel   build dist/lungserve-*.whl (+ sdist) from the hashed build lock
#   make lock    regenerate requirements/{dev,serve,gpu,test,build}.txt (uv pip compile, tools/lock.py)
#
# Installs are pinned and hashed (--require-hashes); the project itself goes in with --no-deps
# --no-build-isolation, its build backend (setuptools) coming from the hashed requirements/build.txt,
# so nothing is fetched that a lock does not name. The Dockerfile uses
# the same steps. A stamp file inside .venv records each install and depends on its lock, so a
# re-run skips an up-to-date install and a changed lock reinstalls.
#
# Supported: CPython 3.11, 3.12 and 3.13 (requires-python in pyproject.toml). The locks are
# universal (markers where a version needs another pin): every version reads the same lock files.

SUPPORTED := 3.11 3.12 3.13
_is_supported = import sys; sys.exit("%d.%d" % sys.version_info[:2] not in "$(SUPPORTED)".split())
_unsupported = lungserve supports CPython $(SUPPORTED); $(PYTHON) is $(PY_VERSION). Set PYTHON=python3.13 (or \
	another supported one), or install one (e.g. pyenv install 3.13)
# PYTHON= (make's command line or the environment) wins. Otherwise python3 if it is a supported
# version, else the newest supported python3.X on PATH (pyenv shims of inactive versions fail
# to run, so they are passed over).
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c '$(_is_supported)' >/dev/null 2>&1 && { echo $$p; exit 0; }; done; echo python3)
endif
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --no-input
HOST ?= 127.0.0.1
PORT ?= 8000
# The venv remembers which Python made it: another one (python3 upgraded, PYTHON=) rebuilds it.
VENV_PYTHON := $(VENV)/python-$(PY_VERSION).stamp
# Builds in the checkout write lungserve.egg-info/ there: one at a time (the matrix may be building).
IN_CHECKOUT = $(PYTHON) -m tools.locks --
# `make test`'s other-version matrix: "auto" (every other supported version found; all of them
# when CI is set), "none", or versions, e.g. MATRIX="3.13".
MATRIX ?= auto

.DEFAULT_GOAL := help
.PHONY: help serve test suite dev lint typecheck lock clean s3-demo wheel matrix

help:
	@echo "make serve   install the serving lock into .venv and serve the bundled model on $(HOST):$(PORT)"
	@echo "make test    install the full dev lock into .venv, run ruff, mypy, the matrix and pytest"
	@echo "make dev     only install the full dev lock into .venv"
	@echo "make suite   make test without the matrix: ruff, mypy and pytest on $(PYTHON)"
	@echo "make matrix  only the other-version part of make test (MATRIX=3.13 for one version)"
	@echo "make wheel   build the wheel (and sdist) into dist/ from the hashed build lock"
	@echo "make lock    regenerate requirements/*.txt with uv and check wheels for Python $(SUPPORTED)"
	@echo "make s3-demo local S3 (moto) on 127.0.0.1:$(S3_DEMO_PORT), upload the bundled model, serve it from there"
	@echo "(Python: $(PYTHON), $(PY_VERSION); supported: $(SUPPORTED); PYTHON=... picks another)"

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

# The matrix starts first and runs beside everything else (the dev install, ruff, mypy, pytest):
# each side keeps about one core busy, and CI has two. It needs only the standard library of
# $(PYTHON), keeps its venvs outside $(VENV) (which the dev install may create anew), and runs at a
# lower priority, so the suite's real-process tests keep theirs. Its output follows the suite's.
MATRIX_VENVS ?= .venv-matrix
test:
	@mkdir -p $(MATRIX_VENVS); log=$(MATRIX_VENVS)/matrix.log; \
	echo "+ nice -n 5 $(PYTHON) -m tools.matrix ... > $$log (beside the rest of make test)"; \
	nice -n 5 $(PYTHON) -m tools.matrix --venvs $(MATRIX_VENVS) --skip "$(PY_VERSION)" \
		--supported "$(SUPPORTED)" $(MATRIX) > $$log 2>&1 & matrix=$$!; \
	$(MAKE) --no-print-directory suite; suite=$$?; \
	wait $$matrix; status=$$?; \
	echo "--- the matrix (tools/matrix.py, exit $$status), run beside the suite ---"; cat $$log; \
	[ $$suite -eq 0 ] && [ $$status -eq 0 ]

# ruff, mypy and the whole pytest suite on $(PYTHON) (make test without the matrix).
suite: $(VENV)/dev.stamp
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

# Only the matrix (e.g. `make matrix MATRIX=3.13`).
matrix:
	$(PYTHON) -m tools.matrix --venvs $(MATRIX_VENVS) --skip "$(PY_VERSION)" --supported "$(SUPPORTED)" $(MATRIX)

$(VENV_PYTHON):
	@test -n "$(PY_VERSION)" || { echo "no Python found: tried $(PYTHON); set PYTHON=/path/to/python3.X" >&2; exit 1; }
	@$(PYTHON) -c '$(_is_supported)' || { echo "$(_unsupported)" >&2; exit 1; }
	@# An existing venv of the same version (e.g. made before this stamp existed) is kept.
	@if [ "$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" != "$(PY_VERSION)" ]; then \
		echo "$(PYTHON) -m venv --clear $(VENV)"; $(PYTHON) -m venv --clear $(VENV); fi
	@touch $@

# Serving only: never TensorFlow, never onnxruntime-gpu.
$(VENV)/serve.stamp: requirements/serve.txt requirements/build.txt pyproject.toml $(VENV_PYTHON)
	$(PIP) install --require-hashes -r requirements/serve.txt
	$(PIP) install --require-hashes -r requirements/build.txt
	$(IN_CHECKOUT) $(PIP) install --no-deps --no-build-isolation -e .
	@# The venv may no longer match the dev lock exactly: make test must re-check it.
	@rm -f $(VENV)/dev.stamp
	@touch $@

# Everything: serve + export + dev tools. dev.txt holds the same onnxruntime (CPU) as serve.txt,
# so running this after `make serve` upgrades the same venv in place.
$(VENV)/dev.stamp: requirements/dev.txt requirements/build.txt pyproject.toml $(VENV_PYTHON)
	$(PIP) install --require-hashes -r requirements/dev.txt
	$(PIP) install --require-hashes -r requirements/build.txt
	$(IN_CHECKOUT) $(PIP) install --no-deps --no-build-isolation -e .
	@touch $@

# Just the full install (what `lungserve train/evaluate/export` need), without running anything.
dev: $(VENV)/dev.stamp

lint: $(VENV)/dev.stamp
	$(BIN)/ruff check .

typecheck: $(VENV)/dev.stamp
	$(BIN)/mypy

# The wheel users install (README, "Only the server"): sdist first, then the wheel built from
# it, so only files the sdist carries can reach the wheel (no stale build/ in the checkout).
wheel: requirements/build.txt $(VENV_PYTHON)
	$(PIP) install --require-hashes -r requirements/build.txt
	$(BIN)/python -m build --no-isolation --outdir dist .

# uv is only needed here; without one on PATH it goes into a throw-away tool venv.
# LOCK_ARGS go to every `uv pip compile` (e.g. LOCK_ARGS=--upgrade; by default the pins already
# in the locks are kept and only what pyproject.toml changed is resolved again).
LOCK_ARGS ?=
lock:
	@set -e; \
	uv=$$(command -v uv || true); \
	if [ -z "$$uv" ]; then \
		tools=$$(mktemp -d); trap 'rm -rf "$$tools"' EXIT; \
		$(PYTHON) -m venv "$$tools"; "$$tools/bin/pip" install --quiet uv; uv="$$tools/bin/uv"; \
	fi; \
	$(PYTHON) tools/lock.py --uv "$$uv" --versions "$(SUPPORTED)" -- $(LOCK_ARGS)

clean:
	rm -rf $(VENV) $(MATRIX_VENVS) .mypy_cache .ruff_cache .pytest_cache build dist
