"""Re-cache tasks: which registered versions lack a complete, fitting cache."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from rapidin.config import GradientConfig, SketchConfig
from rapidin.errors import RapidInError
from rapidin.store import CacheStore, Manifest, find_caches

from .common import IO_RETRIES, settings
from .models import mlflow_client
from .tracking import CACHE_URL_TAG, DATA_URL_TAG


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
