"""cache_gradients: plan a model version's gradient cache, build its shard groups, finalize, track."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from rapidin.config import BuildConfig, GradientConfig, SketchConfig, default_of, field_of
from rapidin.data import DataFormat
from rapidin.precondition import read_record
from rapidin.store import CacheStore
from tasks.cache import (cache_shard_group, finalize_cache_task, fit_preconditioners_task, plan_cache_task, read_reports,
                         remove_dir, scratch_url)
from tasks.common import CacheJob, Executor, ModelSpec, ShardGroup, form_help, settings, split_groups
from tasks.models import resolve_model
from tasks.publish import set_progress, start_progress
from tasks.tracking import (fail_run_task, in_default_store, log_cache_run, log_preconditioners_task, public_uri,
                            start_run_task, tag_model_version_task)

from ._fanout import fan_out


class CacheSummary(BaseModel):
    """What cache_gradients did."""

    cache_url: str
    cache_id: str
    model_name: str
    model_version: str
    built: bool = Field(description="False when a complete cache already existed (nothing was computed).")
    rows: int
    shards: int
    mlflow_run_id: str | None = None
    mlflow_link: str | None = None
    checkpoints: list[CacheSummary] = Field(default_factory=list, description="The caches of the checkpoints the "
                                            "version's fine-tune kept (for TracIn attributions).")


@flow(name="cache-gradients", log_prints=True)
@form_help
def cache_gradients(
    model: Annotated[ModelSpec, Field(description="The model version to cache, e.g. uri models:/my-model/3.")],
    data_url: Annotated[str, Field(description="Training data: a snapshot URL from ingest-dataset, or a file.")],
    sketch: Annotated[SketchConfig | None, Field(description="Sketch options; None: RAPIDIN_SKETCH_METHOD / "
                                                 "RAPIDIN_K / RAPIDIN_LAM (defaults rapidgrad, K=2^16, λ=20).")] = None,
    gradient: Annotated[GradientConfig, Field(description="Per-example gradient options.")] = GradientConfig(),
    shard_rows: Annotated[int, field_of(BuildConfig, "shard_rows")] = default_of(BuildConfig, "shard_rows"),
    fmt: Annotated[DataFormat, Field(description="Row format of the data (auto: detected).")] = "auto",
    skip_bad_rows: Annotated[bool, field_of(BuildConfig, "skip_bad_rows")] = default_of(BuildConfig, "skip_bad_rows"),
    preconditioners: Annotated[list[Literal["diagonal", "ekfac"]], field_of(BuildConfig, "preconditioners")]
    = list(default_of(BuildConfig, "preconditioners")),
    executor: Annotated[Executor, Field(description="Where shard work runs (advanced): local = in this flow run; deployment = runs of the shard deployment on the GPU pool, one per queue.")] = "local",
    groups: Annotated[int | None, Field(ge=1, description="Shard groups (advanced); None: one per GPU queue with the deployment executor, else 1.")] = None,
    store_url: Annotated[str | None, Field(description="Cache store root (advanced); None: RAPIDIN_STORE_URL of the deployment.")] = None,
    device: Annotated[str | None, Field(description="Torch device (advanced); None: RAPIDIN_DEVICE of whoever computes.")] = None,
    shard_deployment: Annotated[str, Field(description="The shard deployment the deployment executor runs "
                                           "(advanced).")] = "cache-shards/gpu",
    checkpoints: Annotated[bool, Field(description="Also cache each checkpoint the version's fine-tune kept, with "
                                       "the same options: the attribute flow sums over them (TracIn).")] = True,
) -> CacheSummary:
    """Build (or resume) the gradient cache of a model version over a data set, then of each checkpoint its
    fine-tune kept; one MLflow run per build."""
    options = dict(data_url=data_url, sketch=sketch, gradient=gradient, shard_rows=shard_rows, fmt=fmt,
                   skip_bad_rows=skip_bad_rows, preconditioners=preconditioners, executor=executor, groups=groups,
                   store_url=store_url, device=device, shard_deployment=shard_deployment)
    resolved = resolve_model(model)
    summary = _cache(model, resolved, **options)
    if checkpoints and resolved.registry and not resolved.checkpoint:
        for name in resolved.checkpoints:
            get_run_logger().info("caching checkpoint %s of %s", name, public_uri(model.uri))
            spec = ModelSpec.registry(resolved.registry.name, resolved.registry.version, name)
            summary.checkpoints.append(cache_gradients(model=spec, checkpoints=False, **options))
    return summary


def _cache(model: ModelSpec, resolved, data_url: str, sketch: SketchConfig | None, gradient: GradientConfig,
           shard_rows: int, fmt: DataFormat, skip_bad_rows: bool, preconditioners: list[str], executor: Executor,
           groups: int | None, store_url: str | None, device: str | None, shard_deployment: str) -> CacheSummary:
    """One model's cache: plan, then build (or only fit the preconditioners a complete cache lacks)."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    s = settings()
    job = CacheJob(model=resolved.pinned(), data_url=data_url, store_url=store_url or s.store_url,
                   sketch=sketch or s.default_sketch(), gradient=gradient, shard_rows=shard_rows,
                   fmt=fmt, skip_bad_rows=skip_bad_rows, device=device or "")
    plan = plan_cache_task(job)
    manifest, cache_url = plan.manifest, plan.cache_url
    name, version = str(manifest.model["name"]), str(manifest.model["version"])
    summary = dict(cache_url=cache_url, cache_id=manifest.cache_id, model_name=name, model_version=version,
                   rows=manifest.num_rows, shards=manifest.num_shards)
    if manifest.complete:
        logger.info("cache %s is already complete; nothing to build", cache_url)
        if resolved.registry and not resolved.checkpoint and in_default_store(cache_url, s):
            tag_model_version_task(resolved.registry.name, resolved.registry.version, cache_url, manifest.cache_id)
        missing = [k for k in preconditioners if read_record(CacheStore(cache_url, s.storage_options(cache_url)),
                                                             manifest, k) is None]
        if missing:  # an existing cache gains the preconditioners it lacks, in a run of their own
            run = start_run_task("cache", f"fit preconditioners {name} v{version}", {"model_uri": public_uri(model.uri)},
                                 {"model_uri": public_uri(model.uri), "cache_url": public_uri(cache_url)})
            try:
                log_preconditioners_task(run, fit_preconditioners_task(job, missing), manifest, cache_url)
            except Exception as exc:
                fail_run_task(run, exc)
                raise
        return CacheSummary(built=False, **summary)

    # the run opens as the build starts (its duration is the build's) and ends FAILED with the reason if it fails
    run = start_run_task("cache", f"cache {name} v{version}", {"model_uri": public_uri(model.uri)},
                         {"model_uri": public_uri(model.uri), "data_url": data_url, "executor": executor})
    try:
        tracked = _build(job.model_copy(update={"cache_id": manifest.cache_id}), plan, resolved, run, executor, groups,
                         shard_deployment, t0, preconditioners)
    except Exception as exc:
        fail_run_task(run, exc)
        raise
    return CacheSummary(built=True, mlflow_run_id=tracked["run_id"], mlflow_link=tracked["link"], **summary)


