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

.PHONY: install install-gpu test test-fast demo demo-pas bench lint clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel pybind11
	# The CPU build of torch first, pinned: nothing later may pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

install: $(STAMP)

# An H100/H200 node (Linux x86-64, Python 3.10-3.12, NVIDIA driver >= 580 for CUDA 13):
# its own venv ($(GPU_VENV)), versions pinned, binary wheels only (--only-binary=:all:):
# nothing is compiled by default. torch 2.13.0's Linux wheel on PyPI is its CUDA 13 build
# (NCCL, cuDNN, cuBLAS come as nvidia-*-cu13 wheels, Triton 3.7 with it); liger-kernel is a
# pure-Python wheel. What PyPI has no wheel for (checked for CPython 3.11, manylinux x86-64):
#   Transformer Engine: its core library has wheels (transformer-engine-cu12/-cu13), its
#     PyTorch extension (transformer-engine-torch) is source only, and the core alone would
#     make `import transformer_engine` succeed without the PyTorch layers;
#   flash-attn: source only on PyPI;
#   apex: not on PyPI at all (build NVIDIA/apex from its repository if wanted).
# `make install-gpu GPU_BUILD_FROM_SOURCE=1` builds TE's PyTorch extension (+ its core wheel)
# and flash-attn against the installed torch (needs the CUDA toolkit with nvcc; long).
# Nova runs without them (torch's varlen attention, megatron's local spec); `nova doctor` at
# the end says what was found and which paths the engine takes. For a CUDA 12 driver,
# install a CUDA 12 build of torch from PyTorch's own wheel index first, TE_CORE=core_cu12.
GPU_VENV   ?= .venv-gpu
GPU_PIP    := $(GPU_VENV)/bin/python -m pip
TORCH_GPU  ?= torch==2.13.0
TE_VERSION ?= 2.20.2
TE_CORE    ?= core_cu13
FLASH_ATTN ?= flash-attn==2.8.3.post2
GPU_BUILD_FROM_SOURCE ?= 0

install-gpu:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PIP) install --isolated -q --upgrade pip setuptools wheel pybind11
	$(GPU_PIP) install --isolated --only-binary=:all: $(TORCH_GPU) liger-kernel==0.8.5
	# the project and its dependencies (langdetect is pure Python, published as source only)
	$(GPU_PIP) install --isolated --only-binary=:all: --no-binary=langdetect \
	    --no-build-isolation -e '.[test]' $(TORCH_GPU)
	if [ "$(GPU_BUILD_FROM_SOURCE)" = 1 ]; then \
	    $(GPU_PIP) install --isolated --no-build-isolation \
	        'transformer-engine[pytorch,$(TE_CORE)]==$(TE_VERSION)' $(FLASH_ATTN); \
	else \
	    echo "install-gpu: Transformer Engine's PyTorch extension and flash-attn have no" \
	         "wheel on PyPI: skipped (GPU_BUILD_FROM_SOURCE=1 builds them); apex: not on PyPI"; \
	fi
	$(GPU_VENV)/bin/python -m nova_engine.cli doctor

test: $(STAMP)
	$(VENV)/bin/ruff check nova_engine kernels tests benchmarks
	$(VENV)/bin/ruff format --check nova_engine kernels tests benchmarks
	$(VENV)/bin/pytest -p no:cacheprovider --import-mode=importlib -q --durations=25 tests

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
	$(VENV)/bin/ruff check nova_engine kernels tests benchmarks
	$(VENV)/bin/ruff format --check nova_engine kernels tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf build *.egg-info nova_engine/_C*.so
