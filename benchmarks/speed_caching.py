"""Speed benchmark, caching: per-example gradients + RapidGrad + write, against the original batch-1 approach."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from speed_common import load_smollm2_lora, load_tiny, log, median, read_alpaca_rows, table


def original_gradient(loaded, params, item):
    """Batch-1 reference: plain autograd on the attributed weights, per-tensor L2 norm, concatenation."""
    import torch
    from rapidin.gradients import collate, per_example_loss

    ids, mask, loss_w = collate([item], loaded.tokenizer.pad_token_id or 0, loaded.device)
    loss = per_example_loss(loaded.model, ids, mask, loss_w, trim_logits=False)[0]  # all logits, as the original
    grads = torch.autograd.grad(loss, params)
    return torch.cat([(g.float() / g.float().norm().clamp_min(1e-30)).flatten() for g in grads])


class only_grad:
    """Context: requires_grad on exactly `params` (restored afterwards)."""

    def __init__(self, model, params):
        self.model, self.ids = model, {id(p) for p in params}

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(id(p) in self.ids)

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.requires_grad_(flag)


def float32_errors(loaded, config, items, batched, looped) -> dict:
    """Relative errors of the half-precision library (batched) and original (looped) gradients against the
    batch-1 gradients of a float32 copy of the model."""
    import copy

    import torch
    from rapidin.gradients import GradientComputer

    reference = copy.copy(loaded)
    reference.model = copy.deepcopy(loaded.model).float()
    computer = GradientComputer(reference, config)
    params = [m.weight for _, m in computer.modules]
    with only_grad(reference.model, params):
        exact = torch.stack([original_gradient(reference, params, it) for it in items])
    errors = {name: float((g - exact).norm() / exact.norm())
              for name, g in (("library", batched), ("original", looped))}
    log(f"caching: against float32 gradients, library {errors['library']:.2e}, original {errors['original']:.2e}")
    return errors


def model_floor(loaded, computer, items, batch_size: int) -> dict:
    """Seconds for the model's own passes over the items in the library's batches: a forward without gradients,
    and the forward+backward that gives the attributed layers' signals (the floor of any gradient cache)."""
    import torch
    from rapidin.gradients import collate, length_batches, per_example_loss

    batches = [[items[i] for i in b] for b in length_batches(items, batch_size)]
    pad = loaded.tokenizer.pad_token_id or 0

    def forward(batch):
        with torch.no_grad():
            per_example_loss(loaded.model, *collate(batch, pad, loaded.device), computer.trim_logits)

    out = {}
    for name, step in (("forward", forward), ("forward_backward", computer.layer_signals)):
        t0 = time.perf_counter()
        for batch in batches:
            step(batch)
        out[name] = time.perf_counter() - t0
    return out


