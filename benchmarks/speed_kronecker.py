"""Full-parameter caching: the Kronecker (LoGra-style) sketch against RapidGrad's [B, D] path, same rows, same K.

For every attributed Linear weight (no adapter: all of them), one batch of rows is taken through
  rapidgrad:  per-example gradients formed as [B, D] (GradientComputer.gradients), then RapidGrad (K, lam)
  kronecker:  the same forward/backward, each layer's gradient projected by two +-1 factors, never formed
and the seconds of each stage, the peak RSS of each (in a fresh process) and the forward+backward alone (no hooks, one
summed loss: the floor any per-example method pays) are printed as one JSON line per model plus a table.

  .venv/bin/python benchmarks/speed_kronecker.py --rows 8 --k 65536            # tiny Llama and SmolLM2 (GGUF)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def load(model: str, gguf: str, device: str):
    import tempfile

    from rapidin.models import ModelRef, load_model
    from speed_common import load_tiny

    if model == "tiny-llama":
        return load_tiny(Path(tempfile.mkdtemp(prefix="rapidin-kron-")), device)
    return load_model(ModelRef(path=gguf), device=device)


def worker(spec: dict) -> dict:
    """One method on one model, in this (fresh) process."""
    import resource

    import torch
    from rapidin.config import GradientConfig, SketchConfig
    from rapidin.gradients import GradientComputer, collate, per_example_loss
    from rapidin.sketch import RapidGrad, make_sketch, make_spec, projector
    from speed_common import sync, tokenized_rows

    torch.manual_seed(0)
    device = spec["device"]
    loaded = load(spec["model"], spec["gguf"], device)
    items = tokenized_rows(loaded, spec["data"], spec["rows"], spec["max_length"])
    config = GradientConfig(batch_size=len(items), max_length=spec["max_length"])
    dense = GradientComputer(loaded, config)
    out = {"model": spec["model"], "method": spec["method"], "rows": len(items), "d": dense.dim,
           "tokens": sum(len(it.input_ids) for it in items) / len(items)}
    sketch_config = SketchConfig(method=spec["method"] if spec["method"] != "fwd+bwd" else "rapidgrad",
                                 k=spec["k"], lam=spec["lam"])
    spec_ = make_spec(sketch_config, dense.dim)
    if spec["method"] == "fwd+bwd":  # the floor: one forward and backward of the summed loss, no per-example work
        ids, mask, loss_w = collate(items, loaded.tokenizer.pad_token_id or 0, loaded.device)
        def run():
            loss = per_example_loss(loaded.model, ids, mask, loss_w).sum()
            torch.autograd.grad(loss, [p for p in loaded.model.parameters() if p.requires_grad])
        run()
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        out["seconds"] = {"total": time.perf_counter() - t0}
    else:
        t0 = time.perf_counter()
        sketch = make_sketch(spec_, dense.layout, loaded.device)
        out["setup_seconds"] = time.perf_counter() - t0
        computer = GradientComputer(loaded, config, projector(sketch))
        computer.gradients(items[:1])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        grads = computer.gradients(items)
        sync(device)
        t1 = time.perf_counter()
        vectors = sketch(grads)
        sync(device)
        t2 = time.perf_counter()
        out["seconds"] = {"gradients": t1 - t0, "sketch": t2 - t1, "total": t2 - t0}
        out["norm"] = float(vectors.norm())
        if isinstance(sketch, RapidGrad):
            out["rapidgrad_input_gb"] = grads.numel() * 4 / 1e9
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        out["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny-llama,smollm2", help="Comma-separated: tiny-llama, smollm2.")
    p.add_argument("--gguf", default=str(HERE.parent / ".rapidin" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "howdy" / "train.jsonl"))
    p.add_argument("--rows", type=int, default=8, help="Rows in the one timed batch.")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--k", type=int, default=2**16)
    p.add_argument("--lam", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0
    results = []
    for model in args.models.split(","):
        for method in ("fwd+bwd", "kronecker", "rapidgrad"):
            spec = {"model": model, "method": method, "gguf": args.gguf, "data": args.data, "rows": args.rows,
                    "max_length": args.max_length, "k": args.k, "lam": args.lam, "device": args.device}
            proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{model} {method} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(result), flush=True)
            results.append(result)
    print("\n| model | D | rows | method | gradients s | sketch s | total s | x fwd+bwd | setup s | peak RSS MB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        floor = next(f["seconds"]["total"] for f in results if f["model"] == r["model"] and f["method"] == "fwd+bwd")
        s = r["seconds"]
        print(f"| {r['model']} | {r['d']:,} | {r['rows']} | {r['method']} | {s.get('gradients', float('nan')):.2f} | "
              f"{s.get('sketch', float('nan')):.2f} | {s['total']:.2f} | {s['total'] / floor:.1f} | "
              f"{r.get('setup_seconds', 0):.1f} | {r['peak_rss_mb']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
