# make demo   install into .venv, then train, evaluate and explain on the offline demo
# make app    install into .venv, then serve the web demo offline on http://127.0.0.1:7860
# make test   install into .venv, then run the test suite (what CI runs)
# make test-fast  the same without the tests marked slow: a one-minute loop while developing
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch from the default index: the CUDA build on Linux (several GB). For the CPU-only wheels:
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0

.PHONY: install demo app test test-fast clean

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
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf outputs
