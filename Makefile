# The README's two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.statesync-build
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h src/statesync/*.pyx src/statesync/*.pxi)
PYTEST_ARGS ?=

LINT_PATHS := src tests benchmarks scripts

.PHONY: setup system build lint demo test bench asan clean

# As root, CRIU's kernel-feature cache for this boot (only does something where /run is
# not a tmpfs: src/statesync/criu/kdat.py; saves ~40 ms per dump and per restore).
setup: system build
	@[ "$$(id -u)" -ne 0 ] || $(PY) -m statesync.criu.kdat --prime || true

system:
	@bash scripts/setup-system.sh

# System packages (compiler, Python headers, liblz4) come before any build step, also under -j.
$(PY): | system
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q "numpy>=1.24" "Cython>=3.0" "lz4>=4.0" "cryptography>=42" "pytest>=7" \
	    "pytest-benchmark>=4" "hypothesis>=6" "zstandard>=0.21" "matplotlib>=3.5" "prometheus-client>=0.17" \
	    "build>=1.0"
	$(PY) -m pip install -q "ruff==0.17.6" "mypy==2.4.1"
	$(PY) -m pip install -q --no-build-isolation -e .
	@touch $(STAMP)

build: $(STAMP)

demo: setup
	$(PY) scripts/demo.py

# ruff and mypy are configured in pyproject.toml ([tool.ruff], [tool.mypy]); their
# versions are pinned above so that a new release's rules cannot turn a green tree red.
lint: setup
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m mypy

test: lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV) src/statesync/_core.c src/statesync/*.so src/statesync/statesync-injector src/*.egg-info
