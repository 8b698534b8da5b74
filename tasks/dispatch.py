"""Fan-out to the GPU pool: one run of a shard deployment per group, each on its own work queue."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger

from .common import settings

# A fanned-out scan pays when the scan time it saves, (1 - 1/queues) of a local scan, exceeds what dispatch costs.
# Measured on the local stack (benchmarks/stack_e2e.py, 2 CPU cores): a shard run starts ~10 s after it is created
# (mean dispatch latency 9.9 s; a 600-row attribution took 16.5 s fanned out against 5.2 s in-process), and a
# local scan reads 0.18-0.32 GB/s of cache (benchmarks/README.md). With 2 queues the break-even is a ~20 s local
# scan, i.e. ~4-6 GB of cache: below 4 GiB `auto` scans in the flow's own process.
FANOUT_MIN_BYTES = 4 * 2**30


def choose_scan_executor(requested: str, cache_bytes: int, queues: int) -> tuple[str, str]:
    """(executor, why) for a scan: `auto` fans out only a cache of FANOUT_MIN_BYTES or more, to 2+ queues."""
    if requested != "auto":
        return requested, f"executor {requested} as asked"
    if queues > 1 and cache_bytes >= FANOUT_MIN_BYTES:
        return "deployment", f"auto: {cache_bytes / 2**30:.1f} GiB cache >= {FANOUT_MIN_BYTES / 2**30:.0f} GiB, fanned out"
    return "local", (f"auto: {cache_bytes / 2**20:.1f} MiB cache < {FANOUT_MIN_BYTES / 2**30:.0f} GiB (or one queue), "
                     "scanned here: fanning out would cost more in dispatch (~10 s a run) than it saves")


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
