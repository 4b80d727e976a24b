# Every target sets up what it needs: a fresh machine runs `make demo` or `make test` and nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first, pinned: torch==2.13.0 is the CPU build only where the package index serves the CPU
# wheel under that name (an index whose default torch is CPU-only, or --index-url of PyTorch's CPU
# wheels in PIP_INDEX_URL); on PyPI's default index it is the CUDA build, with its CUDA packages.
# Override (e.g. TORCH_SPEC="torch>=2.4") where another build is wanted.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench device-check lint clean serve pylate-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, so that no other package's requirement can pull a different (CUDA) build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,bench]" "$(TORCH_SPEC)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m modernbert_embed.demo

# -P: the checkout's root stays off sys.path (its kernels/ would shadow PyPI's kernels package).
# PyLate's environment first, for the late-interaction parity tests (slow); where it cannot be
# made, those tests skip and say why, and the rest still run.
test: $(STAMP)
	-$(MAKE) --no-print-directory pylate-venv
	$(PY) -P -m pytest -q

# Everything but the tests marked slow (docs/testing.md); `make test` runs those too.
test-fast: $(STAMP)
	$(PY) -P -m pytest -q -m "not slow"

# All CPU contenders alternated in one process (docs/benchmarks.md); BENCH_ARGS adds options.
# Then the late-interaction rows (PyLate's row needs `make pylate-venv`; without it, a row that says so);
# MV_BENCH_ARGS adds their options.
bench: $(STAMP)
	$(PY) benchmarks/bench_cpu.py --out out/bench_cpu.json $(BENCH_ARGS)
	$(PY) -P benchmarks/bench_multivector.py --out out/bench_multivector.json $(MV_BENCH_ARGS)

# The HTTP server on 127.0.0.1:8080 (OpenAI and TEI APIs): make serve MODEL=path-or-hub-id SERVE_ARGS="--port 9000"
MODEL ?= nomic-ai/modernbert-embed-base
serve: $(STAMP)
	$(PY) -m modernbert_embed serve --model $(MODEL) $(SERVE_ARGS)

# On a machine with a CUDA GPU and torch/triton/transformers already installed (no registry):
# installs the project without dependencies, runs every GPU test, parity and the GPU benchmarks,
# each step under its own time budget (450 s in all; benchmarks/device_check.py lists them).
# `make device-check DRY_RUN=1`: every step's plumbing on the CPU with tiny shapes. Runs with this
# checkout's .venv where there is one, else with $(PYTHON) (the device image's python3).
DRY_RUN ?=
DEVICE_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
device-check:
	$(DEVICE_PY) -P benchmarks/device_check.py $(if $(filter-out 0,$(DRY_RUN)),--dry-run)

# PyLate (the late-interaction reference of tests/test_multivector_pylate.py) in its own virtual
# environment: it pins sentence-transformers 5.3 and transformers <= 5.3, older than ours. Its
# fast-plaid requirement (a PLAID index, which the tests do not use) pins a torch build of its own,
# so PyLate goes in without dependencies beside the ones its ColBERT model imports, on the same
# CPU torch as the project.
PYLATE_VENV ?= .venv-pylate
PYLATE_STAMP := $(PYLATE_VENV)/.installed
PYLATE_DEPS := sentence-transformers==5.3.0 transformers==5.3.0 ujson==5.12.0 "datasets>=2.20.0" \
	"accelerate>=0.31.0" "pandas>=2.2.1"
pylate-venv: $(PYLATE_STAMP)
$(PYLATE_STAMP):
	$(PYTHON) -m venv $(PYLATE_VENV)
	$(PYLATE_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(PYLATE_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(PYLATE_DEPS)
	$(PYLATE_VENV)/bin/python -m pip install -q --no-deps pylate==1.6.0
	touch $(PYLATE_STAMP)

lint: $(STAMP)
	$(PIP) install -q ruff
	$(VENV)/bin/ruff check --select E9,F modernbert_embed kernels weights tests benchmarks examples

clean:
	rm -rf $(VENV) $(PYLATE_VENV) build *.egg-info .pytest_cache
