# Transformer family notebooks. `make help` lists the targets.
PYTHON ?= python3
NB ?=
NB_ARGS := $(foreach n,$(NB),--nb $(n))
export KINETO_LOG_LEVEL := 5

.PHONY: help setup run smoke test unit lint results bench html clean

help:
	@echo "make setup            install the pinned requirements"
	@echo "make run [NB=02]      run notebooks (cpu preset) -> figures/, results/, build/html/"
	@echo "make smoke [NB=02]    run notebooks with SMOKE=True (seconds each, scratch output)"
	@echo "make test             lint + unit tests + every notebook in smoke mode"
	@echo "make unit             unit tests of common/ only"
	@echo "make lint             ruff on .py and .ipynb; notebooks stored without outputs"
	@echo "make bench            the GPT core benchmark -> results/00_core_benchmark.json"
	@echo "make results          regenerate README's results section from results/*.json"
	@echo "make html             export the executed notebooks in build/executed to build/html"

setup:
	$(PYTHON) -m pip install -r requirements.txt

run:
	$(PYTHON) scripts/run_notebooks.py $(NB_ARGS)

smoke:
	$(PYTHON) scripts/run_notebooks.py --smoke --no-html $(NB_ARGS)

test: lint
	$(PYTHON) -m pytest tests -q

unit:
	$(PYTHON) -m pytest tests -q --ignore=tests/test_notebooks.py

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m nbstripout --verify [0-9][0-9]_*.ipynb

bench:
	$(PYTHON) scripts/bench_core.py

results:
	$(PYTHON) scripts/results_table.py

html:
	@for nb in build/executed/*.ipynb; do $(PYTHON) -m jupyter nbconvert --to html --output-dir build/html $$nb; done

clean:
	rm -rf build/smoke build/executed build/html
