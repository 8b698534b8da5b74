"""Fan-out to the GPU pool: one run of a shard deployment per group, each on its own work queue."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger

from .common import settings


class ShardRunFailed(RuntimeError):
    """A shard deployment run did not complete."""


def queue_for(group: int, queues: int | None = None) -> str:
    """Round-robin work queue (gpu-0, gpu-1, ...) of a shard group: one queue per GPU."""
    n = queues or settings().gpu_queues
    return f"gpu-{group % n}"


@task(name="run-shard-deployment", cache_policy=NO_CACHE)
def run_shard_deployment(deployment: str, parameters: dict[str, Any], queue: str, label: str) -> str:
    """Create a run of `deployment` on `queue`, wait for it, and fail unless it completed; returns the run id."""
    logger = get_run_logger()
    run = run_deployment(deployment, parameters=parameters, work_queue_name=queue, flow_run_name=label,
                         timeout=None, poll_interval=settings().poll_seconds, as_subflow=True)
    state = run.state
    logger.info("%s on %s: %s", label, queue, state.name if state else "unknown")
    if state is None or not state.is_completed():
        raise ShardRunFailed(f"{deployment} run {run.name} ({run.id}) on queue {queue} ended "
                             f"{state.name if state else 'without a state'}: {state.message if state else ''}")
    return str(run.id)
