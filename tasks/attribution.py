"""Attribution tasks around the library: open the version's cache, featurise the generations, assemble the result."""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from rapidin.attribution import Checkpoint, Features, Generation, assemble, attribute, prepare_queries
from rapidin.cache import open_cache
from rapidin.config import AttributeConfig
from rapidin.results import Attribution
from rapidin.store import CacheStore

from rapidin.errors import ModelError

from .common import IO_RETRIES, ModelSpec, settings
from .models import ResolvedModel, loaded_model, resolve


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
def prepare_queries_task(loaded, store: CacheStore, manifest, generations: list[Generation], config: AttributeConfig):
    """Template (and generate, if asked) each generation and sketch its query gradients; returns the queries and the
    cache's Features (with the preconditioner the config names, loaded from the store), which assemble_task reuses."""
    features = Features.for_config(loaded, store, manifest, config)
    return prepare_queries(loaded, manifest, generations, config, features=features), features


@task(name="attribute-over-checkpoints", **IO_RETRIES, cache_policy=NO_CACHE)
def attribute_checkpoints_task(loaded, store: CacheStore, resolved: ResolvedModel, generations: list[Generation],
                               config: AttributeConfig, weighting: str, device: str, store_url: str) -> Attribution:
    """TracIn: the final model's cache and each checkpoint its fine-tune kept (each cached by the re-cache flow),
    weighted equally or by the learning rate of the epoch each ends (relative to the final epoch's)."""
    s = settings()
    if not resolved.checkpoints:
        raise ModelError(f"{resolved.pinned().uri}: its fine-tune kept no checkpoints (fine-tune with "
                         "keep_checkpoints to attribute over several)")
    checkpoints = []
    for name, lr in resolved.checkpoints.items():
        ref = resolve(ModelSpec.registry(resolved.registry.name, resolved.registry.version, name), s).ref
        weight = lr / resolved.final_lr if weighting == "learning_rate" and resolved.final_lr else 1.0
        checkpoints.append(Checkpoint(loaded_model(ref, device, s)[0], weight=weight, label=name))
    return attribute(loaded, generations, store_url, store.url, config, s.storage_options(store_url), progress=False,
                     checkpoints=checkpoints)


@task(name="assemble-attribution", **IO_RETRIES, cache_policy=NO_CACHE)
def assemble_task(loaded, store: CacheStore, manifest, prepared, result, config: AttributeConfig,
                  features: Features) -> Attribution:
    """Texts for the top rows, per-training-token scores, the typed result."""
    return assemble(loaded, store, manifest, prepared, result, config, features=features)
