"""Caching: plan a cache (tokenize, fix the sketch and the content-addressed id), build its shards resumably,
finalize it, and open a finished one only for the model (and sketch) it was built with."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import GradientConfig, SketchConfig
from .data import DataFormat, Example, Tokenized, dataset_fingerprint, load_examples, tokenize_many
from .errors import CacheError, DataError
from .gradients import GradientComputer, length_batches
from .models import LoadedModel
from .precondition import FittedKind, PreconditionerRecord, ensure_preconditioners
from .quantize import Int8Rows
from .sketch import Sketch, make_sketch, make_spec, projector
from .store import CacheStore, Manifest, ShardInfo, compute_cache_id, find_caches

log = logging.getLogger("rapidin")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}


def as_stored(vectors: torch.Tensor, dtype: str) -> torch.Tensor:
    """The vectors as a cache of this storage dtype holds them, decoded to float32."""
    return Int8Rows.quantize(vectors).float() if dtype == "int8" else vectors.to(DTYPES[dtype]).float()


@dataclass
class CachePlan:
    """A cache about to be (or being) built: its store, manifest and tokenized rows."""

    store: CacheStore
    manifest: Manifest
    examples: list[Example]
    items: list[Tokenized | None]  # None = bad row, skipped; empty when each shard's rows are tokenized as it is built
    notice: str | None = None  # set when the stored plan overrides this request's shard_rows / batch_size
    shards: frozenset[int] | None = None  # a worker's plan: the only shards it builds (None: all)
    tokenize: Callable[[list[Example]], list[Tokenized | None]] | None = None  # set when `items` is empty

    def shard_items(self, index: int) -> tuple[list[int], list[Tokenized]]:
        """The rows of shard `index` that are not skipped, and their tokens."""
        start, stop = self.manifest.shard_range(index)
        items = self.tokenize(self.examples[start:stop]) if self.tokenize else self.items[start:stop]
        kept = [(r, it) for r, it in zip(range(start, stop), items, strict=True) if it is not None]
        return [r for r, _ in kept], [it for _, it in kept]


def plan_cache(
    loaded: LoadedModel, data_url: str, store_url: str, sketch: SketchConfig = SketchConfig(),
    gradient: GradientConfig = GradientConfig(), shard_rows: int = 256, fmt: DataFormat = "auto",
    skip_bad_rows: bool = False, storage_options: dict | None = None, data_storage_options: dict | None = None,
    shards: Sequence[int] | None = None,
) -> CachePlan:
    """Read and tokenize the data, fix the sketch and cache id, and write the manifest draft. With `shards` (a worker
    building those of an already planned cache), each shard's rows are tokenized when it is built: a worker that
    tokenized all of a million rows first took minutes and 4 GB before its first gradient."""
    examples, fmt = load_examples(data_url, fmt, loaded.tokenizer, data_storage_options)
    computer = GradientComputer(loaded, gradient)
    spec = make_spec(sketch, computer.dim, computer.layout)
    data_fp = dataset_fingerprint(examples, fmt)
    cache_id = compute_cache_id(loaded.fingerprint, data_fp, gradient, spec, computer.layout)
    url = CacheStore.location(store_url, loaded.name, loaded.version, cache_id)
    store = CacheStore(url, storage_options)
    if shards is not None and store.exists("manifest.json"):
        tokenize = functools.partial(_tokenize_rows, loaded, data_url, max_length=gradient.max_length,
                                     skip=skip_bad_rows)
        return CachePlan(store, store.read_manifest(), examples, [], shards=frozenset(shards), tokenize=tokenize)
    items = _tokenize_rows(loaded, data_url, examples, max_length=gradient.max_length, skip=skip_bad_rows)
    manifest = Manifest(
        cache_id=cache_id,
        model={"name": loaded.name, "version": loaded.version, "fingerprint": loaded.fingerprint,
               "path": loaded.ref.path, "adapter": loaded.ref.adapter},
        dataset={"url": data_url, "fingerprint": data_fp, "format": fmt, "rows": len(examples)},
        gradient=gradient, sketch=spec, layout=computer.layout, shard_rows=shard_rows, num_rows=len(examples),
        rapidin_version=__version__,
        stats={"truncated": sum(1 for it in items if it is not None and it.truncated),
               "skipped": sum(1 for it in items if it is None)},
    )
    stored = store.create_manifest(manifest)
    if not store.exists("examples.parquet"):
        store.write_table("examples.parquet", _examples_table(examples, items))
    return CachePlan(store, stored, examples, items, _plan_notice(stored, manifest))


def _plan_notice(stored: Manifest, requested: Manifest) -> str | None:
    """One line when the cache's stored plan differs from the request (the stored plan is kept)."""
    keep = {"shard_rows": stored.shard_rows, "batch_size": stored.gradient.batch_size}
    asked = {"shard_rows": requested.shard_rows, "batch_size": requested.gradient.batch_size}
    if keep == asked or stored.complete:
        return None
    diff = ", ".join(f"{k}={keep[k]} (not {asked[k]})" for k in keep if keep[k] != asked[k])
    return f"cache {stored.cache_id} was started with {diff}: resuming with its stored plan, so its bytes match an uninterrupted build"


