"""recache_new_versions: build the cache of every registered model version that lacks a complete one."""

from __future__ import annotations

from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from rapidin.config import BuildConfig, GradientConfig, SketchConfig, default_of, field_of
from rapidin.errors import RapidInError
from rapidin.store import CacheStore, Manifest, find_caches
from tasks.common import IO_RETRIES, Executor, ModelSpec, form_help, settings
from tasks.models import mlflow_client
from tasks.tracking import CACHE_URL_TAG, DATA_URL_TAG

from .cache import CacheSummary, cache_gradients


class VersionToCache(BaseModel):
    """A registered version and the data set its cache is built over."""

    name: str
    version: str
    data_url: str | None
    cached: str | None = Field(None, description="URL of an existing complete cache, if any.")


def _fits(manifest: Manifest, sketch: SketchConfig | None, gradient: GradientConfig | None,
          data_url: str | None) -> bool:
    """A complete cache over this data (if known) and, when they are asked for, with this sketch and these gradient
    options: without an explicit sketch any complete cache of the version counts (one cache per version)."""
    return (manifest.complete
            and (sketch is None or manifest.sketch.config == sketch)
            and (gradient is None or manifest.gradient.fingerprint_fields() == gradient.fingerprint_fields())
            and (data_url is None or manifest.dataset.get("url") == data_url))


def existing_cache(name: str, version: str, tags: dict, sketch: SketchConfig | None, gradient: GradientConfig | None,
                   data_url: str | None, store_url: str) -> str | None:
    """The URL of a complete, fitting cache of this version (the version's tag first, then the store)."""
    s = settings()
    candidates = [tags[CACHE_URL_TAG]] if tags.get(CACHE_URL_TAG) else []
    candidates += find_caches(store_url, name, version, s.storage_options(store_url))
    for url in candidates:
        try:
            manifest = CacheStore(url, s.storage_options(url)).read_manifest()
        except RapidInError:
            continue
        if _fits(manifest, sketch, gradient, data_url):
            return url
    return None


@task(name="find-versions", **IO_RETRIES, cache_policy=NO_CACHE)
def find_versions(model_name: str | None, data_url: str | None, sketch: SketchConfig | None,
                  gradient: GradientConfig | None,
                  store_url: str, max_versions: int) -> list[VersionToCache]:
    """Registered versions (newest last) and, for each, a complete cache if one exists."""
    client = mlflow_client(settings())
    names = [model_name] if model_name else [m.name for m in client.search_registered_models(max_results=1000)]
    out = []
    for name in names:
        versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        for mv in versions[-max_versions:]:
            tags = dict(mv.tags or {})
            data = tags.get(DATA_URL_TAG) or data_url
            cached = existing_cache(name, str(mv.version), tags, sketch, gradient, data, store_url)
            out.append(VersionToCache(name=name, version=str(mv.version), data_url=data, cached=cached))
    return out


@flow(name="recache-new-versions", log_prints=True)
@form_help
def recache_new_versions(
    model_name: Annotated[str | None, Field(description="Only this registered model; None: every registered model.")]
    = None,
    data_url: Annotated[str | None, Field(description="Data for versions without a rapidin.data_url tag.")] = None,
    sketch: Annotated[SketchConfig | None, Field(description="Sketch of the caches to build; None: RAPIDIN_K / "
                                                 "RAPIDIN_LAM, and any complete cache of a version counts (a re-cache "
                                                 "of an unchanged version is a no-op). Given: a version needs a cache "
                                                 "with this sketch.")] = None,
    gradient: Annotated[GradientConfig | None, Field(description="Gradient options; None: the defaults, and any "
                                                     "complete cache of a version counts.")] = None,
    shard_rows: Annotated[int, field_of(BuildConfig, "shard_rows")] = default_of(BuildConfig, "shard_rows"),
    executor: Annotated[Executor, Field(description="Where shard work runs: local, or deployment (the GPU pool).")]
    = "local",
    groups: Annotated[int | None, Field(ge=1, description="Shard groups; None: one per GPU queue (deployment) or 1.")]
    = None,
    store_url: Annotated[str | None, Field(description="Cache store root; None: RAPIDIN_STORE_URL.")] = None,
    max_versions: Annotated[int, Field(ge=1, le=10_000, description="Newest versions per model to consider.")] = 20,
) -> list[CacheSummary]:
    """Build exactly one cache for each registered version that has none; skip cached ones."""
    logger = get_run_logger()
    s = settings()
    store = store_url or s.store_url
    built = []
    for v in find_versions(model_name, data_url, sketch, gradient, store, max_versions):
        if v.cached:
            logger.info("%s v%s: cached at %s", v.name, v.version, v.cached)
            continue
        if not v.data_url:
            logger.warning("%s v%s: no %s tag and no data_url parameter; skipped", v.name, v.version, DATA_URL_TAG)
            continue
        logger.info("%s v%s: building its cache over %s", v.name, v.version, v.data_url)
        built.append(cache_gradients(model=ModelSpec.registry(v.name, v.version), data_url=v.data_url,
                                     sketch=sketch or SketchConfig(k=s.k, lam=s.lam),
                                     gradient=gradient or GradientConfig(), shard_rows=shard_rows, executor=executor, groups=groups,
                                     store_url=store))
    return built
