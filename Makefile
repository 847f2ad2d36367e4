# The two commands of the README: `make demo` and `make test`. Both create or refresh .venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow clean

# Reinstall whenever pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# The spine end to end on the embedded SmolLM2 target (each stage resumes if interrupted).
DEMO := --config experiments/quickstart.yaml
demo: venv
	$(BIN)/confu target $(DEMO)
	$(BIN)/confu prepare $(DEMO)
	$(BIN)/confu cache $(DEMO)
	$(BIN)/confu train $(DEMO)
	$(BIN)/confu eval $(DEMO)

test: venv
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

test-slow: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
