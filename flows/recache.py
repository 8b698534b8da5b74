"""recache_new_versions: build the cache of every registered model version that lacks a complete one."""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import Field

from rapidin.config import BuildConfig, GradientConfig, SketchConfig, default_of, field_of
from tasks.common import Executor, ModelSpec, form_help, settings
from tasks.recache import find_versions
from tasks.tracking import DATA_URL_TAG

from .cache import CacheSummary, cache_gradients


@flow(name="recache-new-versions", log_prints=True)
@form_help
def recache_new_versions(
    model_name: Annotated[str, Field(description="Only this registered model; empty: every registered model.")] = "",
    data_url: Annotated[str, Field(description="Data for versions without a rapidin.data_url tag; empty: such "
                                   "versions are skipped.")] = "",
    sketch: Annotated[SketchConfig | None, Field(description="Sketch of the caches to build; None: "
                                                 "RAPIDIN_SKETCH_METHOD / RAPIDIN_K / RAPIDIN_LAM, and any complete "
                                                 "cache of a version counts (a re-cache of an unchanged version is a "
                                                 "no-op). Given: a version needs a cache with this sketch.")] = None,
    gradient: Annotated[GradientConfig | None, Field(description="Gradient options; None: the defaults, and any "
                                                     "complete cache of a version counts.")] = None,
    shard_rows: Annotated[int, field_of(BuildConfig, "shard_rows")] = default_of(BuildConfig, "shard_rows"),
    preconditioners: Annotated[list[Literal["diagonal", "ekfac"]], field_of(BuildConfig, "preconditioners")]
    = list(default_of(BuildConfig, "preconditioners")),
    executor: Annotated[Executor, Field(description="Where shard work runs: local, or deployment (the GPU pool).")]
    = "local",
    groups: Annotated[int, Field(ge=0, description="Shard groups; 0: one per GPU queue (deployment) or 1.")] = 0,
    store_url: Annotated[str, Field(description="Cache store root; empty: RAPIDIN_STORE_URL.")] = "",
    max_versions: Annotated[int, Field(ge=1, le=10_000, description="Newest versions per model to consider.")] = 20,
) -> list[CacheSummary]:
    """Build exactly one cache for each registered version that has none (and one for each checkpoint its fine-tune
    kept); skip cached versions."""
    logger = get_run_logger()
    s = settings()
    store = store_url or s.store_url
    built = []
    for v in find_versions(model_name or None, data_url or None, sketch, gradient, store, max_versions):
        if v.cached:
            logger.info("%s v%s: cached at %s", v.name, v.version, v.cached)
            continue
        if not v.data_url:
            logger.warning("%s v%s: no %s tag and no data_url parameter; skipped", v.name, v.version, DATA_URL_TAG)
            continue
        logger.info("%s v%s: building its cache over %s", v.name, v.version, v.data_url)
        options = dict(data_url=v.data_url, sketch=sketch or s.default_sketch(), gradient=gradient or GradientConfig(),
                       shard_rows=shard_rows, executor=executor, preconditioners=preconditioners, groups=groups or None,
                       store_url=store)
        summary = cache_gradients(model=ModelSpec.registry(v.name, v.version), **options)  # + kept checkpoints
        built += [summary, *summary.checkpoints]
    return built