def _tokenize_rows(loaded: LoadedModel, url: str, examples: list[Example], *, max_length: int,
                   skip: bool) -> list[Tokenized | None]:
    items = tokenize_many(loaded.tokenizer, [(ex.prompt, ex.response) for ex in examples], max_length)
    return [_checked(url, ex, item, max_length, skip) for ex, item in zip(examples, items, strict=True)]


def _checked(url: str, ex: Example, item: Tokenized, max_length: int, skip: bool) -> Tokenized | None:
    if ex.response.strip() and len(item.input_ids) > item.prompt_len:
        return item
    if skip:
        return None
    why = "response is empty" if not ex.response.strip() else f"no response tokens left after truncation to {max_length}"
    raise DataError(f"{url}:{ex.line}: {why} (pass --skip-bad-rows to skip such rows)")


def _examples_table(examples: list[Example], items: list[Tokenized | None]) -> list[dict]:
    return [
        {"row": ex.row, "id": ex.id, "line": ex.line, "prompt": ex.prompt, "response": ex.response,
         "tokens": len(it.input_ids) if it else 0, "prompt_tokens": it.prompt_len if it else 0,
         "truncated": bool(it and it.truncated), "skipped": it is None}
        for ex, it in zip(examples, items, strict=True)
    ]


def build_shards(
    plan: CachePlan, loaded: LoadedModel, indices: Sequence[int] | None = None, progress: bool = True,
    on_shard: Callable[[ShardInfo, int, int], None] | None = None,
) -> list[ShardInfo]:
    """Compute and commit the given shards (default: all); committed, intact shards are skipped."""
    manifest = plan.manifest
    sketch = make_sketch(manifest.sketch, manifest.layout, loaded.device)
    computer = GradientComputer(loaded, manifest.gradient, projector(sketch))
    dtype = DTYPES[manifest.sketch.config.dtype]
    todo = list(range(manifest.num_shards)) if indices is None else list(indices)
    if plan.shards is not None and not plan.shards.issuperset(todo):
        raise ValueError(f"this worker's plan builds shards {sorted(plan.shards)} only, not {todo}")
    done: list[ShardInfo] = []
    # `with`: a failure closes the bar first, so the CLI's one-line error starts on a line of its own
    with tqdm(total=sum(_rows(manifest, i) for i in todo), desc="caching gradients", unit="ex",
              disable=not progress) as bar:
        for index in todo:
            info = plan.store.committed_shard(index, manifest.shard_range(index))
            if info is None:
                info = _build_shard(plan, computer, sketch, dtype, index, bar.update)
            else:
                bar.update(_rows(manifest, index))
            done.append(info)
            if on_shard:
                on_shard(info, len(done), len(todo))
    return done


def _rows(manifest: Manifest, index: int) -> int:
    start, stop = manifest.shard_range(index)
    return stop - start


def _build_shard(plan: CachePlan, computer: GradientComputer, sketch: Sketch, dtype: torch.dtype, index: int,
                 advance: Callable[[int], object]) -> ShardInfo:
    start, stop = plan.manifest.shard_range(index)
    rows, items = plan.shard_items(index)
    advance(stop - start - len(rows))  # skipped rows count as done
    seconds = {"gradients": 0.0, "sketch": 0.0, "write": 0.0}
    k = plan.manifest.sketch.config.k
    vectors = torch.zeros(len(rows), k, dtype=dtype)
    scales = torch.zeros(len(rows)) if dtype == torch.int8 else None
    for batch in length_batches(items, computer.config.batch_size):
        t0 = time.perf_counter()
        grads = computer.gradients([items[i] for i in batch])
        t1 = time.perf_counter()
        if scales is not None:
            quantized = Int8Rows.quantize(sketch(grads).cpu())
            vectors[batch], scales[batch] = quantized.values, quantized.scales
        else:  # "+ 0.0" turns -0.0 into +0.0: zeros whose sign depends on thread scheduling must not change bytes
            vectors[batch] = (sketch(grads).to(dtype) + 0.0).cpu()
        seconds["gradients"] += t1 - t0
        seconds["sketch"] += time.perf_counter() - t1
        advance(len(batch))
    t2 = time.perf_counter()
    stored = vectors if scales is None else Int8Rows(vectors, scales)
    info = plan.store.commit_shard(index, start, stop, stored, torch.tensor(rows, dtype=torch.long), seconds)
    return info.model_copy(update={"seconds": {**seconds, "write": time.perf_counter() - t2}})


