# The README's two commands: `make demo` and `make test`. Both create .venv and install into it
# (the docs extra too: the suite builds the documentation site with `mkdocs build --strict`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_output

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,beam,lite,docs]"

demo: install
	DEMO_DIR=$(DEMO_DIR) PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
