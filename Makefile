# make demo   install into .venv, then train, evaluate and explain on the offline demo
# make app    install into .venv, then serve the web demo offline on http://127.0.0.1:7860
# make test   install into .venv, then run the test suite (what CI runs)
# make test-fast  the same without the tests marked slow: a one-minute loop while developing
# make reproduce  on a GPU (`make reproduce TORCH=torch`): train, evaluate with every baseline, explain, the default
#                 sweep (r 8,32 x query,value / query,key,value,dense x seeds 1,2,3), then outputs/results.md;
#                 estimated 45-50 min on one H100 after the downloads (sweeps.py's docstring: the arithmetic)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine use e.g. `make demo TORCH=torch` for the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo app test test-fast reproduce clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

demo: install
	$(PY) train.py --demo
	$(PY) evaluate.py --demo
	$(PY) explainability.py --demo

app: install
	$(PY) app.py --demo

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# The Hub's model and data set, and CLIP, must be reachable (or in the local Hugging Face cache)
SWEEP_FLAGS ?=
reproduce: install
	$(PY) train.py
	$(PY) evaluate.py --output_dir outputs/eval
	$(PY) explainability.py
	$(PY) sweep.py --output_dir outputs/sweep $(SWEEP_FLAGS) --results outputs/results.md --eval_dir outputs/eval

clean:
	rm -rf outputs
