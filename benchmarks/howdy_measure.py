"""Howdy benchmark, measurement stages: exact training gradients, exact scores, RapidGrad caches and the
end-to-end check of rapidin.attribute, variants and the multi-checkpoint (TracIn) scores."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from howdy_common import SUBSETS, log, rule_gradients


class MeasureStages:
    """grads, exact, caches, variants, tracin (mixed into howdy.Run)."""

    def plan(self, params: tuple[str, ...], k: int, method: str = "rapidgrad", dtype: str = "float16"):
        from rapidin.cache import plan_cache
        from rapidin.config import SketchConfig

        return plan_cache(self.model(), str(self.data_path), (self.wd / "store").as_uri(),
                          sketch=SketchConfig(method=method, k=k, lam=20, dtype=dtype),
                          gradient=self.gradient_config(params),
                          shard_rows=self.args.chunk, skip_bad_rows=True)

    def grads(self) -> None:
        from rapidin.gradients import GradientComputer, length_batches
        from safetensors.torch import save_file

        loaded = self.model()
        plan = self.plan((), min(self.args.k))
        computer = GradientComputer(loaded, self.gradient_config())
        out = self.wd / "grads"
        out.mkdir(exist_ok=True)
        n = len(plan.items)
        valid = sum(it is not None for it in plan.items)
        log(f"{valid}/{n} rows have response tokens within max_length {self.args.max_length}; D = {computer.dim}")
        bar = tqdm(total=valid, desc="training gradients (exact)", unit="ex")
        seconds = json.loads((out / "seconds.json").read_text()) if (out / "seconds.json").exists() else {}
        for c in range(-(-n // self.args.chunk)):
            path = out / f"chunk-{c:05d}.safetensors"
            rows = [r for r in range(c * self.args.chunk, min(n, (c + 1) * self.args.chunk)) if plan.items[r] is not None]
            if path.exists():
                bar.update(len(rows))
                continue
            t0 = time.perf_counter()
            items = [plan.items[r] for r in rows]
            grads = torch.zeros(len(rows), computer.dim)
            for batch in length_batches(items, self.args.batch_size):  # as the library's cache build batches
                grads[batch] = computer.gradients([items[i] for i in batch])
            seconds[str(c)] = time.perf_counter() - t0
            save_file({"grads": grads.contiguous(), "rows": torch.tensor(rows, dtype=torch.long)}, str(path) + ".tmp")
            Path(str(path) + ".tmp").rename(path)
            (out / "seconds.json").write_text(json.dumps(seconds))
            bar.update(len(rows))
        bar.close()
        (out / "done").write_text(json.dumps({"rows": valid, "dim": computer.dim, "layout": computer.layout,
                                              "seconds": sum(seconds.values())}))

    def chunks(self):
        from safetensors.torch import load_file

        for path in sorted((self.wd / "grads").glob("chunk-*.safetensors")):
            data = load_file(str(path))
            yield int(path.stem.split("-")[1]), data["grads"], data["rows"]

    def columns(self) -> dict[str, torch.Tensor]:
        """Column mask of each tensor set present in this adapter (sets equal to an earlier one are dropped)."""
        layout = json.loads((self.wd / "grads" / "done").read_text())["layout"]
        out: dict[str, torch.Tensor] = {}
        for key, regex in SUBSETS.items():
            mask = torch.cat([torch.full((math.prod(shape),), bool(re.search(regex, name)), dtype=torch.bool)
                              for name, shape in layout])
            if mask.any() and not any(torch.equal(mask, m) for m in out.values()):
                out[key] = mask
        return out

    def subset_scores(self, flat: torch.Tensor, chunks) -> dict[str, np.ndarray]:
        """Exact inner products [rows, queries] of every training chunk with `flat`, per tensor set, streamed."""
        cols = self.columns()
        scores: dict[str, list] = {key: [] for key in cols}
        for grads in chunks:
            for key, mask in cols.items():
                scores[key].append(grads @ flat.T if key == "all" else grads[:, mask] @ flat[:, mask].T)
        return {key: torch.cat(v).numpy() for key, v in scores.items()}

    def exact(self) -> None:
        q = self.query_vectors()  # [G, 3, D]
        rows = []

        def chunks():
            for _, grads, r in tqdm(self.chunks(), desc="exact scores (streamed)", unit="chunk"):
                rows.append(r)
                yield grads

        t0 = time.perf_counter()
        scores = self.subset_scores(q.reshape(-1, q.shape[-1]), chunks())
        seconds = time.perf_counter() - t0
        np.savez(self.wd / "exact.npz", rows=torch.cat(rows).numpy(), seconds=seconds,
                 **{k: v.reshape(-1, *q.shape[:2]) for k, v in scores.items()})

    def caches(self) -> None:
        from rapidin.cache import finalize_cache
        from rapidin.retrieval import QueryGroup, scan
        from rapidin.sketch import KroneckerSketch, make_sketch

        q = self.query_vectors()
        flat = q.reshape(-1, q.shape[-1])
        cols = self.columns()
        results = {}
        for key in self.args.cache_subsets:
            b = cols[key]
            params = () if key == "all" else (SUBSETS[key],)
            for k, method in [(k, m) for m in self.args.sketch_methods for k in sorted(self.args.k)]:
                plan = self.plan(params, k, method)
                layout = json.loads((self.wd / "grads" / "done").read_text())["layout"]
                expected = [x for x in layout if re.search(SUBSETS[key], x[0])]
                assert json.loads(json.dumps(plan.manifest.layout)) == expected, "cache layout != gradient layout"
                made = make_sketch(plan.manifest.sketch, plan.manifest.layout)
                # the stored exact gradients are projected as the library's gradient pass would (tested equal)
                sketch = made.apply_dense if isinstance(made, KroneckerSketch) else made
                for c, grads, rows in tqdm(self.chunks(), desc=f"cache {key} K=2^{int(math.log2(k))}", unit="chunk"):
                    if plan.store.committed_shard(c, plan.manifest.shard_range(c), verify=False) is not None:
                        continue
                    t0 = time.perf_counter()
                    vectors = (sketch(grads if key == "all" else grads[:, b]).half() + 0.0).cpu()
                    dt = time.perf_counter() - t0
                    start, stop = plan.manifest.shard_range(c)
                    plan.store.commit_shard(c, start, stop, vectors, rows, {"gradients": 0.0, "sketch": dt, "write": 0.0})
                manifest = finalize_cache(plan) if not plan.manifest.complete else plan.manifest
                t0 = time.perf_counter()
                qs = sketch(flat if key == "all" else flat[:, b])
                groups = [QueryGroup(whole=v) for v in qs]
                shards = ((v, r) for _, v, r in plan.store.iter_shards(manifest.shards, True))
                result = scan(shards, groups, 50, "cpu", keep_all_scores=True)
                t_scan = time.perf_counter() - t0
                results[f"{key}:{k}" + ("" if method == "rapidgrad" else f":{method}")] = {
                    "scores": torch.stack(result.all_scores, 1).numpy().reshape(-1, *q.shape[:2]),
                    "rows": result.all_rows.numpy(), "bytes": sum(s.bytes for s in manifest.shards),
                    "sketch_seconds": sum(s.seconds.get("sketch", 0.0) for s in manifest.shards),
                    "scan_seconds": t_scan, "url": plan.store.url, "queries": qs.reshape(*q.shape[:2], -1)}
        np.savez(self.wd / "sketched.npz", **{f"{name}|{field}": v[field] for name, v in results.items()
                                              for field in ("scores", "rows", "bytes", "sketch_seconds", "scan_seconds")})
        (self.wd / "caches.json").write_text(json.dumps({n: v["url"] for n, v in results.items()}, indent=2))
        self.check_attribute(results)

    def int8(self) -> None:
        """The default tensor set's largest-K cache stored as int8 (per-row scale) beside its fp16 twin, built from
        the same stored gradients with the same sketch; every row scanned with the same queries; scan seconds of
        both (best of 3, files in the page cache)."""
        from rapidin.cache import finalize_cache
        from rapidin.retrieval import QueryGroup, scan
        from rapidin.sketch import make_sketch
        from rapidin.quantize import Int8Rows

        key, k = self.default_subset(), max(self.args.k)
        b = self.columns()[key]
        flat = self.query_vectors()
        flat = flat.reshape(-1, flat.shape[-1])[:, b]
        out = {}
        for dtype in ("float16", "int8"):
            plan = self.plan((SUBSETS[key],), k, dtype=dtype)
            sketch = make_sketch(plan.manifest.sketch, plan.manifest.layout)
            for c, grads, rows in tqdm(self.chunks(), desc=f"cache {key} K=2^{int(math.log2(k))} {dtype}", unit="chunk"):
                if plan.store.committed_shard(c, plan.manifest.shard_range(c), verify=False) is None:
                    v = sketch(grads[:, b])
                    v = Int8Rows.quantize(v) if dtype == "int8" else (v.half() + 0.0)
                    plan.store.commit_shard(c, *plan.manifest.shard_range(c), v, rows, {})
            manifest = finalize_cache(plan) if not plan.manifest.complete else plan.manifest
            groups = [QueryGroup(whole=v) for v in sketch(flat)]
            seconds = []
            for _ in range(3):
                t0 = time.perf_counter()
                result = scan((sv for _, *sv in plan.store.iter_shards(manifest.shards, False)), groups, 50, "cpu",
                              keep_all_scores=True)
                seconds.append(time.perf_counter() - t0)
            out[dtype] = {"scores": torch.stack(result.all_scores, 1).numpy(), "rows": result.all_rows.numpy(),
                          "bytes": sum(s.bytes for s in manifest.shards), "scan_seconds": min(seconds)}
        np.savez(self.wd / "int8.npz", **{f"{d}|{f}": v[f] for d, v in out.items() for f in v})
        (self.wd / "int8.json").write_text(json.dumps({"tensors": key, "k": k}))

    def default_subset(self) -> str | None:
        """The tensor set the library attributes by default for this adapter (GradientConfig())."""
        from rapidin.config import GradientConfig
        from rapidin.models import attributed_modules

        chosen = {n + ".weight" for n, _ in attributed_modules(self.model().model, (), True,
                                                              GradientConfig().adapter_tensors)}
        layout = json.loads((self.wd / "grads" / "done").read_text())["layout"]
        for key, regex in SUBSETS.items():
            if {name for name, _ in layout if re.search(regex, name)} == chosen:
                return key
        return None

    def check_attribute(self, results: dict) -> None:
        """The library's documented default end to end: rapidin.attribute(AttributeConfig()) on the largest cache of
        the default tensor set gives this script's query vectors (bit for bit), target positions and scores.

        The two sides scan with query matrices of different shapes, so float32 sums run in different orders: each
        score may differ from the exact inner product by at most gamma_K * sum_i |a_i b_i| (gamma_K = K u / (1 - K u),
        u = 2^-24; Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5), so the two by twice that."""
        from rapidin.attribution import Generation, attribute
        from rapidin.cache import open_cache
        from rapidin.config import AttributeConfig

        key = self.default_subset()
        cache = f"{key}:{max(self.args.k)}"
        if cache not in results:
            raise SystemExit(f"no cache of the library's default tensor set ({key}): add it to --cache-subsets")
        loaded = self.model()
        config = AttributeConfig(top_k=5, auto_target=self.args.auto_target)
        gens = [Generation(prompt=g["instruction"], response=g["triggered_response"]) for g in self.attacked()]
        att, result = attribute(loaded, gens, cache_url=results[cache]["url"], config=config, progress=False,
                                keep_all_scores=True)
        store, manifest = open_cache(loaded, cache_url=results[cache]["url"])
        library_queries = result.queries  # one whole-generation query per generation (no token-wise columns)
        script_queries = results[cache]["queries"][:, 2]  # the auto-target rule
        mine = torch.from_numpy(results[cache]["scores"][:, :, 2]).double()
        lib = torch.stack(result.all_scores, 1).double()
        stored = torch.cat([store.load_shard(info)[0] for info in manifest.shards]).double()
        k = stored.shape[1]
        gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
        bound = 2 * gamma * (stored.abs() @ script_queries.double().abs().T)
        diff = (mine - lib).abs()
        meta = json.loads((self.wd / "queries.json").read_text())
        same_targets = all(gen.target_positions == [p - m["prompt_len"] for p in m["auto_positions"]]
                           for gen, m in zip(att.generations, meta, strict=True))
        rows = torch.from_numpy(results[cache]["rows"])
        # the library's |score| top 5 must be a top 5 of the script's scores, up to ties within the bound
        top_ok = True
        for g, gen in enumerate(att.generations):
            fifth = mine[:, g].abs().sort(descending=True).values[4]
            for hit in gen.influential:
                i = int((rows == hit.row).nonzero()[0, 0])
                top_ok &= bool(mine[i, g].abs() >= fifth - bound[i, g])
        check = {"tensors": key, "same_query_vectors": bool(torch.equal(library_queries, script_queries)),
                 "same_target_positions": same_targets, "scores_within_fp32_bound": bool((diff <= bound).all()),
                 "max_abs_diff": float(diff.max()), "min_bound": float(bound.min()),
                 "max_abs_score": float(mine.abs().max()), "influential_is_magnitude_top5": top_ok}
        (self.wd / "attribute_check.json").write_text(json.dumps(check))
        log(f"rapidin.attribute(AttributeConfig()) on the default tensor set vs this script: {check}")

    def variants(self) -> None:
        """Extra target rules, exact scores only: auto_target with other N, and the gradient-norm fallback."""
        from rapidin.data import alpaca_prompt, tokenize
        from rapidin.gradients import GradientComputer
        from rapidin.models import LoadedModel
        from rapidin.targets import auto_target_positions

        loaded = self.model()
        computer = GradientComputer(loaded, self.gradient_config())
        # the no-adapter fallback rule, applied to the same model: per-token gradient norm of the LoRA tensors
        no_adapter = LoadedModel(loaded.model, loaded.tokenizer, loaded.ref, loaded.fingerprint, False, loaded.device)
        names = [f"auto{n}" for n in self.args.extra_n] + [f"gradnorm{self.args.auto_target}"]
        vectors, meta = [], []
        for g in tqdm(self.attacked(), desc="extra target rules", unit="gen"):
            item = tokenize(loaded.tokenizer, alpaca_prompt(g["instruction"]), g["triggered_response"],
                            self.args.max_length)
            chosen = [auto_target_positions(loaded, item, n)[0] for n in self.args.extra_n]
            chosen.append(auto_target_positions(no_adapter, item, self.args.auto_target,
                                                self.gradient_config((r"\.lora_",)))[0])
            vectors.append(rule_gradients(computer, item, chosen))
            tokens = [loaded.tokenizer.decode([t]) for t in item.input_ids]
            meta.append({**{n: [tokens[t] for t in c] for n, c in zip(names, chosen, strict=True)},
                         "positions": dict(zip(names, chosen, strict=True))})
        q = torch.stack(vectors)
        scores = self.subset_scores(q.reshape(-1, q.shape[-1]), (g for _, g, _ in tqdm(
            self.chunks(), desc="exact scores, extra rules", unit="chunk")))
        np.savez(self.wd / "variants.npz", names=np.array(names),
                 **{k: v.reshape(-1, *q.shape[:2]) for k, v in scores.items()})
        (self.wd / "variants.json").write_text(json.dumps(meta, indent=2))

    def precond(self) -> None:
        """Preconditioned exact scores: none, diagonal and EK-FAC (rapidin.precondition, fitted on the training rows
        with the final adapter, all LoRA tensors: the factors are per layer, so a tensor subset's are its own), under
        three normalisations of the rows: layer-wise (the paper, the library's cache), raw, and whole-vector cosine.
        Query: H^-1 of the generation's raw gradient, layer-normalised after for the layer-wise rows (the library's
        query); whole-response and auto-target losses. The fit's first pass also records each row's per-layer
        gradient norms, which turn the stored layer-normalised gradients back into raw ones."""
        from rapidin.data import alpaca_prompt, tokenize
        from rapidin.gradients import GradientComputer
        from rapidin.precondition import fit_preconditioners

        loaded = self.model()
        config = self.gradient_config()
        computer = GradientComputer(loaded, config)
        plan = self.plan((), min(self.args.k))
        rows = [r for r, it in enumerate(plan.items) if it is not None]
        norms = torch.zeros(len(rows), len(computer.layout))

        def keep_norms(batch: list[int], layers: list[torch.Tensor]) -> None:
            for m, layer in enumerate(layers):
                norms[batch, m] = layer.flatten(1).norm(dim=1).float()

        fits = fit_preconditioners(computer, [plan.items[r] for r in rows], ["diagonal", "ekfac"],
                                   on_gradients=keep_norms)
        pres = {"none": None, **{kind: pre for kind, (pre, _) in fits.items()}}
        meta = json.loads((self.wd / "queries.json").read_text())
        queries = {}  # (preconditioner, normalised) -> [G, 2, D]: whole response, auto target
        for kind, pre in pres.items():
            for normalize in (True, False):
                qc = GradientComputer(loaded, config.model_copy(update={"normalize": normalize}), preconditioner=pre)
                queries[kind, normalize] = torch.stack([rule_gradients(qc, tokenize(
                    loaded.tokenizer, alpaca_prompt(g["instruction"]), g["triggered_response"], self.args.max_length),
                    [None, m["auto_positions"]]) for g, m in zip(self.attacked(), meta, strict=True)])
        layer_of = torch.cat([torch.full((math.prod(shape),), m) for m, (_, shape) in enumerate(computer.layout)])
        row_index = {r: i for i, r in enumerate(rows)}
        cols = {key: mask for key, mask in self.columns().items() if key in ("all", "mlpB")}
        out: dict[str, list] = {}
        for _, grads, chunk_rows in tqdm(self.chunks(), desc="preconditioned scores", unit="chunk"):
            raw = grads * norms[[row_index[int(r)] for r in chunk_rows]][:, layer_of]
            for key, mask in cols.items():
                sub = {"layer": grads[:, mask], "raw": raw[:, mask]}
                sub["cosine"] = sub["raw"] / sub["raw"].norm(dim=1, keepdim=True).clamp_min(1e-30)
                for kind in pres:
                    for norm, vectors in sub.items():
                        q = queries[kind, norm == "layer"][:, :, mask]
                        out.setdefault(f"{key}|{norm}|{kind}", []).append(
                            (vectors @ q.reshape(-1, q.shape[-1]).T).reshape(len(vectors), *q.shape[:2]))
        np.savez(self.wd / "precond.npz", **{k: torch.cat(v).numpy() for k, v in out.items()})
        # the unpreconditioned layer-wise queries, recomputed here, are the queries stage's bit for bit
        same = bool(torch.equal(queries["none", True], self.query_vectors()[:, [0, 2]]))
        (self.wd / "precond.json").write_text(json.dumps({"same_queries_as_exact_stage": same, "fits": {kind: {
            "fit_seconds": info["seconds"], "factor_bytes": len(pre.to_bytes()), "rows": info["rows"],
            "tokens": info["tokens"]} for kind, (pre, info) in fits.items()}}, indent=2))

    def peers(self) -> None:
        """kronfluence 1.0.1 (`make bench-peers` installs it beside the venv) on the same model, rows, generations and
        loss restrictions (whole response, the auto-target tokens), tracking the library's default tensors (MLP LoRA
        B): EK-FAC and its diagonal, with kronfluence's defaults (true Fisher from sampled labels, damping 0.1 x the
        mean eigenvalue). Its fit and score seconds (wall and CPU) and factor sizes are recorded. Runs last:
        kronfluence wraps the model's modules in place."""
        try:
            from kronfluence.analyzer import Analyzer, prepare_model
            from kronfluence.arguments import FactorArguments, ScoreArguments
            from kronfluence.utils.dataset import DataLoaderKwargs
        except ImportError:
            raise SystemExit("--peers needs kronfluence: `make bench-peers` installs it into .rapidin/peers; "
                             "run with PYTHONPATH=.rapidin/peers") from None
        from kronfluence_task import causal_lm_task, collate_fn, example

        from rapidin.data import alpaca_prompt, tokenize

        loaded = self.model()
        plan = self.plan((), min(self.args.k))
        items = [it for it in plan.items if it is not None]
        order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))  # length-sorted batches, as ours
        train = [example(items[i]) for i in order]
        meta = json.loads((self.wd / "queries.json").read_text())
        queries = []
        for g, m in zip(self.attacked(), meta, strict=True):
            item = tokenize(loaded.tokenizer, alpaca_prompt(g["instruction"]), g["triggered_response"], self.args.max_length)
            queries += [example(item), example(item, m["auto_positions"])]
        layout = json.loads((self.wd / "grads" / "done").read_text())["layout"]
        modules = [name.removesuffix(".weight") for name, _ in layout if re.search(SUBSETS["mlpB"], name)]
        task = causal_lm_task(modules)
        out_dir = self.wd / "kronfluence"
        analyzer = Analyzer("howdy", prepare_model(loaded.model, task), task, cpu=True, output_dir=str(out_dir))
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate_fn(loaded.tokenizer.pad_token_id or 0)))
        scores, cost = {}, {}
        if (self.wd / "peers.json").exists():  # a rerun with other strategies keeps the ones measured before
            scores = dict(np.load(self.wd / "peers.npz"))
            cost = json.loads((self.wd / "peers.json").read_text())["kronfluence"]
        for strategy in self.args.peer_strategies:
            wall, cpu = time.perf_counter(), time.process_time()
            analyzer.fit_all_factors(strategy, train, per_device_batch_size=self.args.batch_size,
                                     factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
            fit = (time.perf_counter() - wall, time.process_time() - cpu)
            analyzer.compute_pairwise_scores(f"scores_{strategy}", strategy, queries, train,
                                             per_device_query_batch_size=len(queries),  # one pass over the rows
                                             per_device_train_batch_size=self.args.batch_size,
                                             score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
            total = (time.perf_counter() - wall, time.process_time() - cpu)
            got = analyzer.load_pairwise_scores(f"scores_{strategy}")["all_modules"].float()  # [queries, train]
            full = torch.empty_like(got)
            full[:, order] = got
            scores[strategy] = full.T.reshape(len(items), -1, 2).numpy()
            factors = sum(f.stat().st_size for f in (out_dir / "howdy" / f"factors_{strategy}").rglob("*") if f.is_file())
            cost[strategy] = {"fit_seconds": fit[0], "fit_cpu_seconds": fit[1], "total_seconds": total[0],
                              "total_cpu_seconds": total[1], "factor_bytes": factors}
        np.savez(self.wd / "peers.npz", **scores)
        (self.wd / "peers.json").write_text(json.dumps({"kronfluence": cost, "tensors": "mlpB"}, indent=2))

    def bergson(self) -> None:
        """EleutherAI bergson 2.5.1 (`make peers`) on the same model, rows, generations and loss restrictions (whole
        response, the auto-target tokens), tracking the library's default tensors (MLP LoRA B): per-example gradients
        from its hooks with its per-module random projection (--bergson-dims), scored raw and as cosine (its
        unit_norm). Checked first: with no projection its gradients of the first rows equal rapidin's un-normalised
        ones (same loss: mean over the response tokens)."""
        try:
            from bergson_task import collect, module_names
        except ImportError:
            raise SystemExit("--bergson needs bergson: `make peers` installs it into .rapidin/peers; run with "
                             "PYTHONPATH=.rapidin/peers") from None
        from rapidin.data import alpaca_prompt, tokenize
        from rapidin.gradients import GradientComputer

        a = self.args
        loaded = self.model()
        items = [it for it in self.plan((), min(a.k)).items if it is not None]
        meta = json.loads((self.wd / "queries.json").read_text())
        queries, targets = [], []
        for g, m in zip(self.attacked(), meta, strict=True):
            item = tokenize(loaded.tokenizer, alpaca_prompt(g["instruction"]), g["triggered_response"], a.max_length)
            queries += [item, item]
            targets += [None, m["auto_positions"]]
        layout = json.loads((self.wd / "grads" / "done").read_text())["layout"]
        weights = [name for name, _ in layout if re.search(SUBSETS["mlpB"], name)]
        names = module_names(loaded.model, weights)
        ours = GradientComputer(loaded, self.gradient_config((SUBSETS["mlpB"],)).model_copy(update={"normalize": False}))
        check_rows = items[: a.batch_size * 4]
        reference = ours.gradients(check_rows)
        saved = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
        for n, p in loaded.model.named_parameters():  # bergson's backward needs the tracked weights to want gradients
            p.requires_grad_(n in set(weights))
        try:
            unprojected, _ = collect(loaded.model, check_rows, [None] * len(check_rows), names, 0, a.batch_size)
            # the same float32 terms summed in other orders differ by ~tokens * u relative (96 * 6e-8 < 1e-5 of the
            # largest entry); 1e-3 stops only a real mismatch (another loss, tensor or scale)
            diff = float((unprojected - reference).abs().max())
            check = {"rows": len(check_rows), "max_abs_diff": diff, "max_abs_gradient": float(reference.abs().max())}
            if diff > 1e-3 * check["max_abs_gradient"]:
                raise SystemExit(f"bergson's unprojected gradients differ from rapidin's: {check}")
            results, cost = {}, {}
            for dim in a.bergson_dims:
                train, c_train = collect(loaded.model, items, [None] * len(items), names, dim, a.batch_size)
                query, c_query = collect(loaded.model, queries, targets, names, dim, a.batch_size)
                for norm in ("raw", "cosine"):
                    t, q = (train, query) if norm == "raw" else (F.normalize(train, dim=1), F.normalize(query, dim=1))
                    results[f"{dim}|{norm}"] = (t @ q.T).reshape(len(items), -1, 2).numpy()
                cost[dim] = {"train": c_train, "query": c_query, "dim": train.shape[1],
                             "gradient_bytes_fp32": train.numel() * 4}
        finally:
            for n, p in loaded.model.named_parameters():
                p.requires_grad_(saved[n])
        np.savez(self.wd / "bergson.npz", **results)
        (self.wd / "bergson.json").write_text(json.dumps({"check": check, "cost": cost, "tensors": "mlpB"}, indent=1))

    def tracin_rules(self) -> list[str]:
        extra = [f"gradnorm{self.args.auto_target}"] if (self.wd / "variants.json").exists() else []
        return ["whole", "words", "auto", *extra]

    def tracin(self) -> None:
        """The original TracIn: exact scores at earlier checkpoints of the fine-tune (--tracin-epochs), one file per
        checkpoint (resumable). Target positions are the final model's; `score` sums with the final scores."""
        from rapidin.data import alpaca_prompt, tokenize
        from rapidin.gradients import GradientComputer
        from rapidin.models import ModelRef, load_model

        a = self.args
        plan = self.plan((), min(a.k))  # the tokenised rows; the tokenizer is the same at every checkpoint
        rows = [r for r, item in enumerate(plan.items) if item is not None]
        meta = json.loads((self.wd / "queries.json").read_text())
        rules = self.tracin_rules()
        extra = json.loads((self.wd / "variants.json").read_text()) if len(rules) > 3 else [{}] * len(meta)
        layout = json.loads((self.wd / "grads" / "done").read_text())["layout"]
        out = self.wd / "tracin"
        out.mkdir(exist_ok=True)
        for epoch in a.tracin_epochs:
            path = out / f"epoch-{epoch}.npz"
            if path.exists():
                continue
            ref = ModelRef(path=str(a.gguf), name="smollm2-howdy", adapter=str(self.wd / "checkpoints" / f"epoch-{epoch}"))
            loaded = load_model(ref, device="cpu")
            computer = GradientComputer(loaded, self.gradient_config())
            if json.loads(json.dumps(computer.layout)) != layout:
                raise SystemExit(f"checkpoint epoch-{epoch}: tensor layout differs from the final adapter's")
            t0 = time.perf_counter()
            vectors = []
            for g, m, x in zip(self.attacked(), meta, extra, strict=True):
                item = tokenize(loaded.tokenizer, alpaca_prompt(g["instruction"]), g["triggered_response"], a.max_length)
                chosen = [None, m["hand_positions"], m["auto_positions"]] + [x["positions"][r] for r in rules[3:]]
                vectors.append(rule_gradients(computer, item, chosen))
            q = torch.stack(vectors)

            def chunks():
                with tqdm(total=len(rows), desc=f"TracIn: checkpoint epoch {epoch}", unit="ex") as bar:
                    for b in range(0, len(rows), a.batch_size):
                        batch = [plan.items[r] for r in rows[b : b + a.batch_size]]
                        yield computer.gradients(batch)
                        bar.update(len(batch))

            scores = self.subset_scores(q.reshape(-1, q.shape[-1]), chunks())
            np.savez(path, rows=np.array(rows), names=np.array(rules), seconds=time.perf_counter() - t0,
                     **{k: v.reshape(-1, *q.shape[:2]) for k, v in scores.items()})
        (out / "done").write_text(json.dumps({"epochs": a.tracin_epochs, "rules": rules}))

    def tracin_product(self) -> None:
        """TracIn through the product, for each K: each --tracin-epochs checkpoint cached by
        rapidin.cache.build_cache (the default tensor set, the final cache's rows and shards), then
        rapidin.attribute(AttributeConfig(), checkpoints=[...]) over the final cache and them, with equal and with
        learning-rate weights, every row's summed score kept."""
        from rapidin.attribution import Checkpoint, Generation, attribute
        from rapidin.cache import build_cache
        from rapidin.config import AttributeConfig, SketchConfig
        from rapidin.models import ModelRef, load_model

        a = self.args
        key, store = self.default_subset(), (self.wd / "store").as_uri()
        models = {e: load_model(ModelRef(path=str(a.gguf), name="smollm2-howdy", dtype=a.model_dtype,
                                         adapter=str(self.wd / "checkpoints" / f"epoch-{e}")), device="cpu")
                  for e in a.tracin_epochs}
        gens = [Generation(prompt=g["instruction"], response=g["triggered_response"]) for g in self.attacked()]
        weightings = {"equal": {e: 1.0 for e in a.tracin_epochs}}
        if (lr := self.tracin_weights(a.tracin_epochs)) is not None:
            weightings["learning_rate"] = lr
        saved, per_k = {}, {}
        for k in sorted(a.k):
            final_url = json.loads((self.wd / "caches.json").read_text())[f"{key}:{k}"]
            urls, cost = {}, {}
            for epoch, loaded in models.items():
                t0 = time.perf_counter()
                manifest = build_cache(loaded, str(self.data_path), store, sketch=SketchConfig(k=k, lam=20),
                                       gradient=self.gradient_config((SUBSETS[key],)), shard_rows=a.chunk,
                                       skip_bad_rows=True)
                urls[epoch] = f"{store}/{loaded.ref.name}/{manifest.model['version']}/{manifest.cache_id}"
                cost[epoch] = {"cache_seconds": manifest.timings.get("total", time.perf_counter() - t0),
                               "bytes": sum(s.bytes for s in manifest.shards)}  # the build's, also when reused
            timings = {}
            for name, weights in weightings.items():
                t0 = time.perf_counter()
                checkpoints = [Checkpoint(models[e], urls[e], weights[e], f"epoch-{e}") for e in a.tracin_epochs]
                att, result = attribute(self.model(), gens, cache_url=final_url, progress=False, keep_all_scores=True,
                                        config=AttributeConfig(top_k=50, auto_target=a.auto_target),
                                        checkpoints=checkpoints)
                saved |= {f"rows|{k}|{name}": result.all_rows.numpy(),
                          f"scores|{k}|{name}": torch.stack(result.all_scores, 1).numpy()}
                timings[name] = {"seconds": time.perf_counter() - t0, **att.timings}
            per_k[k] = {"final_cache": final_url, "checkpoints": cost, "attribute": timings}
        np.savez(self.wd / "tracin_product.npz", **saved)
        (self.wd / "tracin_product.json").write_text(json.dumps({
            "tensors": key, "weights": weightings, "per_k": per_k}, indent=1))

    # ------------------------------------------------------------------ scoring
