"""Cache tasks: plan a cache, build one shard group (retried; committed shards are skipped), finalize."""

from __future__ import annotations

import json
import time
import uuid
from uuid import UUID

from prefect import task
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel

from rapidin.cache import CachePlan, build_shards, finalize_cache, fit_missing, plan_cache
from rapidin.errors import CacheError
from rapidin.models import LoadedModel
from rapidin.precondition import PreconditionerRecord
from rapidin.store import CacheStore, Manifest

from .common import IO_RETRIES, WORK_RETRIES, CacheJob, ShardGroup, settings
from .faults import maybe_fail
from .models import loaded_model, resolve


class GroupReport(BaseModel):
    """What one shard group did."""

    group: int
    shards: list[int]
    rows: int
    load_seconds: float
    seconds: float


def plan_job(job: CacheJob, shards: list[int] | None = None) -> tuple[CachePlan, LoadedModel, float]:
    """Resolve and load the job's model (memoised) and plan its cache (a worker's plan of these shards, if given: each
    shard's rows tokenized as it is built); returns plan, model, load seconds."""
    s = settings()
    resolved = resolve(job.model, s)
    t0 = time.perf_counter()
    loaded, _ = loaded_model(resolved.ref, job.device or s.device, s)
    load_seconds = time.perf_counter() - t0
    plan = plan_cache(loaded, job.data_url, job.store_url, sketch=job.sketch, gradient=job.gradient,
                      shard_rows=job.shard_rows, fmt=job.fmt, skip_bad_rows=job.skip_bad_rows,
                      storage_options=s.storage_options(job.store_url),
                      data_storage_options=s.storage_options(job.data_url), shards=shards)
    if job.cache_id and plan.manifest.cache_id != job.cache_id:
        raise CacheError(f"planned cache {plan.manifest.cache_id} but the job expects {job.cache_id}: this worker sees "
                         "another model, data set or sketch than the flow that dispatched it")
    return plan, loaded, load_seconds


class PlanInfo(BaseModel):
    """A planned cache: where it lives, its manifest, and how long loading the model took here."""

    cache_url: str
    manifest: Manifest
    load_seconds: float
    seconds: float
    notice: str | None = None


@task(name="plan-cache", **IO_RETRIES, cache_policy=NO_CACHE)
def plan_cache_task(job: CacheJob) -> PlanInfo:
    """Write the manifest draft and examples table (idempotent); returns where the cache lives."""
    t0 = time.perf_counter()
    plan, _, load_seconds = plan_job(job)
    if plan.notice:
        get_run_logger().warning(plan.notice)
    return PlanInfo(cache_url=plan.store.url, manifest=plan.manifest, load_seconds=load_seconds,
                    seconds=time.perf_counter() - t0 - load_seconds, notice=plan.notice)


def build_group(group: ShardGroup, on_progress=None) -> GroupReport:
    """Build the group's shards (skipping committed ones) and write its report next to the other groups'."""
    t0 = time.perf_counter()
    plan, loaded, load_seconds = plan_job(group.job, group.shards)

    rows = {"done": 0, "total": sum(b - a for a, b in map(plan.manifest.shard_range, group.shards))}

    def on_shard(info, done: int, total: int) -> None:
        rows["done"] += info.stop - info.start
        if on_progress:
            on_progress(done, total, rows["done"], rows["total"])
        maybe_fail("cache-shard", done)

    infos = build_shards(plan, loaded, indices=group.shards, progress=False, on_shard=on_shard)
    report = GroupReport(group=group.group, shards=group.shards, rows=sum(i.stop - i.start for i in infos),
                         load_seconds=load_seconds, seconds=time.perf_counter() - t0)
    s = settings()
    CacheStore(group.report_url, s.storage_options(group.report_url)).write_bytes(
        f"group-{group.group:04d}.json", report.model_dump_json().encode())
    return report


@task(name="cache-shard-group", **WORK_RETRIES, cache_policy=NO_CACHE)
def cache_shard_group(group: ShardGroup, progress_artifact: str | None = None, offset: int = 0,
                      total: int = 0) -> GroupReport:
    """Compute, sketch and commit a group of shards; a retry resumes after the last committed shard."""
    logger = get_run_logger()
    started = time.perf_counter()

    def update(done: int, n: int, rows: int, rows_total: int) -> None:
        elapsed = max(time.perf_counter() - started, 1e-9)
        logger.info("group %d: %d/%d shards, %d/%d rows, %.1f rows/s, ETA %.0f s", group.group, done, n, rows,
                    rows_total, rows / elapsed, elapsed / max(rows, 1) * (rows_total - rows))
        if progress_artifact:
            update_progress_artifact(UUID(progress_artifact), 100.0 * (offset + done) / max(total, 1))
    report = build_group(group, update)
    logger.info("group %d: shards %s, %d rows in %.1fs", group.group, group.shards, report.rows, report.seconds)
    return report


@task(name="fit-preconditioners", **WORK_RETRIES, cache_policy=NO_CACHE)
def fit_preconditioners_task(job: CacheJob, kinds: list[str]) -> list[PreconditionerRecord]:
    """Fit the preconditioners the complete cache lacks (one or two gradient passes over its rows); a retry keeps
    the kinds already committed."""
    plan, loaded, _ = plan_job(job)
    records = fit_missing(plan, loaded, kinds, progress=False)
    for r in records:
        get_run_logger().info("preconditioner %s: %d rows, %.1f s, %d bytes", r.kind, r.rows, r.seconds, r.bytes)
    return records


def read_reports(report_url: str) -> list[GroupReport]:
    """The reports every finished group wrote."""
    s = settings()
    store = CacheStore(report_url, s.storage_options(report_url))
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path, detail=False))
    except FileNotFoundError:
        return []
    return [GroupReport.model_validate(json.loads(store.read_bytes(n))) for n in names if n.startswith("group-")]


def scratch_url(cache_url: str) -> str:
    """A fresh scratch directory for one run's partial results (CacheStore.scratch_location)."""
    return CacheStore.scratch_location(cache_url, uuid.uuid4().hex[:12])


def remove_dir(url: str) -> None:
    """Delete a scratch directory (best effort)."""
    store = CacheStore(url, settings().storage_options(url))
    try:
        store.fs.rm(store.path, recursive=True)
    except (FileNotFoundError, OSError):
        pass


@task(name="finalize-cache", **IO_RETRIES, cache_policy=NO_CACHE)
def finalize_cache_task(cache_url: str, extra_timings: dict[str, float] | None = None) -> Manifest:
    """Mark the cache complete once every shard is committed (needs no model: reads the store only)."""
    store = CacheStore(cache_url, settings().storage_options(cache_url))
    manifest = store.read_manifest()
    if manifest.complete:
        return manifest
    return finalize_cache(CachePlan(store, manifest, [], []), extra_timings)
