# make demo: offline demo on the bundled data (packaged MiniLM, CPU is fine)
# make test: the CPU test suite (what CI runs)
# Each target builds its own virtual environment from nothing on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

demo: $(VENV)/installed
	PATH=$(abspath $(VENV))/bin:$$PATH bash run_all.sh --demo

test: $(VENV)/installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) results runs
