# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quintet-installed
PYTHON ?= python3

.PHONY: demo test bench setup clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=68' wheel

# CPU torch first when none is importable: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,rl,atari,play,hf]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/pytest -n auto -q

demo: $(STAMP)
	$(VENV)/bin/quintet demo

bench: $(STAMP)
	$(VENV)/bin/quintet bench

clean:
	rm -rf $(VENV) bench-results runs
