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
# subsets run in make test); prints phase 1's fault/detection/recovery table,
# then the tasks table (ran once, delivered once, output complete, recovery,
# RSS).  Both always run; the target fails if either misses.  The store's
# disk-full fault mounts a tmpfs when it may (root), else uses RLIMIT_FSIZE.
# CHAOS_RST=FILE also writes the tasks table as RST (for docs/chaos.rst).
CHAOS_RST ?=
chaos: $(STAMP)
	$(BIN)/python -m evidence.chaos; phase1=$$?; \
	$(BIN)/python -m evidence.chaos_tasks $(if $(CHAOS_RST),--rst $(CHAOS_RST)); tasks=$$?; \
	test $$phase1 -eq 0 -a $$tasks -eq 0

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

# Cold start, idle cost, inbound throughput, reconnect storm, and phase 2's
# task round trip and task output throughput; writes
# benchmarks/results/performance.rst and storm.png (git-ignored), never docs/.
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run

# Publish the last `make bench` run's results as docs/ (a deliberate step).
bench-publish:
	test -f benchmarks/results/performance.rst || { echo "run make bench first" >&2; exit 1; }
	cp benchmarks/results/performance.rst benchmarks/results/storm.png docs/
