# FlexAlign: every command sets itself up (a project virtualenv in .venv) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
# OpenMP threads sleep rather than spin while they wait: on a machine shared with other work, threads spinning for
# each other burn the cores the other work (or the other notebooks of make demo) would use, and a step waits longer
export OMP_WAIT_POLICY ?= PASSIVE
# glibc keeps the memory a process frees for its next allocation instead of unmapping big blocks: on a virtual
# machine that reports freed pages to its host (virtio-balloon free page reporting), each unmapped block is faulted
# back in page by page when next used (650 MB: 5 s instead of 0.1 s), and the read-out solve of notebook 05's TVL
# run took twice as long (notes on issue 36)
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 68719476736

.PHONY: setup demo study test test-browser results lab tensorboard sync bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: setup  ## the workbook: every notebook on SynthTouch -> runs/demo/
	$(PY) demo.py --out runs/demo

study: setup  ## every phase-1 variant × 3 seeds, mean ± std -> runs/study/study.md
	$(PY) study.py --out runs/study

# where a timing was taken (results.measured_on): the tests' JUnit XML carries it as its suite's name
MEASURED_ON = $$($(PY) -c 'import results; print(results.measured_on())')

test: setup  ## unit tests + every notebook in smoke mode, one pytest-xdist worker per core (tests/conftest.py)
	$(PY) -m pytest -q -n auto --junitxml=runs/tests/unit.xml -o junit_suite_name="$(MEASURED_ON)"

test-browser: setup  ## JupyterLab in headless Chromium (Debian's chromium): Run All, figures as images, k slider
	$(PY) -m pytest -q -m browser tests/test_browser.py --junitxml=runs/tests/browser.xml \
	    -o junit_suite_name="$(MEASURED_ON)"

results: setup  ## docs/results.md: every measured number, from run folders and docs/ (results.py says which)
	$(PY) results.py

# JupyterLab's settings for this virtualenv: no "get notified about official Jupyter news?" pop-up over every page
# (it asks while the setting fetchNews is unset; LabApp.news_url=None alone does not stop the question), no update check
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json

$(LAB_OVERRIDES):
	mkdir -p $(dir $@)
	echo '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > $@

# kernels talk to the server over Unix sockets in Jupyter's runtime folder, not over TCP on localhost: no "Kernel is
# running over TCP without encryption" warning at each kernel start, and no other user of the machine can connect
# (a Unix socket's path has at most 107 characters: keep JUPYTER_RUNTIME_DIR, if you set it, short)
lab: sync $(LAB_OVERRIDES)  ## JupyterLab with the modules importable (FLEXALIGN_SMOKE=1 make lab: tiny sizes, runs/lab-smoke)
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) --KernelManager.transport=ipc notebooks/

tensorboard: setup  ## TensorBoard on runs/: every run's losses, learning rate, validation and quality-vs-k tables
	$(VENV)/bin/tensorboard --logdir runs

sync: setup  ## notebooks/*.py to the form JupyterLab saves; create missing .ipynb working copies
	$(PY) workbook.py --sync

bench: setup  ## every bench/bench_*.py, its ratios with their spread over interleaved rounds -> docs/speed.md
	{ echo "# Speed"; echo; \
	  echo "Written by \`make bench\` at $(MEASURED_ON), $$(date -u '+%Y-%m-%d %H:%M UTC'). A ratio is the" \
	       "median over rounds in which the sides took turns, the slowest and fastest round in brackets." \
	       "\`python bench/NAME.py --help\` says what each compares; \`--off\` switches its optimisation off, and" \
	       "its ratio then reads about 1."; \
	  for b in bench/bench_*.py; do \
	    echo; echo "## \`$$b\`"; echo; echo '```'; \
	    $(PY) $$b > docs/.speed-part || exit 1; cat docs/.speed-part; echo '```'; \
	  done; } > docs/.speed.md
	rm docs/.speed-part && mv docs/.speed.md docs/speed.md && cat docs/speed.md

clean:
	rm -rf runs cache
