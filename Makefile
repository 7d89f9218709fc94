# Two commands do all set-up on a machine with only Python >= 3.11 and make:
#   make demo   - create .venv, install, run the main job on the embedded stack
#   make test   - create .venv, install, run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean stack-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/landmarks demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

stack-down: $(STAMP)
	$(BIN)/landmarks stack down

clean:
	-$(BIN)/landmarks stack down
	rm -rf $(VENV) .landmarks .pytest_cache
