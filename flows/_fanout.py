"""Run shard groups in this process or as concurrent runs of a shard deployment (one GPU queue each)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect.futures import as_completed
from pydantic import BaseModel

from tasks.common import Executor
from tasks.dispatch import queue_for, run_shard_deployment


def fan_out(executor: Executor, jobs: Sequence[BaseModel], local: Callable[[BaseModel], Any], deployment: str,
            parameter: str, label: str, on_done: Callable[[BaseModel], None] | None = None) -> None:
    """Run every job (each has a `group` number); `local` is the task to call in-process."""
    if executor == "local":
        for job in jobs:  # sequential: one model, one device, in this process
            local(job)
            if on_done:
                on_done(job)
        return
    if executor != "deployment":
        raise ValueError(f"executor must be 'local' or 'deployment', not {executor!r}")
    futures, by_id = [], {}
    for job in jobs:
        params = {parameter: job.model_dump(mode="json")}
        future = run_shard_deployment.submit(deployment, params, queue_for(job.group), f"{label}-group-{job.group}")
        futures.append(future)
        by_id[id(future)] = job
    errors = []
    for future in as_completed(futures):
        try:
            future.result()
        except Exception as exc:  # collect, so every finished group still reports progress
            errors.append(exc)
            continue
        if on_done:
            on_done(by_id[id(future)])
    if errors:
        raise errors[0]
