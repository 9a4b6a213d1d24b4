# `make run`: set up .venv and run the quickstart recipe. `make test`: set up and run every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(sort $(wildcard plugins/*))
STAMP := $(VENV)/.memwise-installed

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU build of torch first; the project's range (torch>=2.6) then installs nothing more
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]' $(foreach p,$(PLUGINS),-e $(p))
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/memwise run recipes/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
