# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# A plain `torch` pulls several GB of CUDA wheels; pin the CPU build when no torch is present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnfuse train
	@echo
	@echo "The attnfuse command is in $(VENV)/bin: activate it with  . $(VENV)/bin/activate  (then: attnfuse --help)"

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/fusion.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
