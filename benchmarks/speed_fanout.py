"""Retrieval at scale through the pipeline's fan-out: a synthetic N-row cache on the stack's S3 store (SeaweedFS) is
scanned by the `scan-shards/gpu` deployment exactly as the attribute flow dispatches it (`flows._fanout.fan_out` of
`ScanGroup` jobs, partial results merged by `merge_scans`), with 1 shard group (one worker, queue gpu-0) and with 2
(two workers, queues gpu-0 and gpu-1). Each is timed end to end; both merged top-k lists must equal an in-process
scan of the same cache (the benchmark stops if they differ). Peak memory of a scan worker is flat in N (two shards
in flight; see speed_scale.py).

The rows are random (no model could compute a million rows' gradients here); K is chosen so that the cache fits the
disk: 1,000,000 rows x K = 1,024 x 2 bytes = 2.05 GB.

    make stack-up && source .stack/env.sh
    .venv/bin/prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --all
    .venv/bin/python benchmarks/speed_fanout.py --rows 1000000 --k 1024 --out benchmarks/results_fanout.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def synthetic_cache(url: str, rows: int, k: int, shard_rows: int, storage_options: dict):
    """A complete cache of random fp16 rows at `url` (reused when already complete)."""
    from rapidin.config import GradientConfig, SketchConfig
    from rapidin.sketch import make_spec
    from rapidin.store import CacheStore, Manifest
    from speed_retrieval import write_synthetic_cache

    store = CacheStore(url, storage_options)
    if store.exists("manifest.json") and (manifest := store.read_manifest()).complete and manifest.num_rows == rows:
        return store, manifest
    draft = Manifest(cache_id=f"synthetic-{rows}-{k}", model={"name": "synthetic", "version": "0"},
                     dataset={"fingerprint": "synthetic"}, gradient=GradientConfig(),
                     sketch=make_spec(SketchConfig(k=k), k), layout=[("synthetic", (k,))], shard_rows=shard_rows,
                     num_rows=rows)
    store.create_manifest(draft)
    t0 = time.perf_counter()
    infos = write_synthetic_cache(url, rows, k, shard_rows, storage_options=storage_options)
    print(f"wrote {rows:,} rows x K={k} fp16 ({sum(i.bytes for i in infos) / 1e9:.2f} GB, {len(infos)} shards) "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    manifest = draft.model_copy(update={"shards": infos, "complete": True})
    store.write_manifest(manifest)
    return store, manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="cache sizes to scan")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--shard-rows", type=int, default=16_384)
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2], help="shard groups (one worker queue each)")
    p.add_argument("--deployment", default="scan-shards/gpu")
    p.add_argument("--cache-url", nargs="+", default=[], help="scan these complete caches (e.g. built by "
                   "speed_fanout_build.py) instead of synthetic ones (their K must equal --k)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch
    from prefect import flow

    from flows._fanout import fan_out
    from rapidin.retrieval import KINDS, QueryGroup, scan
    from rapidin.store import CacheStore
    from tasks.common import ScanGroup, settings, split_groups
    from tasks.scan import merge_scans, write_queries

    s = settings()
    if not s.store_url.startswith("s3://"):
        sys.exit(f"RAPIDIN_STORE_URL is {s.store_url!r}: source the stack's env.sh (make stack-up) first")
    gen = torch.Generator().manual_seed(1)
    groups = [QueryGroup(torch.randn(a.k, generator=gen)) for _ in range(a.queries)]

    @flow(name="bench-scan-fanout")
    def scan_fanout(cache_url: str, n_groups: int, indices: list[int]) -> dict:
        work_url = f"{cache_url}/_bench/{uuid.uuid4().hex[:8]}"
        write_queries(work_url, groups)
        jobs = [ScanGroup(cache_url=cache_url, queries_url=work_url, group=g, shards=idx, top_k=a.top_k, verify=False)
                for g, idx in enumerate(split_groups(indices, n_groups))]
        t0 = time.perf_counter()
        fan_out("deployment", jobs, None, a.deployment, "group", f"bench-{n_groups}")
        merged = merge_scans(work_url, [j.group for j in jobs])
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "top": [{kd: merged.whole[g][kd].rows[:, 0].tolist() for kd in KINDS}
                                            for g in range(len(groups))]}

    results = []
    for rows, url in ([(None, u) for u in a.cache_url] or
                      [(n, f"{s.store_url.rstrip('/')}/bench-synthetic/{n}-{a.k}") for n in a.rows]):
        if rows is None:
            store = CacheStore(url, s.storage_options(url))
            manifest = store.read_manifest()
            rows = manifest.num_rows
        else:
            store, manifest = synthetic_cache(url, rows, a.k, a.shard_rows, s.storage_options(url))
        t0 = time.perf_counter()
        local = scan((sv for _, *sv in store.iter_shards(manifest.shards, False)), groups, a.top_k)
        local_seconds = time.perf_counter() - t0
        want = [{kd: local.whole[g][kd].rows[:, 0].tolist() for kd in KINDS} for g in range(len(groups))]
        entry = {"rows": rows, "k": a.k, "cache_gb": sum(i.bytes for i in manifest.shards) / 1e9,
                 "shards": len(manifest.shards), "in_process_seconds": local_seconds, "fanout": {}}
        for n in a.groups:
            got = scan_fanout(url, n, [i.index for i in manifest.shards])
            if got["top"] != want:
                sys.exit(f"{rows} rows, {n} groups: the fanned-out top-k differs from the in-process scan")
            entry["fanout"][str(n)] = got["seconds"]
            print(f"{rows:,} rows: {n} group(s) {got['seconds']:.1f} s (in process {local_seconds:.1f} s); "
                  "top-k equal to the in-process scan", flush=True)
        if "1" in entry["fanout"] and "2" in entry["fanout"]:
            entry["speedup_2_over_1"] = entry["fanout"]["1"] / entry["fanout"]["2"]
            print(f"  2 workers vs 1: {entry['speedup_2_over_1']:.2f}x", flush=True)
        results.append(entry)
    if a.out:
        Path(a.out).write_text(json.dumps({"results": results, "queries": a.queries, "top_k": a.top_k}, indent=2))
        plot(results, a.k, Path(a.out).with_suffix(".png"))
    return 0


def plot(results: list[dict], k: int, path: Path) -> None:
    """Seconds against rows: in process, and through the fan-out with each group count."""
    from speed_common import line_plot

    rows = [r["rows"] for r in results]
    line_plot(path, f"Scan through the deployment fan-out (K = {k}, fp16, 1 query)", "cached rows (S3: SeaweedFS)",
              "seconds", [(rows, [r["in_process_seconds"] for r in results], "o-", "in process (iter_shards + scan)")]
              + [(rows, [r["fanout"][n] for r in results], "o-", f"fan-out, {n} worker(s), end to end")
                 for n in results[0]["fanout"]])


if __name__ == "__main__":
    raise SystemExit(main())
