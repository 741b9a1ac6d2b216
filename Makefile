# The two commands of the README: `make demo` and `make test` (each creates .venv on first use).
VENV := .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline

.PHONY: demo test check-tests install clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard requirements/lock-py*.txt) tools/install.sh
	sh tools/install.sh

demo: install
	$(PY) paper_repro/hinton2015/run.py --source mnist5k --workdir runs/hinton2015

test: install
	$(PY) -m pytest -q -n auto -p no:cacheprovider

# Each feature switched off in turn (tests/feature_off/): the tests guarding it must fail.
check-tests: install
	$(PY) -m tests.feature_off.run

clean:
	rm -rf $(VENV) runs
