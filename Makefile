# The two commands of the README: `make demo` (train the embedded digits default, write samples and a
# checkpoint) and `make test` (the test suite). Both create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/digits_ve
CONFIG ?= configs/ve/digits_ncsnpp_continuous.py

.PHONY: env env-test demo test clean

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# Optional: torch and pytorch-fid for the cross-implementation tests against pytorch-fid's Inception
# (they skip without them; the checkpoint-import tests need neither). `make env-test test` runs everything.
# On a machine with a GPU, pip would fetch a large CUDA build of torch; CI here takes the CPU wheel.
env-test: $(VENV)/.installed-test

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

demo: env
	$(VENV)/bin/python main.py --config=$(CONFIG) --mode=train --workdir=$(WORKDIR)
	$(VENV)/bin/python main.py --config=$(CONFIG) --mode=eval --workdir=$(WORKDIR)

# Without `make env-test` first, the run ends by naming the cross-checks it skipped and the command that
# runs them (tests/conftest.py).
test: env
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV)
