# The README's two commands:  `make demo` (tiny pre-training run on the bundled sample, CPU)
#                             `make test` (the test suite; what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup build test nvcc-check demo bench clean

setup: $(STAMP) build

$(STAMP): requirements.txt requirements-nobuildiso.txt setup.py
	bash tools/install_system_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-build-isolation -r requirements-nobuildiso.txt
	$(PIP) install -q mpi4py megatron-core
	$(PY) -c 'import os, site; open(os.path.join(site.getsitepackages()[0], "megatron_snm.pth"), "w").write(os.getcwd())'
	touch $@

# Incremental (ninja) rebuild of the C++ extensions in place. The venv imports the package from
# this checkout through megatron_snm.pth (what `pip install -e .` does, without building twice).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# Compiles the CUDA kernels with nvcc for sm_80 and sm_90 where nvcc exists (no GPU needed).
nvcc-check:
	bash tools/check_cuda_kernels.sh

# On a machine whose torch sees a GPU, the tests marked `cuda` run too (pytest --cuda).
test: setup nvcc-check
	$(PY) -m pytest -q tests $$($(PY) -c 'import torch; print("--cuda" if torch.cuda.is_available() else "")')

demo: setup
	bash examples/pretrain_gpt_tiny_cpu.sh

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf build megatron_snm/*.so megatron_snm/*/*.so
