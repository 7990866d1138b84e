# Transformer family notebooks. `make help` lists the targets.
PYTHON ?= python3
NB ?=
NB_ARGS := $(foreach n,$(NB),--nb $(n))
export KINETO_LOG_LEVEL := 5
# Exports: MathJax 2.7 (Debian's libjs-mathjax) and Chromium, found here or where these point.
export MATHJAX_DIR ?= /usr/share/javascript/mathjax
export CHROMIUM ?= chromium
# $(call need,CHECK,WHAT,PACKAGE): stop with the install command when CHECK fails.
need = @$(1) >/dev/null 2>&1 || { echo "make $@ needs $(2): install it with 'apt-get install $(3)' (as root)"; exit 1; }

.PHONY: help setup run smoke test unit lint results bench html pdf slides lines clean

help:
	@echo "make setup            install the pinned requirements"
	@echo "make run [NB=02]      run notebooks (cpu preset) -> figures/, results/, build/html/"
	@echo "make smoke [NB=02]    run notebooks with SMOKE=True (seconds each, scratch output)"
	@echo "make test             lint + unit tests + every notebook in smoke mode"
	@echo "make unit             unit tests of common/ only"
	@echo "make lint             ruff on .py and .ipynb; notebooks stored without outputs"
	@echo "make bench            the GPT core benchmark -> results/00_core_benchmark.json"
	@echo "make results          regenerate README's results and deliverables sections from results/, figures/, notebooks"
	@echo "make html [NB=02]     executed notebooks (build/executed) -> build/html/, offline MathJax"
	@echo "make pdf [NB=02]      the same pages printed by headless Chromium -> build/pdf/"
	@echo "make slides [NB=02]   reveal.js decks from the cells' slide metadata -> build/slides/"
	@echo "make lines            code lines per notebook (+ the common/ modules it uses) -> README"

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
	$(PYTHON) scripts/deliverables_table.py

html:
	$(call need,test -f $(MATHJAX_DIR)/MathJax.js,MathJax 2.7,libjs-mathjax)
	$(PYTHON) scripts/export.py html $(NB_ARGS)

pdf:
	$(call need,test -f $(MATHJAX_DIR)/MathJax.js,MathJax 2.7,libjs-mathjax)
	$(call need,command -v $(CHROMIUM),Chromium,chromium)
	$(PYTHON) scripts/export.py pdf $(NB_ARGS)

slides:
	$(call need,test -f $(MATHJAX_DIR)/MathJax.js,MathJax 2.7,libjs-mathjax)
	$(call need,command -v npm,npm (reveal.js comes from the npm registry),npm)
	$(PYTHON) scripts/export.py slides $(NB_ARGS)

lines:
	$(PYTHON) scripts/count_lines.py

clean:
	rm -rf build/smoke build/executed build/html build/pdf build/slides
