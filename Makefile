# FlexAlign: every command sets itself up (a project virtualenv in .venv) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: setup demo test lab sync bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: setup  ## the workbook: every notebook on SynthTouch -> runs/demo/
	$(PY) workbook.py --out runs/demo

test: setup  ## unit tests + every notebook in smoke mode
	$(PY) -m pytest -q

lab: setup  ## JupyterLab with the modules importable from the notebooks
	$(VENV)/bin/jupyter lab notebooks/

sync: setup  ## rewrite notebooks/*.ipynb from their .py twins
	$(PY) workbook.py --sync

bench: setup  ## speed benchmarks, printed as ratios measured in one run
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs cache
