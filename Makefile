# Two commands for a newcomer (see README.md): `make demo` and `make test`.
# Both create .venv and install xraylib with its dev extras first (once; again when pyproject.toml changes).
# `make test` also creates .venv-colab, the same install pinned to Google Colab's TensorFlow/Keras
# (colab-versions.txt), and runs the save/load/predict tests (marker keras_versions) there: a model
# saved with one Keras version must load and predict the same with the other (tests/test_keras_versions.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
COLAB_VENV := .venv-colab
COLAB_BIN := $(COLAB_VENV)/bin
COLAB_STAMP := $(COLAB_VENV)/.installed-stamp

.PHONY: demo test test-main test-colab setup clean notebooks wheel

demo: $(STAMP)
	$(BIN)/python -m xraylib demo --output-dir outputs/demo

test: test-main test-colab

# The whole suite with the versions xraylib is developed on; the cross-version test loads its
# models in .venv-colab (XRAYLIB_OTHER_PYTHON).
test-main: $(STAMP) $(COLAB_STAMP)
	MPLBACKEND=Agg XRAYLIB_OTHER_PYTHON=$(abspath $(COLAB_BIN)/python) $(BIN)/python -m pytest

# Colab's versions: only the tests that matter for version drift (saving, loading, predicting, and the
# notebooks run as in Colab); the notebooks' stored outputs are compared in .venv only.
test-colab: $(STAMP) $(COLAB_STAMP)
	MPLBACKEND=Agg XRAYLIB_OTHER_PYTHON=$(abspath $(BIN)/python) XRAYLIB_COMPARE_NOTEBOOK_OUTPUTS=0 \
		$(COLAB_BIN)/python -m pytest -m keras_versions -p no:nbval

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "xraylib needs Python 3.10 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

$(COLAB_STAMP): pyproject.toml colab-versions.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "xraylib needs Python 3.10 or newer"'
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_BIN)/python -m pip install --quiet --upgrade pip
	$(COLAB_BIN)/python -m pip install --quiet -c colab-versions.txt -e ".[dev]"
	touch $(COLAB_STAMP)

clean:
	rm -rf $(VENV) $(COLAB_VENV) outputs .pytest_cache

# The notebooks as GitHub shows them: executed on the sample data in a Colab stand-in (tests/notebook_runner.py),
# outputs stored in notebooks/*.ipynb. `make notebooks NB="04 05"` stores only those (all run: each needs the last).
notebooks: $(STAMP)
	$(BIN)/python tests/notebook_runner.py $(NB)

# A wheel of xraylib (dist/xraylib_cxr-VERSION-py3-none-any.whl): upload it to the top of My Drive and the
# notebooks' setup cell installs it (README, "In Google Colab").
wheel: $(STAMP)
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .
	@ls dist/xraylib_cxr-*.whl
