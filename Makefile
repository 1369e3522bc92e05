# bnnc — the two set-up commands of the README, plus helpers.
# Each target creates .venv if missing and installs the project with pinned versions.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bnnc-installed

.PHONY: quickstart test test-ci test-slow test-all clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: its CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/bnnc quickstart

test: $(STAMP)
	$(PY) -m pytest -q

# the slow tests CI runs on every change (≈5 min): 300 random networks deploy exactly, quickstart accuracy
test-ci: $(STAMP)
	$(PY) -m pytest -q -m ci

# every slow test (≈45 min on 2 cores): the zoo at 224×224, all exports, 300 random AdaBin networks, torchrun
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
