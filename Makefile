# The README's two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.statesync-build
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h src/statesync/*.pyx src/statesync/*.pxi)
PYTEST_ARGS ?=

.PHONY: setup system build demo test bench asan clean

setup: system build

system:
	@bash scripts/setup-system.sh

# System packages (compiler, Python headers, liblz4) come before any build step, also under -j.
$(PY): | system
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q "numpy>=1.24" "Cython>=3.0" "lz4>=4.0" "cryptography>=42" "pytest>=7" \
	    "pytest-benchmark>=4" "hypothesis>=6" "zstandard>=0.21" "matplotlib>=3.5" "prometheus-client>=0.17"
	$(PY) -m pip install -q --no-build-isolation -e .
	@touch $(STAMP)

build: $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV) src/statesync/_core.c src/statesync/*.so src/*.egg-info
