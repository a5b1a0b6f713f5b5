# `make repro`: set up .venv and run the whole pipeline. `make test`: set up .venv and run the tests.
PYTHON ?= $(shell command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

repro: setup
	dvc repro
	python -m pipeline.summary

test: setup
	python -m pytest -q tests

clean:
	rm -rf $(VENV) dvc_plots
