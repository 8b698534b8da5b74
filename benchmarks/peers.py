"""Per-example gradient throughput next to a peer: same model, adapter, rows and batch size, in one run.

  rapidin      GradientComputer (batched hooks, layer-wise normalised) + RapidGrad K = 2^16: the cache build's work
  kronfluence  1.0.1, `compute_pairwise_scores` with identity factors (no preconditioner to fit, so what is timed is
               its per-example gradients and their products with one query's gradient), tracking the same LoRA
               modules

SmolLM2-135M-Instruct (GGUF) with a LoRA adapter on q/v (r = 8, B non-zero), the first --rows Howdy rows of at most
--max-length tokens, batch 8, rows padded per batch on both sides. kronfluence's PyPI metadata requires torchvision,
which does not import beside this project's CPU torch (and kronfluence never imports it), so it is installed without
its dependencies, beside the venv:

  .venv/bin/uv pip install --python .venv/bin/python --target .rapidin/peers --no-deps kronfluence==1.0.1 \\
      einops einconv opt-einsum
  PYTHONPATH=.rapidin/peers .venv/bin/python benchmarks/peers.py --rows 32

  bergson      EleutherAI bergson 2.5.1: per-example gradients from its own hooks (InMemoryCollector) with its
               per-module 16 x 16 random projection, the same modules

`make peers` installs both peers beside the venv (bergson's metadata also asks for torchaudio, torchopt and
bitsandbytes, which its gradient collector never imports).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def ours(loaded, items, batch: int) -> dict:
    from rapidin.config import GradientConfig, SketchConfig
    from rapidin.gradients import GradientComputer, length_batches
    from rapidin.sketch import RapidGrad, make_spec

    computer = GradientComputer(loaded, GradientConfig(batch_size=batch))
    sketch = RapidGrad(make_spec(SketchConfig(), computer.dim))
    sketch(computer.gradients(items[:1]))  # warm-up (and the gather index)
    t0 = time.perf_counter()
    for b in length_batches(items, batch):
        sketch(computer.gradients([items[i] for i in b]))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "examples_per_s": len(items) / seconds, "d": computer.dim,
            "tensors": [name for name, _ in computer.layout]}


def kronfluence_run(loaded, items, batch: int, tensors: list[str]) -> dict:
    import tempfile

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from kronfluence_task import causal_lm_task, collate_fn, example

    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))  # length-sorted, as ours batches
    train = [example(items[i]) for i in order]
    task = causal_lm_task([name.removesuffix(".weight") for name in tensors])
    model = prepare_model(loaded.model, task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("peers", model, task, cpu=True, disable_tqdm=True, output_dir=out)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate_fn(loaded.tokenizer.pad_token_id or 0)))
        analyzer.fit_all_factors("identity", train, per_device_batch_size=batch,
                                 factor_args=FactorArguments(strategy="identity"), overwrite_output_dir=True)
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores("scores", "identity", train[:1], train, per_device_query_batch_size=1,
                                         per_device_train_batch_size=batch, score_args=ScoreArguments(),
                                         overwrite_output_dir=True)
        seconds = time.perf_counter() - t0
        scores = analyzer.load_pairwise_scores("scores")
    shape = tuple(scores["all_modules"].shape)
    return {"seconds": seconds, "examples_per_s": len(items) / seconds, "scores_shape": shape,
            "tracked_modules": len(tensors)}


def bergson_run(loaded, items, batch: int, tensors: list[str], projection_dim: int = 16) -> dict:
    from bergson_task import collect, module_names

    names = module_names(loaded.model, tensors)
    for n, p in loaded.model.named_parameters():  # its backward needs the tracked weights to want gradients
        p.requires_grad_(n in set(tensors))
    collect(loaded.model, items[:batch], [None] * batch, names, projection_dim, batch)  # warm-up
    grads, cost = collect(loaded.model, items, [None] * len(items), names, projection_dim, batch)
    return {"seconds": cost["seconds"], "examples_per_s": len(items) / cost["seconds"], "dim": grads.shape[1],
            "projection_dim": projection_dim}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=str(HERE.parent / ".rapidin" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "howdy" / "train.jsonl"))
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = p.parse_args(argv)
    from speed_common import load_smollm2_lora, tokenized_rows

    loaded = load_smollm2_lora(args.gguf, "cpu")
    items = tokenized_rows(loaded, args.data, args.rows, args.max_length)
    results = {"rows": len(items), "tokens_per_row": sum(len(i.input_ids) for i in items) / len(items)}
    results["rapidin"] = ours(loaded, items, args.batch)
    results["bergson"] = bergson_run(loaded, items, args.batch, results["rapidin"]["tensors"])
    results["kronfluence"] = kronfluence_run(loaded, items, args.batch, results["rapidin"]["tensors"])  # wraps modules
    results["rapidin"].pop("tensors")
    peers = ("kronfluence", "bergson")
    results["ratio"] = {p: results["rapidin"]["examples_per_s"] / results[p]["examples_per_s"] for p in peers}
    print(json.dumps(results, indent=1))
    print("\n| method | rows | ex/s | seconds |\n|---|---:|---:|---:|")
    for name in ("rapidin", *peers):
        r = results[name]
        print(f"| {name} | {len(items)} | {r['examples_per_s']:.2f} | {r['seconds']:.2f} |")
    print("  ".join(f"rapidin / {p}: {results['ratio'][p]:.2f}x" for p in peers))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
