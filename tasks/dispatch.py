"""Fan-out to the GPU pool: one run of a shard deployment per group, each on its own work queue."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ObjectNotFound
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger

from .common import settings


class ShardRunFailed(RuntimeError):
    """A shard deployment run did not complete."""


def queue_for(group: int, queues: int | None = None) -> str:
    """Round-robin work queue ({gpu_pool}-0, -1, ...: gpu-0, gpu-1 by default) of a shard group: one per GPU."""
    s = settings()
    return f"{s.gpu_pool}-{group % (queues or s.gpu_queues)}"


@task(name="run-shard-deployment", cache_policy=NO_CACHE)
def run_shard_deployment(deployment: str, parameters: dict[str, Any], queue: str, label: str) -> str:
    """Create a run of `deployment` on `queue`, wait for it, and fail unless it completed; returns the run id."""
    logger = get_run_logger()
    try:
        run = run_deployment(deployment, parameters=parameters, work_queue_name=queue, flow_run_name=label,
                             timeout=None, poll_interval=settings().poll_seconds, as_subflow=True)
    except ObjectNotFound:
        raise ShardRunFailed(f"deployment {deployment!r} (or its work queue {queue!r}) does not exist: run "
                             "`prefect deploy --prefect-file deployments/prefect.yaml --all` and create the "
                             "gpu-i queues, or use executor='local'") from None
    state = run.state
    logger.info("%s on %s: %s", label, queue, state.name if state else "unknown")
    if state is None or not state.is_completed():
        raise ShardRunFailed(f"{deployment} run {run.name} ({run.id}) on queue {queue} ended "
                             f"{state.name if state else 'without a state'}: {state.message if state else ''}")
    return str(run.id)
