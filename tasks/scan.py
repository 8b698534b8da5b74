"""Retrieval tasks: store query vectors, scan one shard group, merge partial top-k results exactly."""

from __future__ import annotations

import time

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rapidin.models import resolve_device
from rapidin.retrieval import QueryGroup, ScanResult, scan
from rapidin.store import CacheStore

from .common import IO_RETRIES, WORK_RETRIES, ScanGroup, settings

QUERIES = "queries.safetensors"


def queries_to_bytes(groups: list[QueryGroup]) -> bytes:
    """Serialise query groups with safetensors (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    for g, group in enumerate(groups):
        tensors[f"{g}.whole"] = group.whole.detach().float().cpu().contiguous()
        if group.tokens is not None:
            tensors[f"{g}.tokens"] = group.tokens.detach().float().cpu().contiguous()
    return st_save(tensors, metadata={"groups": str(len(groups))})


def queries_from_bytes(data: bytes) -> list[QueryGroup]:
    """Inverse of queries_to_bytes."""
    tensors = st_load(data)
    count = 1 + max((int(k.split(".")[0]) for k in tensors), default=-1)
    return [QueryGroup(tensors[f"{g}.whole"], tensors.get(f"{g}.tokens")) for g in range(count)]


def part_name(group: int) -> str:
    """File name of a group's partial scan result."""
    return f"part-{group:04d}.safetensors"


def _store(url: str) -> CacheStore:
    return CacheStore(url, settings().storage_options(url))


@task(name="write-queries", **IO_RETRIES, cache_policy=NO_CACHE)
def write_queries(work_url: str, groups: list[QueryGroup]) -> str:
    """Put the sketched query vectors where every scan worker can read them."""
    _store(work_url).write_bytes(QUERIES, queries_to_bytes(groups))
    return work_url


def scan_group(job: ScanGroup) -> dict:
    """Scan the job's shards and write the partial result (ScanResult.to_bytes) next to the queries."""
    t0 = time.perf_counter()
    cache = _store(job.cache_url)
    manifest = cache.read_manifest()
    by_index = {info.index: info for info in manifest.shards}
    infos = [by_index[i] for i in job.shards]
    groups = queries_from_bytes(_store(job.queries_url).read_bytes(QUERIES))
    shards = ((vectors, rows) for _, vectors, rows in cache.iter_shards(infos, job.verify))
    result = scan(shards, groups, job.top_k, resolve_device(job.device or settings().device))
    _store(job.queries_url).write_bytes(part_name(job.group), result.to_bytes())
    return {"group": job.group, "rows": result.rows_scanned, "bytes": result.bytes_scanned,
            "seconds": time.perf_counter() - t0}


@task(name="scan-shard-group", **WORK_RETRIES, cache_policy=NO_CACHE)
def scan_shard_group(job: ScanGroup) -> dict:
    """Score the queries against one group of shards (re-runnable: it only writes its own part file)."""
    return scan_group(job)


@task(name="merge-scans", **IO_RETRIES, cache_policy=NO_CACHE)
def merge_scans(work_url: str, groups: list[int]) -> ScanResult:
    """Read every group's partial result and merge them exactly, in group order."""
    store = _store(work_url)
    merged = None
    for g in groups:
        part = ScanResult.from_bytes(store.read_bytes(part_name(g)))
        merged = part if merged is None else merged.merge(part)
    return merged
