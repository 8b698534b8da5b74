# Two commands do all the set-up: `make demo` and `make test` (each installs what it needs).
PY ?= .venv/bin/python
STAMP := .venv/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export MLFLOW_DISABLE_TELEMETRY = true
export DO_NOT_TRACK = 1
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install browser demo test clean
install: $(STAMP)

# Debian's Chromium for the report's browser tests (they skip, saying so, where it cannot be installed).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: browser tests will be skipped"

# torch first, pinned: the CPU build lies on local disk; an unpinned torch would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e ".[dev]"
	rm -f .venv/.installed-* && touch $@

demo: install
	$(PY) -m rapidin.cli demo

test: install browser
	$(PY) -m pytest -q

clean:
	rm -rf .rapidin .pytest_cache

-include infra/local/stack.mk
-include benchmarks/bench.mk
