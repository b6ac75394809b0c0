# Nova Engine — the two commands a newcomer needs:
#   make demo   tiny Llama-architecture model: SFT -> DPO -> reward model -> RLVR (+ ExPO) on CPU, a results table
#   make test   lint, format check and the whole test suite (CPU; Triton kernels through
#               TRITON_INTERPRET=1); `make test-fast` skips the tests marked slow (spawned
#               process groups, whole training runs): under a minute on 2 cores
# and `make bench` for the kernel benchmarks (GPU figures only from a GPU).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-fast demo demo-pas bench lint clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel pybind11
	# The CPU build of torch first, pinned: nothing later may pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check nova_engine nova_kernels tests benchmarks
	$(VENV)/bin/ruff format --check nova_engine nova_kernels tests benchmarks
	$(VENV)/bin/pytest -p no:cacheprovider --import-mode=importlib -q tests

test-fast: $(STAMP)
	$(VENV)/bin/pytest -p no:cacheprovider --import-mode=importlib -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m nova_engine.demo --out demo_out

# PAS (Baichuan's prompt augmentation) end to end on tiny models: build-data, SFT, augment
demo-pas: $(STAMP)
	$(PY) -m nova_engine.tools.pas.demo --out demo_out/pas

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# ruff, then mypy on nova_engine and nova_kernels as [tool.mypy] in pyproject.toml says
lint: $(STAMP)
	$(VENV)/bin/ruff check nova_engine nova_kernels tests benchmarks
	$(VENV)/bin/ruff format --check nova_engine nova_kernels tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf build *.egg-info nova_engine/_C*.so
