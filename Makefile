# hostlink_tw developer entry points.  Everything runs inside .venv/, which
# the first target that needs it creates from the package registry.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# trial's worker count: the suite is sized for 2 cores.
JOBS   ?= 2
TESTS  ?= tests

.PHONY: venv lint test unit demo clean

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check hostlink_tw tests twisted benchmarks
	$(BIN)/mypy hostlink_tw

# The whole suite under trial; its dirty-reactor check stays on.
unit: $(STAMP)
	$(BIN)/trial --jobs=$(JOBS) $(TESTS)

test: lint unit

clean:
	rm -rf $(VENV) _trial_temp* build dist *.egg-info .mypy_cache .ruff_cache
	find twisted/plugins -name dropin.cache -delete

# The reference control plane and an agent on 127.0.0.1, narrated; Ctrl-C ends it.
demo: $(STAMP)
	$(BIN)/hostlink-tw demo
