# Fresh machine -> .venv -> everything installed. No GPU: CPU torch; GPU: CUDA torch (scripts/setup.sh).
PY := .venv/bin/python
WORKSPACE ?= demo-workspace
PORT ?= 8501

.PHONY: setup setup-test demo test test-fast lint bench clean

setup:
	scripts/setup.sh app

setup-test:
	scripts/setup.sh app,test,ray
	scripts/install_browser.sh

demo: setup
	$(PY) -m workbench.cli demo --workspace $(WORKSPACE) --port $(PORT)

test: setup-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow and not browser and not ray"

lint: setup-test
	$(PY) -m ruff check .

bench: setup-test
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .venv .pytest_cache test-artifacts
