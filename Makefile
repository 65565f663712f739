# make demo   install into .venv, then train, evaluate and explain on the offline demo
# make app    install into .venv, then serve the web demo offline on http://127.0.0.1:7860
# make test      install into .venv, then the test suite: every test not marked slow (random tiny models)
# make test-all  the same with the slow tests (pre-trained demo base, demo runs, several processes); CI runs it
# make lint   ruff check (lines <= 120 included) and ruff format --check, as CI runs them
# make test-lowest  a fresh .venv-lowest with the LOWEST versions requirements*.txt allow (uv's lowest-direct
#                   resolution, torch as $(TORCH)), then the demo's three scripts and make test's tests (CI runs it)
# make reproduce  on a GPU: train, evaluate with every baseline, explain, the default
#                 sweep (r 8,32 x query,value / query,key,value,dense x seeds 1,2,3), then outputs/results.md;
#                 estimated 45-50 min on one H100 after the downloads (benchmarks/results/README.md: the arithmetic)
PYTHON ?= python3
VENV ?= .venv
LOWEST ?= .venv-lowest
PY := $(VENV)/bin/python
# torch from the default index: the CUDA build on Linux (several GB). For the CPU-only wheels:
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
UV ?= uv==0.13.9

.PHONY: install demo app test test-all lint test-lowest reproduce clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

demo: install
	$(PY) train.py --demo
	$(PY) evaluate.py --demo
	$(PY) explainability.py --demo

app: install
	$(PY) app.py --demo

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-all: install
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The floors in requirements*.txt are promises (pip keeps any installed version that meets them), so this
# installs exactly them. torch is installed by pip (it finds the local CPU build) and held at that version:
# uv would otherwise resolve torch itself, from the index, to the CUDA build.
test-lowest:
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q $(TORCH) "$(UV)"
	$(LOWEST)/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(LOWEST)/constraints.txt
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST)/bin/python --resolution lowest-direct \
		-r requirements.txt -r requirements-dev.txt -c $(LOWEST)/constraints.txt
	$(LOWEST)/bin/uv pip list --python $(LOWEST)/bin/python
	d="$$(mktemp -d)" && cd "$$d" && $(CURDIR)/$(LOWEST)/bin/python $(CURDIR)/train.py --demo \
		&& $(CURDIR)/$(LOWEST)/bin/python $(CURDIR)/evaluate.py --demo \
		&& $(CURDIR)/$(LOWEST)/bin/python $(CURDIR)/explainability.py --demo; rc=$$?; rm -rf "$$d"; exit $$rc
	$(LOWEST)/bin/python -m pytest -q -m "not slow" tests

# The Hub's model and data set, and CLIP, must be reachable (or in the local Hugging Face cache)
SWEEP_FLAGS ?=
reproduce: install
	$(PY) train.py
	$(PY) evaluate.py --output_dir outputs/eval
	$(PY) explainability.py
	$(PY) sweep.py --output_dir outputs/sweep $(SWEEP_FLAGS) --results outputs/results.md --eval_dir outputs/eval

clean:
	rm -rf outputs
