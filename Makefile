# Two commands for a newcomer (see README.md): `make demo` and `make test`.
# Both create .venv and install xraylib with its dev extras first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test setup clean notebooks

demo: $(STAMP)
	$(BIN)/python -m xraylib demo --output-dir outputs/demo

test: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m pytest

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "xraylib needs Python 3.10 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) outputs .pytest_cache

# The notebooks as GitHub shows them: executed on the sample data in a Colab stand-in (tests/notebook_runner.py),
# outputs stored in notebooks/*.ipynb. `make notebooks NB="04 05"` stores only those (all run: each needs the last).
notebooks: $(STAMP)
	$(BIN)/python tests/notebook_runner.py $(NB)
