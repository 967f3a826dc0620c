# The two commands of the README:
#   make demo   set up .venv (torch first, then fastsoup with its native core) and run the main job
#   make test   set up .venv and run the test suites (C++ ctest + pytest); setup installs the test, demo and
#               clients extras (clients: the real libraries some tests use, pinned) with torch pinned
# Both work on a fresh machine with Python >= 3.9 and a C++17 compiler. Override PYTHON, VENV or
# TORCH (the pip requirement for torch, e.g. TORCH=torch to take the newest) on the command line.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastsoup-installed
NATIVE_SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: setup demo test test-cpp test-py bench clean

setup: $(STAMP)

$(STAMP): $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch before anything that depends on it: a bare "torch" requirement pulls a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	# then everything else under a constraint on the torch now installed, so no dependency replaces it
	# (unpinned, the libraries of the clients extra pulled a CUDA torch 2.14 here)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -c $(VENV)/torch-constraint.txt -e ".[test,demo,clients]"
	$(PY) -c "import torch; print('torch', torch.__version__)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fastsoup demo --out demo_out

test: test-cpp test-py

test-py: setup
	$(PY) -m pytest tests -q

test-cpp: setup
	mkdir -p build && $(VENV)/bin/cmake -S . -B build/ctest -G Ninja -DFASTSOUP_CUDA=OFF -DPython_EXECUTABLE=$(abspath $(PY)) > build/ctest-configure.log 2>&1 || (cat build/ctest-configure.log; exit 1)
	$(VENV)/bin/cmake --build build/ctest --target fastsoup_tests fastsoup_io_tests fastsoup_plan_tests fastsoup_sparse_tests fastsoup_ring_tests
	$(VENV)/bin/ctest --test-dir build/ctest --output-on-failure

bench: setup
	$(PY) -m benchmarks.bench_merge

clean:
	rm -rf build demo_out fastsoup/_core*.so
