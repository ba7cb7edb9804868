# semlens: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: venv demo test lint deps wheel-check browser bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/semlens demo --out $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/report.html"
	@echo "browse and correct the demo classifier: $(VENV)/bin/semlens serve -p $(DEMO_OUT)/projects/classifier"
	@echo "browse and correct the demo captioner:  $(VENV)/bin/semlens serve -p $(DEMO_OUT)/projects/captioner"

# Debian's chromium for the browser tests (the report's check, the web app's scenarios); installed when
# missing (as root, as in CI). Without it the browser tests fail: they are part of the suite.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The whole suite, the linter, the dependency check and the installed-wheel smoke test.
test: $(STAMP) browser
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup -q --durations=15 tests
	$(MAKE) lint deps wheel-check

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools

# Every third-party module the package imports is declared in pyproject.toml; nothing declared is unused.
deps: $(STAMP)
	$(VENV)/bin/deptry src

# Build the wheel, check its contents, install it into a fresh venv (pip resolving only the declared
# dependencies) and run the newcomer's first commands there.
wheel-check: $(STAMP)
	$(PY) tools/wheel_check.py

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info src/*.egg-info
