"""attribute: sketch query gradients, scan shard groups (in-process or on the GPU pool), merge, report, track."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import Field

from rapidin.attribution import Generation
from rapidin.config import AttributeConfig
from rapidin.results import Attribution
from tasks.attribution import assemble_task, attribute_checkpoints_task, open_cache_task, prepare_queries_task
from tasks.cache import remove_dir, scratch_url
from tasks.common import ModelSpec, ScanGroup, ScanPlacement, form_help, settings, split_groups
from tasks.dispatch import choose_scan_executor
from tasks.models import resolve_model
from tasks.publish import publish_topk
from tasks.scan import merge_scans, scan_shard_group, write_queries
from tasks.tracking import CACHE_URL_TAG, fail_run_task, log_attribution_run, public_uri, start_run_task

from ._fanout import fan_out


@flow(name="attribute", log_prints=True)
@form_help
def attribute(
    model: Annotated[ModelSpec, Field(description="The model version whose generations to explain, e.g. uri "
                                      "models:/my-model/3 or models:/my-model@champion.")],
    generations: Annotated[list[Generation], Field(min_length=1, description="The generations to explain: a prompt "
                                                   "each, and the response (empty: the model generates it).")],
    config: Annotated[AttributeConfig, Field(description="Scoring options (rapidin attribute --help lists the same).")]
    = AttributeConfig(),
    checkpoints: Annotated[Literal["final", "all"], Field(description="all: sum each row's scores over the "
                                                          "checkpoints the version's fine-tune kept and the final "
                                                          "model (TracIn; the cache flow caches them; the scan runs "
                                                          "in this flow run), or the final model alone if it kept "
                                                          "none; final: the final model alone.")] = "all",
    checkpoint_weights: Annotated[Literal["equal", "learning_rate"], Field(
        description="With all checkpoints: weigh each by the learning rate of the epoch it ends relative to the "
        "final epoch's (TracIn's weighting; the best measured), or equally.")] = "learning_rate",
    advanced: Annotated[ScanPlacement, Field(description="Deployment plumbing: which cache to read and where the "
                                             "scan runs. The defaults suit most runs.")] = ScanPlacement(),
) -> Attribution:
    """Which training rows made these generations? Top-k helpful, harmful and influential rows per generation."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    uri = public_uri(model.uri)
    if checkpoints == "all" and config.token_wise:
        logger.warning("token-wise scores: the final model alone (not summed over checkpoints yet)")
        checkpoints = "final"
    run = start_run_task("attribution", f"attribute {uri}", {"model_uri": uri},
                         {"model_uri": uri, "prompt": generations[0].prompt[:500], "top_k": config.top_k,
                          "token_wise": config.token_wise, "target": ",".join(config.target),
                          "auto_target": config.auto_target, "preconditioner": config.preconditioner,
                          "checkpoints": checkpoints, "executor": advanced.executor,
                          "generations": len(generations)})
    try:
        tracin = checkpoint_weights if checkpoints == "all" else None
        attribution, manifest, used, resolved = _attribute(model, generations, config, advanced, t0, tracin)
        log_attribution_run(run, attribution, manifest, attribution.timings, used, resolved)
    except Exception as exc:
        fail_run_task(run, exc)
        logger.error("attribution failed: %s (MLflow run %s)", " ".join(str(exc).split()), run["link"])
        raise
    publish_topk(attribution, run["link"])
    for g, gen in enumerate(attribution.generations):
        best = gen.influential[0] if gen.influential else None
        logger.info("generation %d: %r -> top influential row %s (score %.4g)", g, gen.response[:60],
                    best.row if best else None, best.score if best else float("nan"))
    logger.info("MLflow run: %s", run["link"])
    return attribution


def _attribute(model: ModelSpec, generations: list[Generation], config: AttributeConfig, advanced: ScanPlacement,
               t0: float, tracin: str | None = None):
    """The steps: resolve and load the model, open its cache, sketch the queries, scan (here or fanned out), merge,
    assemble; or, with `tracin` (a weighting), the same over the kept checkpoints in this flow run. Returns
    (attribution with its timings, manifest, how the scan ran, the resolved model)."""
    s = settings()
    cache_url, store_url, device = advanced.cache_url or None, advanced.store_url or None, advanced.device or s.device
    resolved = resolve_model(model)
    if cache_url is None and store_url is None and resolved.registry and not resolved.checkpoint:
        cache_url = resolved.registry.tags.get(CACHE_URL_TAG)
    loaded, store, manifest, load_seconds = open_cache_task(resolved, device, store_url, cache_url)
    t1 = time.perf_counter()
    if tracin and not resolved.checkpoints:
        get_run_logger().info("%s: its fine-tune kept no checkpoints; the final model alone", resolved.pinned().uri)
        tracin = None
    if tracin:
        attribution = attribute_checkpoints_task(loaded, store, resolved, generations, config, tracin, device,
                                                 store_url or s.store_url)
        attribution.timings = {"load": load_seconds, **attribution.timings, "total": time.perf_counter() - t0}
        return attribution, manifest, {"groups": 1, "executor_used": "local"}, resolved
    prepared, features = prepare_queries_task(loaded, store, manifest, generations, config)
    work_url = scratch_url(store.url)
    write_queries(work_url, [p.group for p in prepared])
    t2 = time.perf_counter()
    executor, why = choose_scan_executor(advanced.executor, sum(info.bytes for info in manifest.shards), s.gpu_queues)
    get_run_logger().info("scan: %s", why)
    indices = [info.index for info in manifest.shards]
    n_groups = advanced.groups or (s.gpu_queues if executor == "deployment" else 1)
    jobs = [ScanGroup(cache_url=store.url, queries_url=work_url, group=g, shards=idx, top_k=config.top_k,
                      verify=config.verify, device=advanced.device)
            for g, idx in enumerate(split_groups(indices, n_groups))]
    try:
        fan_out(executor, jobs, scan_shard_group, advanced.shard_deployment, "group", f"scan-{manifest.cache_id}")
        merged = merge_scans(work_url, [j.group for j in jobs])
    finally:
        remove_dir(work_url)
    t3 = time.perf_counter()
    attribution = assemble_task(loaded, store, manifest, prepared, merged, config, features)
    t4 = time.perf_counter()
    attribution.timings = {"load": load_seconds, "queries": t2 - t1, "scan": t3 - t2, "assemble": t4 - t3,
                           "total": t4 - t0}
    return attribution, manifest, {"groups": len(jobs), "executor_used": executor}, resolved
