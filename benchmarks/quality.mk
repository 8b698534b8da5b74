# Attribution quality on the Howdy backdoor (included by the main Makefile): `make bench-quality`.
# Full run: all 5,000 rows (hours on 2 CPU cores). The measured run of benchmarks/README_quality.md:
#   make bench-quality QUALITY_ARGS="--rows 1000 --threads 2"
# (+ --tracin-epochs 2: the epoch-2 checkpoint, exact and through rapidin.attribute (the flows' TracIn default);
#  --int8: the default cache stored as int8 against fp16; --preconditioners: our diagonal / EK-FAC;
#  --peers: kronfluence EK-FAC and diagonal; --bergson: EleutherAI bergson; all on the same rows and generations)
# Stages are cached under QUALITY_WORKDIR: rerunning resumes where it stopped.
PY ?= .venv/bin/python
QUALITY_DATA ?= ../shared/data/howdy
QUALITY_WORKDIR ?= .rapidin/howdy
QUALITY_OUT ?= benchmarks/quality_results.json
QUALITY_ARGS ?=

.PHONY: bench-quality
bench-quality: install $(SMOLLM2) $(PEERS)
	PYTHONPATH=$(PEERS_DIR) $(PY) benchmarks/howdy.py --data $(QUALITY_DATA) --gguf $(SMOLLM2) --workdir $(QUALITY_WORKDIR) \
		--out $(QUALITY_OUT) --markdown $(QUALITY_WORKDIR)/table.md $(QUALITY_ARGS)
