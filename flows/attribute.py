"""attribute: sketch query gradients, scan shard groups (in-process or on the GPU pool), merge, report, track."""

from __future__ import annotations

import time
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import Field

from rapidin.api import AttributeConfig, Generation, assemble, open_cache, prepare_queries
from rapidin.results import Attribution
from rapidin.store import CacheStore
from tasks.cache import remove_dir, scratch_url
from tasks.common import IO_RETRIES, Executor, ModelSpec, ScanGroup, form_help, settings, split_groups
from tasks.models import ResolvedModel, loaded_model, resolve_model
from tasks.publish import publish_topk
from tasks.scan import merge_scans, scan_shard_group, write_queries
from tasks.tracking import CACHE_URL_TAG, log_attribution_run

from ._fanout import fan_out


@task(name="open-cache", **IO_RETRIES, cache_policy=NO_CACHE)
def open_cache_task(resolved: ResolvedModel, device: str, store_url: str | None, cache_url: str | None):
    """Load the model (memoised) and open its complete cache; refuses a cache of another model."""
    s = settings()
    t0 = time.perf_counter()
    loaded, _ = loaded_model(resolved.ref, device, s)
    load_seconds = time.perf_counter() - t0
    root = None if cache_url else (store_url or s.store_url)
    options = s.storage_options(cache_url or root)
    store, manifest = open_cache(loaded, root, cache_url, storage_options=options)
    return loaded, store, manifest, load_seconds


@task(name="prepare-queries", cache_policy=NO_CACHE)
def prepare_queries_task(loaded, manifest, generations: list[Generation], config: AttributeConfig):
    """Template (and generate, if asked) each generation and sketch its query gradients."""
    return prepare_queries(loaded, manifest, generations, config)


@task(name="assemble-attribution", **IO_RETRIES, cache_policy=NO_CACHE)
def assemble_task(loaded, store: CacheStore, manifest, prepared, result, config: AttributeConfig) -> Attribution:
    """Texts for the top rows, per-training-token scores, the typed result."""
    return assemble(loaded, store, manifest, prepared, result, config)


@flow(name="attribute", log_prints=True)
@form_help
def attribute(
    model: Annotated[ModelSpec, Field(description="The model version whose generations to explain, e.g. uri "
                                      "models:/my-model/3 or models:/my-model@champion.")],
    generations: Annotated[list[Generation], Field(min_length=1, description="The generations to explain: a prompt "
                                                   "each, and the response (empty: the model generates it).")],
    config: Annotated[AttributeConfig, Field(description="Scoring options (rapidin attribute --help lists the same).")]
    = AttributeConfig(),
    cache_url: Annotated[str | None, Field(description="A cache URL (advanced); None: the registered version's cache "
                                           "(its rapidin.cache_url tag), else the model's cache under the store.")] = None,
    store_url: Annotated[str | None, Field(description="Cache store root (advanced); None: RAPIDIN_STORE_URL of the deployment.")] = None,
    executor: Annotated[Executor, Field(description="Where shard work runs (advanced): local = in this flow run; deployment = runs of the shard deployment on the GPU pool, one per queue.")] = "local",
    groups: Annotated[int | None, Field(ge=1, description="Shard groups (advanced); None: one per GPU queue with the deployment executor, else 1.")] = None,
    device: Annotated[str | None, Field(description="Torch device (advanced); None: RAPIDIN_DEVICE of whoever computes.")] = None,
    shard_deployment: Annotated[str, Field(description="The scan deployment the deployment executor runs "
                                           "(advanced).")] = "scan-shards/gpu",
) -> Attribution:
    """Which training rows made these generations? Top-k helpful, harmful and influential rows per generation."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    s = settings()
    resolved = resolve_model(model)
    if cache_url is None and store_url is None and resolved.registry:
        cache_url = resolved.registry.tags.get(CACHE_URL_TAG)
    loaded, store, manifest, load_seconds = open_cache_task(resolved, device or s.device, store_url, cache_url)
    t1 = time.perf_counter()
    prepared = prepare_queries_task(loaded, manifest, generations, config)
    work_url = scratch_url(store.url)
    write_queries(work_url, [p.group for p in prepared])
    t2 = time.perf_counter()
    indices = [info.index for info in manifest.shards]
    n_groups = groups or (s.gpu_queues if executor == "deployment" else 1)
    jobs = [ScanGroup(cache_url=store.url, queries_url=work_url, group=g, shards=idx, top_k=config.top_k,
                      verify=config.verify, device=device or "")
            for g, idx in enumerate(split_groups(indices, n_groups))]
    try:
        fan_out(executor, jobs, scan_shard_group, shard_deployment, "group", f"scan-{manifest.cache_id}")
        merged = merge_scans(work_url, [j.group for j in jobs])
    finally:
        remove_dir(work_url)
    t3 = time.perf_counter()
    attribution = assemble_task(loaded, store, manifest, prepared, merged, config)
    t4 = time.perf_counter()
    attribution.timings = {"load": load_seconds, "queries": t2 - t1, "scan": t3 - t2, "assemble": t4 - t3,
                           "total": t4 - t0}
    tracked = log_attribution_run(attribution, manifest, attribution.timings,
                                  {"top_k": config.top_k, "token_wise": config.token_wise,
                                   "target": ",".join(config.target), "executor": executor, "groups": len(jobs),
                                   "generations": len(generations)})
    publish_topk(attribution, tracked["link"])
    for g, gen in enumerate(attribution.generations):
        best = gen.influential[0] if gen.influential else None
        logger.info("generation %d: %r -> top influential row %s (score %.4g)", g, gen.response[:60],
                    best.row if best else None, best.score if best else float("nan"))
    logger.info("MLflow run: %s", tracked["link"])
    return attribution