def finalize_cache(plan: CachePlan, extra_timings: dict[str, float] | None = None) -> Manifest:
    """Mark the cache complete once every shard of the stored plan is committed with its planned rows; refuses
    if one is missing or the committed rows are not exactly 0..N-1 once each."""
    stored = plan.store.read_manifest()
    if stored.complete:
        plan.manifest = stored
        return stored
    shards = []
    for index in range(stored.num_shards):
        info = plan.store.committed_shard(index, stored.shard_range(index), verify=False)
        if info is None:
            raise CacheError(f"{plan.store.url}: shard {index} (rows {stored.shard_range(index)}) is not committed "
                             "yet; rerun the cache build to resume")
        shards.append(info)
    _check_coverage(plan.store.url, stored, shards)
    timings = {key: sum(s.seconds.get(key, 0.0) for s in shards) for key in ("gradients", "sketch", "write")}
    timings.update(extra_timings or {})
    manifest = stored.model_copy(update={"complete": True, "shards": shards, "timings": timings})
    plan.store.write_manifest(manifest)
    plan.manifest = manifest
    return manifest


def _check_coverage(url: str, manifest: Manifest, shards: list[ShardInfo]) -> None:
    """The shards' row ranges tile 0..N-1 and hold every row that was not skipped."""
    edges = [(s.start, s.stop) for s in shards]
    starts_at_previous_stop = [a for a, _ in edges] == [0, *[b for _, b in edges[:-1]]]
    if not starts_at_previous_stop or any(b <= a for a, b in edges) or (edges[-1][1] if edges else 0) != manifest.num_rows:
        raise CacheError(f"{url}: committed shards cover rows {edges}, not 0..{manifest.num_rows - 1} once each")
    expected = manifest.num_rows - manifest.stats.get("skipped", 0)
    if sum(s.rows for s in shards) != expected:
        raise CacheError(f"{url}: committed shards hold {sum(s.rows for s in shards)} rows, expected {expected}")


def build_cache(loaded: LoadedModel, data_url: str, store_url: str, progress: bool = True,
                preconditioners: Sequence[FittedKind] = (), **options) -> Manifest:
    """plan_cache + build_shards + finalize_cache (+ fit the preconditioners it lacks); a rerun skips intact shards
    and rebuilds corrupted ones."""
    t0 = time.perf_counter()
    plan = plan_cache(loaded, data_url, store_url, **options)
    if plan.notice:
        log.warning(plan.notice)
    build_shards(plan, loaded, progress=progress)
    manifest = finalize_cache(plan, {"total": time.perf_counter() - t0})
    if preconditioners:
        fit_missing(plan, loaded, preconditioners, progress)
    return manifest


def fit_missing(plan: CachePlan, loaded: LoadedModel, kinds: Sequence[FittedKind], progress: bool = True,
                ) -> list[PreconditionerRecord]:
    """Fit the preconditioners a complete cache lacks from its own rows and gradient settings."""
    if plan.shards is not None:
        raise ValueError("preconditioners are fitted from a plan of every row, not from a worker's plan of some shards")
    computer = GradientComputer(loaded, plan.manifest.gradient)
    return ensure_preconditioners(plan.store, plan.manifest, computer, plan.items, kinds, progress)


def open_cache(
    loaded: LoadedModel, store_url: str | None = None, cache_url: str | None = None, sketch: SketchConfig | None = None,
    storage_options: dict | None = None,
) -> tuple[CacheStore, Manifest]:
    """Open a complete cache that was built with this model (and sketch, if given); refuse any other."""
    if cache_url is None:
        if store_url is None:
            raise CacheError("give a cache URL or a store root")
        urls = find_caches(store_url, loaded.name, loaded.version, storage_options)
        if not urls:
            raise CacheError(f"{store_url}: no cache for model {loaded.name} version {loaded.version}; run `rapidin cache` first")
        matching = [u for u in urls if CacheStore(u, storage_options).read_manifest().model.get("fingerprint") == loaded.fingerprint]
        if len(matching) > 1:
            raise CacheError(f"{store_url}: {len(matching)} caches fit this model; choose one with --cache ({', '.join(matching)})")
        cache_url = (matching or urls)[0]
    store = CacheStore(cache_url, storage_options)
    manifest = store.read_manifest()
    if manifest.model.get("fingerprint") != loaded.fingerprint:
        raise CacheError(f"{cache_url}: cache was built with another model (fingerprint {manifest.model.get('fingerprint')}, "
                         f"loaded model has {loaded.fingerprint})")
    if sketch is not None and sketch != manifest.sketch.config:
        raise CacheError(f"{cache_url}: cache was built with sketch {manifest.sketch.config.model_dump()}, not {sketch.model_dump()}")
    if not manifest.complete:
        raise CacheError(f"{cache_url}: cache is incomplete ({manifest.num_shards} shards planned); rerun `rapidin cache` to finish it")
    return store, manifest
