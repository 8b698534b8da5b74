"""Retrieval at scale: scan time and peak memory against the number of cached rows, up to 1,000,000 rows.

Synthetic fp16 caches (random rows, K small enough for this machine's disk: 1M rows x K = 1,024 x 2 bytes = 2.1 GB)
are written with CacheStore.commit_shard, then each is scanned for one query in a fresh process (so its peak RSS is
its own), through the same CacheStore.iter_shards + retrieval.scan the library uses. Prints a table and writes a
plot of seconds against rows (expected: a straight line through the origin) and a JSON.

  .venv/bin/python benchmarks/speed_scale.py --rows 62500 250000 1000000 --k 1024 --out benchmarks/results_scale.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def scan_worker(spec: dict) -> dict:
    """One cache, one query, `repeat` scans in this process; seconds (median) and peak RSS."""
    import statistics

    import torch
    from rapidin.retrieval import QueryGroup, scan
    from rapidin.store import CacheStore, ShardInfo
    from speed_common import peak_rss_mb

    store = CacheStore(f"file://{spec['root']}")
    infos = [ShardInfo.model_validate(i) for i in spec["shards"]]
    query = torch.randn(spec["k"], generator=torch.Generator().manual_seed(1))
    baseline = peak_rss_mb()
    times = []
    for _ in range(spec["repeat"]):
        t0 = time.perf_counter()
        result = scan(((v, r) for _, v, r in store.iter_shards(infos, verify=False)), [QueryGroup(query)], 20)
        times.append(time.perf_counter() - t0)
    assert result.rows_scanned == sum(i.rows for i in infos)
    return {"seconds": statistics.median(times), "times": times, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[62_500, 250_000, 1_000_000], help="Cache sizes (rows).")
    p.add_argument("--k", type=int, default=1024, help="Sketch dimension of the synthetic rows.")
    p.add_argument("--shard-rows", type=int, default=16_384, help="Rows per shard.")
    p.add_argument("--repeat", type=int, default=3, help="Scans per size (median reported).")
    p.add_argument("--workdir", default=None, help="Scratch directory (default: a temp dir, removed afterwards).")
    p.add_argument("--out", default=None, help="Write the results as JSON here (and the plot beside it, .png).")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(json.dumps(scan_worker(json.loads(args._worker))))
        return 0
    from speed_retrieval import write_synthetic_cache

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rapidin-scale-"))
    results = []
    try:
        for n in sorted(args.rows):
            root = workdir / f"scale-{n}"
            t0 = time.perf_counter()
            infos = write_synthetic_cache(root, n, args.k, args.shard_rows)
            write_s = time.perf_counter() - t0
            spec = {"root": str(root), "shards": [i.model_dump() for i in infos], "k": args.k, "repeat": args.repeat}
            proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise SystemExit(f"scan of {n} rows failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(rows=n, cache_gb=n * args.k * 2 / 1e9, shards=len(infos), write_seconds=write_s)
            r["gb_per_s"], r["rows_per_s"] = r["cache_gb"] / r["seconds"], n / r["seconds"]
            print(json.dumps(r), flush=True)
            results.append(r)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n| rows | cache GB | shards | scan s | GB/s | rows/s | peak RSS over imports MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['cache_gb']:.2f} | {r['shards']} | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | "
              f"{r['rows_per_s']:,.0f} | {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"k": args.k, "shard_rows": args.shard_rows, "results": results},
                                             indent=1))
        plot(results, args.k, Path(args.out).with_suffix(".png"))
    return 0


def plot(results: list[dict], k: int, path: Path) -> None:
    from speed_common import line_plot

    rows = [r["rows"] for r in results]
    slope = results[-1]["seconds"] / rows[-1]
    line_plot(path, f"Retrieval scan time vs rows (K = {k}, fp16, local cache)", "cached rows", "seconds",
              [(rows, [r["seconds"] for r in results], "o-", "scan (1 query)"),
               ([0, rows[-1]], [0, slope * rows[-1]], "--", "linear through the largest")])


if __name__ == "__main__":
    sys.exit(main())