def _build(job: CacheJob, plan, resolved, run: dict[str, str], executor: Executor, groups: int | None,
           shard_deployment: str, t0: float, preconditioners: list[str]) -> dict[str, str]:
    """The shard groups (here or fanned out), with a progress artifact; then finalize, fit the preconditioners and
    complete the MLflow run."""
    logger = get_run_logger()
    s = settings()
    manifest, cache_url = plan.manifest, plan.cache_url
    name, version = str(manifest.model["name"]), str(manifest.model["version"])
    total = manifest.num_shards
    n_groups = groups or (s.gpu_queues if executor == "deployment" else 1)
    report_url = scratch_url(cache_url)
    jobs = [ShardGroup(job=job, group=g, shards=idx, report_url=report_url)
            for g, idx in enumerate(split_groups(list(range(total)), n_groups))]
    artifact = start_progress(name, version, manifest.cache_id, 0, total)
    done = {"shards": 0}

    def local(group: ShardGroup):
        return cache_shard_group(group, artifact, done["shards"], total)

    def on_done(group: ShardGroup) -> None:
        done["shards"] += len(group.shards)
        set_progress(artifact, done["shards"], total)

    t_build = time.perf_counter()
    fan_out(executor, jobs, local, shard_deployment, "group", f"cache-{name}-v{version}", on_done)
    build_seconds = time.perf_counter() - t_build
    reports = read_reports(report_url)
    final = finalize_cache_task(cache_url, {"total": time.perf_counter() - t0})
    remove_dir(report_url)
    records = fit_preconditioners_task(job, preconditioners) if preconditioners else []
    seconds = {"load": plan.load_seconds + sum(r.load_seconds for r in reports), "plan": plan.seconds,
               "build": build_seconds, "total": time.perf_counter() - t0}
    tracked = log_cache_run(run, final, resolved, cache_url, seconds, {"groups": len(jobs)}, records)
    set_progress(artifact, total, total)
    logger.info("cache %s complete: %d rows in %d shards; MLflow run %s", cache_url, final.num_rows, total,
                tracked["link"])
    return tracked
