# The README's two commands. Each sets everything up first (a virtual environment with the package
# and its test extras): `make test` runs the suite, `make demo` the exp/ training demo.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a machine that already has torch in the venv keeps it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.megablocks-installed

.PHONY: test demo setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Runs the whole suite with Triton kernels under the interpreter when there is no GPU, one
# pytest-xdist worker per core (each with one torch thread: the interpreted kernels are
# single-threaded, and two workers on two cores finish in about two thirds of one's time).
# pytest exits 5 when it collects nothing: an empty suite is a failure here, not a pass.
test: $(STAMP)
	@set -e; \
	if ! $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		export TRITON_INTERPRET=1; fi; \
	workers=""; if $(PY) -c "import xdist" 2>/dev/null; then workers="-n auto --dist worksteal"; export OMP_NUM_THREADS=1; fi; \
	rc=0; $(PY) -m pytest -q --durations=25 $$workers tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# Builds a Megatron-format dataset from an embedded corpus, trains a tiny dense GPT and a tiny dMoE
# GPT with the same active parameters (GPU if present, else CPU), prints their validation losses.
demo: $(STAMP)
	$(PY) -m exp.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
