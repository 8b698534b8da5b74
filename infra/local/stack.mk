# Local real-service stack (SeaweedFS S3, MLflow, Prefect server + workers); see infra/local/README.md.
# Included by the main Makefile: `include infra/local/stack.mk`.
PY ?= .venv/bin/python
STACK_DIR ?= .stack
GPU_WORKERS ?= 2

.PHONY: stack-up stack-down stack-status

stack-up:  ## start the stack in $(STACK_DIR); then `source $(STACK_DIR)/env.sh`
	$(PY) -m infra.local.stack up --dir $(STACK_DIR) --gpu-workers $(GPU_WORKERS)

stack-down:  ## stop every process of the stack (workers first; SIGKILL after a timeout)
	$(PY) -m infra.local.stack down --dir $(STACK_DIR)

stack-status:  ## health of each service
	$(PY) -m infra.local.stack status --dir $(STACK_DIR)
