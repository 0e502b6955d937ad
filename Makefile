# The two commands: `make demo` and `make test`. Each creates .venv and installs into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned so pip takes the CPU wheel; a bare `torch` pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: demo test venv install install-test bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/activate setup.cfg pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/diffprobe run workflows/demo.yaml
	@echo "report: runs/demo/report/index.html"

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/extract_throughput.py

clean:
	rm -rf runs .pytest_cache