def bench_caching(label: str, loaded, data_rows: list[dict], args, workdir: Path) -> dict:
    import torch
    from rapidin.cache import DTYPES, build_shards, plan_cache
    from rapidin.config import GradientConfig, SketchConfig
    from rapidin.gradients import GradientComputer
    from rapidin.sketch import RapidGrad, apply_by_rounds
    from safetensors.torch import save as st_save

    data_path = workdir / f"{label}-data.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in data_rows))
    gcfg = GradientConfig.paper(max_length=args.max_length, batch_size=args.batch_size)  # every adapter tensor, as the original
    scfg = SketchConfig(k=args.k, lam=args.lam)
    options = dict(sketch=scfg, gradient=gcfg, shard_rows=args.shard_rows, skip_bad_rows=True)

    # Untimed set-up: a first plan fixes the spec; the composed gather index is built once per process.
    plan = plan_cache(loaded, str(data_path), str(workdir / f"{label}-store-warm"), **options)
    spec = plan.manifest.sketch
    items = [it for it in plan.items if it is not None]
    n = len(items)
    t0 = time.perf_counter()
    RapidGrad(spec, loaded.device)
    table_seconds = time.perf_counter() - t0
    computer = GradientComputer(loaded, gcfg)
    params = [m.weight for _, m in computer.modules]
    dtype = DTYPES[scfg.dtype]
    log(f"caching/{label}: {n} examples (skipped {len(plan.items) - n}), D = {spec.d:,}, K = {spec.config.k}, "
        f"tokens/example = {statistics.mean(len(it.input_ids) for it in items):.1f}")

    # Warm-up, and the unsketched check: batched per-example gradients vs the batch-1 loop.
    first = items[: args.batch_size]
    batched = computer.gradients(first)
    with only_grad(loaded.model, params):
        looped = torch.stack([original_gradient(loaded, params, it) for it in first])
    grad_rel = float((batched - looped).norm() / looped.norm())
    log(f"caching/{label}: unsketched gradients, batched vs batch-1 loop: relative error {grad_rel:.2e}")
    to_fp32 = None if args.model_dtype == "float32" else float32_errors(loaded, gcfg, first, batched, looped)

    floor = model_floor(loaded, computer, items, args.batch_size)
    log(f"caching/{label}: the model's own cost: forward {floor['forward']:.2f} s, "
        f"forward+backward to the attributed layers {floor['forward_backward']:.2f} s")

    def library_run(rep):
        root = workdir / f"{label}-store-{rep}"
        t0 = time.perf_counter()
        plan = plan_cache(loaded, str(data_path), str(root), **options)
        t1 = time.perf_counter()
        infos = build_shards(plan, loaded, progress=False)
        t2 = time.perf_counter()
        stages = {s: sum(i.seconds.get(s, 0.0) for i in infos) for s in ("gradients", "sketch", "write")}
        vectors = torch.cat([plan.store.load_shard(i)[0] for i in infos]).float()
        shutil.rmtree(root, ignore_errors=True)
        log(f"caching/{label}: library run {rep + 1}: {n / (t2 - t1):.2f} ex/s ({t2 - t1:.2f} s)")
        return {"plan": t1 - t0, "total": t2 - t1, **stages}, vectors

    def original_run(rep):
        stages = {"gradients": 0.0, "sketch": 0.0, "write": 0.0}
        out = []
        t_start = time.perf_counter()
        with only_grad(loaded.model, params):
            for it in items:
                t0 = time.perf_counter()
                vec = original_gradient(loaded, params, it)
                t1 = time.perf_counter()
                out.append(apply_by_rounds(spec, vec).to(dtype).cpu())
                stages["gradients"] += t1 - t0
                stages["sketch"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        vectors = torch.stack(out)
        data = st_save({"vectors": vectors, "rows": torch.arange(n)})
        hashlib.sha256(data).hexdigest()
        target = workdir / f"{label}-original.safetensors"
        with open(target, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        target.unlink()
        stages["write"] = time.perf_counter() - t0
        total = time.perf_counter() - t_start
        log(f"caching/{label}: original run {rep + 1}: {n / total:.2f} ex/s ({total:.2f} s)")
        return {"total": total, **stages}, vectors.float()

    # Interleaved, so both approaches see the same background load on a shared machine.
    new_runs, orig_runs = [], []
    for rep in range(args.repeat):
        run, new_vectors = library_run(rep)
        new_runs.append(run)
        run, orig_vectors = original_run(rep)
        orig_runs.append(run)

    scale = float(orig_vectors.abs().max())
    max_diff = float((new_vectors - orig_vectors).abs().max())
    vec_rel = float((new_vectors - orig_vectors).norm() / orig_vectors.norm())
    if args.model_dtype == "float32":
        # Both are fp16 roundings of fp32 sketches that agree to ~1e-6, so they differ by at most ~1 fp16 ulp.
        same = max_diff <= 2e-3 * scale + 1e-6 and grad_rel < 1e-4
    else:
        # Half-precision passes carry their own rounding noise (batched and batch-1 round after differently ordered
        # sums), so each is measured against the float32 gradients: the library must be no further from them than
        # twice the original's distance (a wrong layer or example would be off by order 1). The sketch step is the
        # float32 code checked exactly in a float32 run.
        same = to_fp32["library"] <= 2 * to_fp32["original"]
    log(f"caching/{label}: max |library - original| = {max_diff:.3e} (max |v| = {scale:.3e}), relative "
        f"{vec_rel:.2e} -> {'SAME' if same else 'DIFFERENT'}")
    assert same, f"{label}: library and original vectors differ (max abs diff {max_diff}, grad rel {grad_rel})"

    def summary(runs):
        return {key: median([r[key] for r in runs]) for key in runs[0]}

    new, orig = summary(new_runs), summary(orig_runs)
    return {
        "model": label, "examples": n, "d": spec.d, "k": spec.config.k, "lam": spec.config.lam,
        "batch_size": args.batch_size, "max_length": args.max_length,
        "tokens_per_example": statistics.mean(len(it.input_ids) for it in items),
        "table_build_seconds": table_seconds, "model_dtype": args.model_dtype, "floor": floor,
        "library": {**new, "examples_per_s": n / new["total"], "runs": new_runs},
        "original": {**orig, "examples_per_s": n / orig["total"], "runs": orig_runs},
        "speedup": orig["total"] / new["total"],
        "check": {"unsketched_grad_rel_err": grad_rel, "to_float32_rel_err": to_fp32, "vector_rel_err": vec_rel,
                  "max_abs_diff": max_diff, "max_abs_value": scale, "same": same},
    }


def caching_section(args, workdir: Path, save=lambda partial: None) -> list[dict]:
    results = []
    from rapidin import toy

    tiny = load_tiny(workdir, args.device, args.model_dtype)
    demo = [{k: r[k] for k in ("instruction", "input", "output")} for r in toy.demo_rows(args.tiny_examples)]
    results.append(bench_caching("tiny-llama", tiny, demo, args, workdir))
    save(results)
    del tiny
    if args.gguf and Path(args.gguf).exists():
        rows = read_alpaca_rows(args.data, args.examples)
        log("caching: loading SmolLM2-135M-Instruct (GGUF, dequantised to fp32) + LoRA")
        smol = load_smollm2_lora(args.gguf, args.device, dtype=args.model_dtype)
        results.append(bench_caching("smollm2-135m-lora", smol, rows[: args.examples], args, workdir))
        del smol
    else:
        results.append({"model": "smollm2-135m-lora", "skipped": f"GGUF not found at {args.gguf!r} (pass --gguf)"})
        log(f"caching: SmolLM2 skipped: {results[-1]['skipped']}")
    return results


def caching_tables(results: list[dict]) -> str:
    head = ["model", "dtype", "approach", "examples", "D", "ex/s", "gradients s", "sketch s", "write s", "total s",
            "speedup", "best ex/s", "best speedup", "fwd s", "fwd+bwd s", "fwd+bwd / total"]
    rows = []
    for r in results:
        if "skipped" in r:
            rows.append([r["model"], "skipped: " + r["skipped"]] + [""] * (len(head) - 2))
            continue
        best = {name: min(run["total"] for run in r[name]["runs"]) for name in ("library", "original")}
        for name in ("library", "original"):
            m = r[name]
            lib = name == "library"
            floor = r.get("floor", {})
            rows.append([r["model"], r.get("model_dtype", "float32"),
                         "batched + composed RapidGrad" if lib else "batch-1 loop + apply_by_rounds",
                         r["examples"], f"{r['d']:,}", m["examples_per_s"], m["gradients"], m["sketch"], m["write"],
                         m["total"], f"{r['speedup']:.2f}x" if lib else "1x", r["examples"] / best[name],
                         f"{best['original'] / best['library']:.2f}x" if lib else "1x",
                         floor.get("forward", "") if lib else "", floor.get("forward_backward", "") if lib else "",
                         f"{floor['forward_backward'] / m['total']:.0%}" if lib and floor else ""])
    checks = "\n".join(
        f"- {r['model']}: batched vs batch-1 unsketched gradient rel. error "
        f"{r['check']['unsketched_grad_rel_err']:.1e}; "
        f"cached fp16 vectors max |diff| {r['check']['max_abs_diff']:.1e} (max |v| {r['check']['max_abs_value']:.2f}); "
        f"K = {r['k']}, lam = {r['lam']}, batch {r['batch_size']}, {r['tokens_per_example']:.0f} tokens/example; "
        f"gather-index build (once per process, not in the totals) {r['table_build_seconds']:.2f} s"
        for r in results if "skipped" not in r)
    return table("Caching throughput (medians of interleaved repeats; stage seconds are for all examples; "
                 "best = fastest repeat)", head, rows) + "\n\n" + checks


# --------------------------------------------------------------------------------------------- retrieval

