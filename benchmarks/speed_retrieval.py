"""Speed benchmark, retrieval: scanning a cache (in a fresh process per measurement) against a naive scan."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speed_common import HERE, KINDS, log, median, peak_rss_mb, sync, table


def write_synthetic_cache(root: Path | str, rows: int, k: int, shard_rows: int, seed: int = 0,
                          storage_options: dict | None = None, dtype: str = "float16") -> list:
    import torch
    from rapidin.quantize import Int8Rows
    from rapidin.store import CacheStore

    store = CacheStore(root if isinstance(root, str) else f"file://{root}", storage_options)
    gen = torch.Generator().manual_seed(seed)
    infos = []
    for index, start in enumerate(range(0, rows, shard_rows)):
        stop = min(start + shard_rows, rows)
        vectors = torch.randn(stop - start, k, generator=gen)
        vectors = Int8Rows.quantize(vectors) if dtype == "int8" else vectors.to(torch.float16)
        infos.append(store.commit_shard(index, start, stop, vectors, torch.arange(start, stop), {}))
    return infos


def anchors(k: int, shard_rows: int, queries: list[int], device: str = "cpu", repeat: int = 5,
            entry_bytes: int = 2) -> dict:
    """The limits a scan is measured against, in this process: memcpy bandwidth (a 256 MB torch copy on the device,
    all threads), and per query count the rate of the scan's float32 product alone on rows already converted, as
    GB/s of the cache it stands for (entry_bytes per entry; with many queries the product, not memory, is the
    limit)."""
    import torch

    def best(f) -> float:
        f()
        return min(_timed(f, device) for _ in range(repeat))

    src = torch.ones(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    out = {"memcpy_gb_per_s": src.numel() * 4 / best(lambda: dst.copy_(src)) / 1e9, "product_gb_per_s": {}}
    rows = torch.randn(shard_rows, k, device=device)
    for nq in queries:
        q = torch.randn(nq, k, device=device)
        out["product_gb_per_s"][str(nq)] = shard_rows * k * entry_bytes / best(lambda: torch.mm(rows, q.T)) / 1e9
    return out


def _timed(f, device: str = "cpu") -> float:
    t0 = time.perf_counter()
    f()
    sync(device)
    return time.perf_counter() - t0


def retrieval_worker(spec: dict) -> dict:
    """Runs in a fresh process: time one method on one cache; report peak RSS of this process."""
    import torch
    from rapidin.retrieval import QueryGroup, scan
    from rapidin.store import CacheStore, ShardInfo

    if spec["method"] == "anchors":  # a process of its own, so its buffers are in no scan's peak RSS
        return anchors(spec["k"], spec["shard_rows"], spec["queries"], spec.get("device", "cpu"),
                       entry_bytes=1 if spec.get("dtype") == "int8" else 2)
    store = CacheStore(spec.get("url") or f"file://{spec['root']}", spec.get("storage_options"))
    infos = [ShardInfo.model_validate(i) for i in spec["shards"]]
    gen = torch.Generator().manual_seed(1)
    all_queries = torch.randn(max(spec["queries"]), spec["k"], generator=gen)
    cache_bytes = sum(i.bytes for i in infos)
    n_rows = sum(i.rows for i in infos)
    baseline = peak_rss_mb()
    out = {"baseline_rss_mb": baseline, "runs": []}
    top_k = spec["top_k"]
    for nq in spec["queries"]:
        queries = all_queries[:nq]
        variants = [True, False] if spec["method"] == "scan" else [False]
        for verify in variants:
            times, result = [], None
            for _ in range(spec["repeat"]):
                t0 = time.perf_counter()
                if spec["method"] == "scan":
                    shards = ((v, r) for _, v, r in store.iter_shards(infos, verify=verify))
                    res = scan(shards, [QueryGroup(q) for q in queries], top_k, spec.get("device", "cpu"))
                    result = [{kd: (res.whole[g][kd].rows[:, 0].tolist(), res.whole[g][kd].scores[:, 0].tolist())
                               for kd in KINDS} for g in range(nq)]
                else:
                    result = naive(store, infos, queries, top_k)
                times.append(time.perf_counter() - t0)
            t = median(times)
            out["runs"].append({"queries": nq, "verify": verify, "seconds": t, "times": times,
                                "gb_per_s": cache_bytes / t / 1e9, "rows_per_s": n_rows / t, "top": result})
    out["peak_rss_mb"] = peak_rss_mb()
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def naive(store, infos, queries, top_k):
    """The original approach: load the whole cache, one query at a time, full sort of all scores."""
    import torch

    matrix = torch.cat([store.load_shard(i, verify=False)[0].float() for i in infos])
    rows = torch.cat([torch.arange(i.start, i.stop) for i in infos])
    found = []
    for q in queries:
        scores = matrix @ q
        lists = {}
        for kd, key in (("helpful", scores), ("harmful", -scores), ("influential", scores.abs())):
            order = torch.sort(key, descending=True, stable=True).indices[:top_k]
            lists[kd] = (rows[order].tolist(), scores[order].tolist())
        found.append(lists)
    return found


def run_worker(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, str(HERE / "speed.py"), "--_worker", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise SystemExit(f"retrieval worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def retrieval_section(args, workdir: Path) -> dict:
    sizes = sorted({args.rows, max(args.shard_rows_scan, args.rows // 4)}, reverse=True)
    queries = [int(q) for q in args.queries.split(",")]
    out = {"k": args.k, "shard_rows": args.shard_rows_scan, "top_k": args.top_k, "dtype": args.dtype, "sizes": []}
    for size in sizes:
        root = workdir / f"retrieval-{size}"
        t0 = time.perf_counter()
        infos = write_synthetic_cache(root, size, args.k, args.shard_rows_scan, dtype=args.dtype)
        write_s = time.perf_counter() - t0
        cache_gb = sum(i.bytes for i in infos) / 1e9
        log(f"retrieval: wrote {size} rows x K={args.k} {args.dtype} = {cache_gb:.2f} GB in {len(infos)} shards "
            f"({write_s:.1f} s)")
        entry = {"rows": size, "cache_gb": cache_gb, "shards": len(infos), "write_seconds": write_s}
        big = size == sizes[0]
        if big:
            entry["anchors"] = run_worker({"method": "anchors", "k": args.k, "shard_rows": args.shard_rows_scan,
                                           "queries": queries, "device": args.device, "dtype": args.dtype})
            log(f"retrieval: limits: memcpy {entry['anchors']['memcpy_gb_per_s']:.1f} GB/s, fp32 product alone "
                f"{entry['anchors']['product_gb_per_s']} GB/s by query count")
        for method in ("scan", "naive"):
            spec = {"root": str(root), "shards": [i.model_dump() for i in infos], "k": args.k, "method": method,
                    "queries": queries if big else sorted({1, max(queries)}) if method == "scan" else [1],
                    "repeat": args.repeat if big else 1, "top_k": args.top_k, "device": args.device}
            entry[method] = run_worker(spec)
            for run in entry[method]["runs"]:
                log(f"retrieval: {size} rows {method} q={run['queries']} verify={run['verify']}: "
                    f"{run['gb_per_s']:.2f} GB/s, {run['seconds']:.2f} s")
            log(f"retrieval: {size} rows {method}: peak RSS {entry[method]['peak_rss_mb']:.0f} MB "
                f"(after imports {entry[method]['baseline_rss_mb']:.0f} MB)")
        # Correctness: the streaming scan ranks exactly like the brute-force full sort.
        naive_top = {r["queries"]: r["top"] for r in entry["naive"]["runs"]}
        # Scores come from different fp32 summation orders (one matrix product per shard vs one matvec per
        # query), so two rows whose scores differ by less than the rounding error may swap places: the
        # check is that the rank-by-rank scores agree within that error, and row swaps are counted.
        mismatched, compared, worst, scale = 0, 0, 0.0, 0.0
        for run in entry["scan"]["runs"]:
            ref = naive_top.get(run["queries"])
            if ref is None:
                continue
            for got, want in zip(run["top"], ref):
                for kd in KINDS:
                    compared += 1
                    mismatched += got[kd][0] != want[kd][0]
                    worst = max(worst, max(abs(a - b) for a, b in zip(got[kd][1], want[kd][1])))
                    scale = max(scale, max(abs(b) for b in want[kd][1]))
        tolerance = 1e-5 * scale
        entry["check"] = {"lists_compared": compared, "lists_with_near_tie_swaps": mismatched,
                          "max_rank_score_diff": worst, "tolerance": tolerance, "same": worst <= tolerance}
        log(f"retrieval: {size} rows: scan vs naive top-{args.top_k}: {compared} lists, rank-by-rank max score "
            f"diff {worst:.2e} (tolerance {tolerance:.2e}), {mismatched} lists with near-tie row swaps")
        assert worst <= tolerance, "streaming scan and naive full sort disagree"
        for method in ("scan", "naive"):
            for run in entry[method]["runs"]:
                run.pop("top")
        shutil.rmtree(root, ignore_errors=True)
        out["sizes"].append(entry)
    if args.s3:
        out["s3"] = s3_scan(args, workdir, queries)
    return out


def s3_scan(args, workdir: Path, queries: list[int]) -> dict:
    """The same scan reading from a local SeaweedFS S3 endpoint (started here, 127.0.0.1, random keys): each shard is
    fetched whole while the previous one is scored (CacheStore.iter_shards prefetches one shard ahead)."""
    import secrets

    sys.path.insert(0, str(HERE.parent))
    from infra.local.s3 import start_seaweedfs

    s3 = start_seaweedfs(workdir / "seaweedfs", access_key="bench-" + secrets.token_hex(6),
                         secret_key=secrets.token_urlsafe(24), bucket="rapidin-bench")
    try:
        url = f"s3://{s3.bucket}/retrieval-{args.rows}"
        t0 = time.perf_counter()
        infos = write_synthetic_cache(url, args.rows, args.k, args.shard_rows_scan,
                                      storage_options=s3.storage_options())
        log(f"retrieval (S3): wrote {args.rows} rows to {s3.endpoint_url} in {time.perf_counter() - t0:.1f} s")
        spec = {"url": url, "storage_options": s3.storage_options(), "shards": [i.model_dump() for i in infos],
                "k": args.k, "method": "scan", "queries": sorted({1, max(queries)}), "repeat": args.repeat,
                "top_k": args.top_k, "root": ""}
        result = run_worker(spec)
    finally:
        s3.stop()
    for run in result["runs"]:
        run.pop("top")
        log(f"retrieval (S3): q={run['queries']} verify={run['verify']}: {run['gb_per_s']:.2f} GB/s")
    return {"rows": args.rows, "cache_gb": args.rows * args.k * 2 / 1e9, **result}


def retrieval_tables(res: dict) -> str:
    big = res["sizes"][0]
    naive_s = {r["queries"]: r["seconds"] for r in big["naive"]["runs"]}
    limits = big.get("anchors", {})
    memcpy = limits.get("memcpy_gb_per_s", float("nan"))
    product = limits.get("product_gb_per_s", {})
    head = ["approach", "queries", "verify", "seconds", "GB/s scanned", "rows/s", "speedup vs naive", "of memcpy",
            "of fp32 product"]
    rows = []
    for r in big["scan"]["runs"]:
        rows.append(["stream scan (iter_shards + scan)", r["queries"], "on" if r["verify"] else "off", r["seconds"],
                     r["gb_per_s"], r["rows_per_s"], f"{naive_s[r['queries']] / r['seconds']:.1f}x",
                     f"{r['gb_per_s'] / memcpy:.0%}",
                     f"{r['gb_per_s'] / product.get(str(r['queries']), float('nan')):.0%}"])
    for r in big["naive"]["runs"]:
        rows.append(["naive (load all, 1 query at a time, full sort)", r["queries"], "off", r["seconds"], r["gb_per_s"],
                     r["rows_per_s"], "1x", f"{r['gb_per_s'] / memcpy:.0%}", ""])
    t1 = table(f"Retrieval: {big['rows']:,} rows x K={res['k']} {res.get('dtype', 'float16')} = {big['cache_gb']:.2f} GB, "
               f"{big['shards']} shards, top-{res['top_k']} (page cache warm); limits measured in the same process: "
               f"memcpy {memcpy:.1f} GB/s, fp32 product alone "
               + ", ".join(f"{v:.1f} GB/s ({q} queries)" for q, v in product.items()), head, rows)
    mrows = []
    for e in res["sizes"]:
        for method in ("scan", "naive"):
            mrows.append([method, f"{e['rows']:,}", e["cache_gb"], e[method]["baseline_rss_mb"],
                          e[method]["peak_rss_mb"],
                          e[method]["peak_rss_mb"] - e[method]["baseline_rss_mb"]])
    t2 = table("Retrieval memory: peak RSS per fresh process (MB)",
               ["approach", "cache rows", "cache GB", "RSS after imports", "peak RSS", "peak - baseline"], mrows)
    checks = "\n".join(f"- {e['rows']:,} rows: scan vs naive, {e['check']['lists_compared']} top-k lists, rank-by-rank "
                       f"max score diff {e['check']['max_rank_score_diff']:.1e} (fp32 summation-order tolerance "
                       f"{e['check']['tolerance']:.1e}); {e['check']['lists_with_near_tie_swaps']} lists with "
                       f"near-tie row swaps" for e in res["sizes"])
    text = t1 + "\n" + t2 + "\n\n" + checks
    if "s3" in res:
        s3 = res["s3"]
        text += "\n\n" + table(f"Retrieval from S3 (local SeaweedFS): {s3['rows']:,} rows = {s3['cache_gb']:.2f} GB",
                                ["queries", "verify", "seconds", "GB/s scanned", "of memcpy"],
                                [[r["queries"], "on" if r["verify"] else "off", r["seconds"], r["gb_per_s"],
                                  f"{r['gb_per_s'] / memcpy:.0%}"] for r in s3["runs"]])
    return text


# --------------------------------------------------------------------------------------------- rapidgrad

