"""Caching at scale through the pipeline's fan-out: the `cache-gradients` flow builds an N-row cache on the stack's S3
store (SeaweedFS) with its shard groups dispatched to the `cache-shards/gpu` deployment, exactly as a user's run does
(`executor="deployment"`), once with 1 shard group (one worker, queue gpu-0) and once with 2 (queues gpu-0 and gpu-1).
Each build is timed end to end; the two caches must be complete and hold the same shard bytes (checksums in their
manifests; the benchmark stops if they differ). The rows are the demo's (`rapidin.toy.demo_rows`), the model the tiny
demo Llama with one attributed Linear layer (its last MLP down-projection, D = 8,192; K = 1,024): a model that computes
a gradient per row in about a millisecond here, so that the fan-out's own cost is what is measured.

    make stack-up GPU_WORKERS=2 && source .stack/env.sh
    .venv/bin/prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --all
    .venv/bin/python benchmarks/speed_fanout_build.py --rows 100000 --out benchmarks/results_fanout_build.json
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


class PeakRss:
    """Samples, twice a second, the resident memory of every process under the stack's gpu workers (the flow runs
    that compute the shards); `peak_mb` is the largest single process seen."""

    def __init__(self, state: Path = HERE.parent / ".stack" / "state.json") -> None:
        import threading

        services = json.loads(state.read_text())["services"] if state.exists() else []
        self.roots = {s["pid"] for s in services if s["name"].startswith("worker-gpu")}
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            parent, rss = {}, {}
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
                except (OSError, ValueError):
                    continue
                parent[int(proc.name)] = int(status["PPid"])
                rss[int(proc.name)] = int(status.get("VmRSS", "0 kB").split()[0]) / 1024
            for pid in rss:
                p = pid
                while p > 1 and p not in self.roots:
                    p = parent.get(p, 0)
                if p in self.roots and pid not in self.roots:
                    self.peak_mb = max(self.peak_mb, rss[pid])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="training rows cached")
    p.add_argument("--k", type=int, default=1024, help="sketch dimension")
    p.add_argument("--shard-rows", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--params", default=r"model\.layers\.1\.mlp\.down_proj", help="attributed weights (regex)")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2], help="shard groups (one worker queue each)")
    p.add_argument("--workdir", default=".rapidin/bench-fanout-build", help="where the model and data are written")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from flows.cache import cache_gradients
    from rapidin import toy
    from rapidin.config import GradientConfig, SketchConfig
    from rapidin.store import CacheStore
    from tasks.common import ModelSpec, settings

    s = settings()
    if not s.store_url.startswith("s3://"):
        sys.exit(f"RAPIDIN_STORE_URL is {s.store_url!r}: source the stack's env.sh (make stack-up) first")
    workdir = Path(a.workdir).resolve()
    model = toy.build_tiny_llama(workdir / "tiny-llama", [f"{r['instruction']} {r['output']}" for r in toy.demo_rows()])
    data = toy.write_jsonl(toy.demo_rows(a.rows), workdir / f"rows-{a.rows}.jsonl")
    options = dict(data_url=str(data), sketch=SketchConfig(k=a.k), shard_rows=a.shard_rows, executor="deployment",
                   gradient=GradientConfig(params=(a.params,), batch_size=a.batch_size), checkpoints=False)
    run_id = uuid.uuid4().hex[:8]
    builds, reference = {}, None
    for n in a.groups:
        store_url = f"{s.store_url.rstrip('/')}/bench-build-{run_id}/{n}"
        t0 = time.perf_counter()
        with PeakRss() as memory:
            summary = cache_gradients(model=ModelSpec(uri=str(model), name="tiny-bench", version="1"), groups=n,
                                      store_url=store_url, **options)
        seconds = time.perf_counter() - t0
        # finalize_cache marked it complete only with rows 0..N-1 once each; equal shard checksums = equal bytes
        manifest = CacheStore(summary.cache_url, s.storage_options(summary.cache_url)).read_manifest()
        if not manifest.complete or manifest.num_rows != a.rows:
            sys.exit(f"{n} group(s): the cache is not complete with {a.rows} rows")
        checksums = [i.sha256 for i in manifest.shards]
        if reference is None:
            reference = checksums
        elif checksums != reference:
            sys.exit(f"{n} group(s): the cached shards differ from those built with {a.groups[0]} group(s)")
        builds[str(n)] = {"seconds": seconds, "rows_per_s": a.rows / seconds, "shards": len(manifest.shards),
                          "cache_gb": sum(i.bytes for i in manifest.shards) / 1e9, "d": manifest.sketch.d,
                          "cache_url": summary.cache_url, "worker_run_peak_rss_mb": memory.peak_mb}
        print(f"{a.rows:,} rows, {n} group(s): {seconds:.1f} s end to end ({a.rows / seconds:,.0f} rows/s), "
              f"{len(manifest.shards)} shards, D = {manifest.sketch.d:,} -> K = {a.k}, peak RSS of a worker's run "
              f"{memory.peak_mb:,.0f} MB; shards equal across builds", flush=True)
    result = {"rows": a.rows, "k": a.k, "shard_rows": a.shard_rows, "batch_size": a.batch_size, "params": a.params,
              "builds": builds}
    if "1" in builds and "2" in builds:
        result["speedup_2_over_1"] = builds["1"]["seconds"] / builds["2"]["seconds"]
        print(f"2 workers vs 1: {result['speedup_2_over_1']:.2f}x", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
