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

# Two pytest workers (pytest-xdist): on two cores the suite's many short TensorFlow processes overlap; tests that
# share one trained run are kept on one worker (xdist_group). TEST_WORKERS=0 runs it in this process alone.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
