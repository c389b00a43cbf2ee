# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-lock.txt 2>/dev/null | sha1sum | cut -c1-12)
DATA_ROOT ?= $(or $(RAYDC_DATA_ROOT),$(wildcard ../shared/data))
export RAYDC_DATA_ROOT := $(DATA_ROOT)
# Keep Ray's state of each invocation out of /tmp clutter and quiet its usage reporting.
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo lint test test-all test-multinode bench bench-quick install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cpu,test]"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raydc train --config jobs/configs/demo.yaml --overwrite

# ruff over the code and tests, mypy over raydc/ (config and the reasons for each exception: pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q --timeout=600 --durations=15 tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-multinode: $(STAMP)
	$(BIN)/python -m pytest -q -m "" tests/test_multinode.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --full

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
