# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-lock.txt 2>/dev/null | sha1sum | cut -c1-12)
DATA_ROOT ?= $(or $(RAYDC_DATA_ROOT),$(wildcard ../shared/data))
export RAYDC_DATA_ROOT := $(DATA_ROOT)
# Keep Ray's state of each invocation out of /tmp clutter and quiet its usage reporting.
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: browser demo lint test test-all test-multinode bench bench-quick install lock clean

# The lock file holds the exact versions the tests pass on (pyproject.toml holds ranges); `make lock` rewrites it
# from the venv after a deliberate upgrade.
EXTRAS := cpu,test,tune,mlflow,umap,timm
$(STAMP): pyproject.toml requirements-lock.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements-lock.txt -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip check
	@# numba's on-disk cache of UMAP's kernels, filled once here rather than by the first fit of each checkout
	$(BIN)/python -c "from raydc.core.merge import fill_manifold_cache as f; print(f'UMAP kernels cached in {f():.0f} s')"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raydc train --config jobs/configs/demo.yaml --overwrite

# Headless Chromium for the report's browser tests (Debian's package); they skip, saying why, without it.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "chromium not installed: the report's browser tests will skip"

# ruff over the code and tests, mypy over raydc/ (config and the reasons for each exception: pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Two pytest-xdist workers, each with its own session Ray; whole files go to one worker, so module fixtures are
# built once. One process leaves part of both cores idle between Ray's start-ups; two fill those gaps.
# Every test's Ray workers and CLI runs are fresh Python processes: where the environment sets
# PYTHONDONTWRITEBYTECODE, each of them would compile raydc's modules again (an empty value turns caching back on).
TEST_WORKERS ?= 2
test: $(STAMP) browser
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -m "not slow" -q --timeout=600 --durations=30 -n $(TEST_WORKERS) --dist loadfile tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-multinode: $(STAMP)
	$(BIN)/python -m pytest -q -m "" tests/test_multinode.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --full

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

lock:
	$(BIN)/python tools/lock.py $(subst $(comma), ,$(EXTRAS)) > requirements-lock.txt

comma := ,

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
