# hostlink_tw developer entry points.  Everything runs inside .venv/, which
# the first target that needs it creates from the package registry.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# trial's worker count: the suite is sized for 2 cores.
JOBS   ?= 2
TESTS  ?= tests

.PHONY: venv lint test unit demo bench bench-publish fuzz soak chaos clean

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check hostlink_tw tests twisted benchmarks evidence
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

# Chaos: a real twistd agent and control plane under each fault (the quick
# subset runs in make test); prints the fault/detection/recovery table.
chaos: $(STAMP)
	$(BIN)/python -m evidence.chaos

# Hypothesis against the client protocol (at least 100,000 examples) and
# against the task engine behind it (its share of the same budget).
FUZZ_EXAMPLES ?= 100000
fuzz: $(STAMP)
	HOSTLINK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/trial tests.test_fuzz tests.test_fuzz_tasks

# Control plane restarting every few seconds; fds, RSS and DelayedCalls sampled each minute.
MINUTES ?= 30
soak: $(STAMP)
	$(BIN)/python -m evidence.soak --minutes $(MINUTES)

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

# Cold start, idle cost, inbound throughput, reconnect storm; writes
# benchmarks/results/performance.rst and storm.png (git-ignored), never docs/.
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run

# Publish the last `make bench` run's results as docs/ (a deliberate step).
bench-publish:
	test -f benchmarks/results/performance.rst || { echo "run make bench first" >&2; exit 1; }
	cp benchmarks/results/performance.rst benchmarks/results/storm.png docs/
