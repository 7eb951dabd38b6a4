# avforge: the two commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test,audio,llm,visual,loader,dedup,cloud,cluster
APT_PACKAGES := ffmpeg espeak-ng chromium
# llama-cpp-python is an sdist: build it with both cores
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system venv demo test bench clean

## system packages (Debian): ffmpeg, espeak-ng, chromium (the report's browser test)
system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

## the virtual environment with the package (editable) and the extras
venv:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@# openai-whisper without its triton dependency (~1 GB, unused on CPU); its other deps are in the audio extra
	$(BIN)/pip install -q --disable-pip-version-check --no-deps openai-whisper==20250625

setup: system venv

## generate sample videos, serve them on 127.0.0.1, run the pipeline on them (Ray in-process)
demo: setup
	$(BIN)/avforge demo --dir demo

## the test suite (what CI runs through .ci/run)
test: setup
	$(BIN)/python -m pytest -q tests

## benchmarks (not timed tests): pipeline vs the ffmpeg decode floor at 1x and 4x the corpus
bench: setup
	$(BIN)/avforge bench --workdir /tmp/avforge-bench --count 8 --scales 1 4

clean:
	rm -rf demo .pytest_cache
