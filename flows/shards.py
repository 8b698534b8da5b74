"""The shard deployments' flows: what one GPU worker runs for one group of shards."""

from __future__ import annotations

from prefect import flow

from tasks.cache import GroupReport, cache_shard_group
from tasks.common import ScanGroup, ShardGroup
from tasks.scan import scan_shard_group


@flow(name="cache-shards", log_prints=True)
def cache_shards(group: ShardGroup) -> GroupReport:
    """Build one group of cache shards (dispatched by cache_gradients with executor='deployment')."""
    return cache_shard_group(group)


@flow(name="scan-shards", log_prints=True)
def scan_shards(group: ScanGroup) -> dict:
    """Scan one group of cache shards (dispatched by attribute with executor='deployment')."""
    return scan_shard_group(group)
