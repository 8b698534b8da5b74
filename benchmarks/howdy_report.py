"""Howdy benchmark, the report writer: metrics of every method against the exact scores, baselines, the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from howdy_common import HAND_WORDS, SUBSETS, bm25_scores, spearman


class ScoreStages:
    """score (mixed into howdy.Run)."""

    def score(self) -> dict:
        from rapidin.metrics import backdoor_metrics

        a = self.args
        subset = json.loads((self.wd / "subset.json").read_text())
        positive = subset["positive"]
        exact = np.load(self.wd / "exact.npz")
        sk = np.load(self.wd / "sketched.npz")
        grads_done = json.loads((self.wd / "grads" / "done").read_text())
        gens = json.loads((self.wd / "generations.json").read_text())
        n_gen = len(gens["attributed"])
        rows = exact["rows"]
        ks = (5, 10, 50)
        grad_seconds = grads_done["seconds"]
        n_rows = grads_done["rows"]
        targets = ("whole", "words", "auto")
        methods = []

        def evaluate(name, scores, ref, ranking, bytes_=None, ex_per_s=None, **extra):
            """scores, ref: [rows, G]; ranking 'signed' or 'magnitude'."""
            f = np.abs if ranking == "magnitude" else (lambda x: x)
            per = [backdoor_metrics(f(scores[:, g]), rows, positive, ks) for g in range(scores.shape[1])]
            m = {key: float(np.mean([p[key] for p in per])) for key in per[0]}
            if ref is not None:
                sp, ov = [], []
                for g in range(n_gen):
                    x, y = f(scores[:, g]), f(ref[:, g])
                    sp.append(spearman(x, y))
                    ov.append(len(set(np.argsort(-x, kind="stable")[:50]) & set(np.argsort(-y, kind="stable")[:50])) / 50)
                m["spearman"], m["top50_overlap"] = float(np.mean(sp)), float(np.mean(ov))
            methods.append({"method": name, "ranking": ranking, **extra, **m, "cache_bytes": bytes_,
                            "examples_per_s": ex_per_s, "per_generation_auprc@5": [p["auprc@5"] for p in per]})

        subsets = [key for key in SUBSETS if key in exact.files]
        for params in subsets:
            ex = exact[params]
            for t, target in enumerate(targets):
                for ranking in ("signed", "magnitude"):
                    evaluate("exact", ex[:, :, t], ex[:, :, t], ranking, None,
                             n_rows / (grad_seconds + float(exact["seconds"])), source="exact", target=target,
                             params=params)
                    for k, method in [(k, m) for m in ("rapidgrad", "kronecker") for k in sorted(a.k)]:
                        key = f"{params}:{k}" + ("" if method == "rapidgrad" else f":{method}")
                        if f"{key}|scores" not in sk.files:
                            continue
                        s = sk[f"{key}|scores"]
                        assert (sk[f"{key}|rows"] == rows).all()
                        label = "RapidGrad" if method == "rapidgrad" else "Kronecker"
                        evaluate(f"{label} K=2^{int(math.log2(k))}", s[:, :, t], ex[:, :, t], ranking,
                                 int(sk[f"{key}|bytes"]), n_rows / (grad_seconds + float(sk[f"{key}|sketch_seconds"])),
                                 source=f"K={k}" + ("" if method == "rapidgrad" else f" {method}"), target=target,
                                 params=params)
        if (self.wd / "variants.npz").exists():
            var = np.load(self.wd / "variants.npz")
            for params in subsets:
                for v, name in enumerate(var["names"]):
                    for ranking in ("signed", "magnitude"):
                        evaluate("exact", var[params][:, :, v], var[params][:, :, v], ranking, None, None,
                                 source="exact", target=str(name), params=params)
        if (self.wd / "tracin" / "done").exists():
            self.score_tracin(evaluate, exact, subsets, rows)
        precond_check = self.score_precond(evaluate, exact) if (self.wd / "precond.npz").exists() else None
        peers = json.loads((self.wd / "peers.json").read_text()) if (self.wd / "peers.json").exists() else None
        if peers:
            got = np.load(self.wd / "peers.npz")
            for strategy, cost in peers["kronfluence"].items():
                for t, target in enumerate(("whole", "auto")):
                    for ranking in ("signed", "magnitude"):
                        evaluate(f"kronfluence {strategy}", got[strategy][:, :, t], None, ranking, cost["factor_bytes"],
                                 None, source=f"kronfluence:{strategy}", target=target, params=peers["tensors"],
                                 cpu_seconds=cost["total_cpu_seconds"])
        if (self.wd / "int8.npz").exists():
            got, info = np.load(self.wd / "int8.npz"), json.loads((self.wd / "int8.json").read_text())
            k, params = info["k"], info["tensors"]
            order = {d: np.argsort(got[f"{d}|rows"]) for d in ("float16", "int8")}
            for d in order:
                assert (got[f"{d}|rows"][order[d]] == rows).all()
            s16, s8 = (got[f"{d}|scores"][order[d]].reshape(len(rows), -1, 3) for d in ("float16", "int8"))
            for ranking in ("signed", "magnitude"):  # Spearman and top-50 overlap against the fp16 cache's ranking
                for dtype, s in (("float16", s16), ("int8", s8)):
                    evaluate(f"RapidGrad K=2^{int(math.log2(k))}, {dtype} cache (vs fp16)", s[:, :, 2], s16[:, :, 2],
                             ranking, int(got[f"{dtype}|bytes"]), None, source=f"K={k} {dtype}", target="auto",
                             params=params, scan_seconds=float(got[f"{dtype}|scan_seconds"]))
        if (self.wd / "bergson.json").exists():
            got, info = np.load(self.wd / "bergson.npz"), json.loads((self.wd / "bergson.json").read_text())
            for key in got.files:
                dim, norm = key.split("|")
                c = info["cost"][dim]
                for t, target in enumerate(("whole", "auto")):
                    for ranking in ("signed", "magnitude"):
                        evaluate(f"bergson, projection {dim}x{dim} per module, {norm}", got[key][:, :, t], None,
                                 ranking, c["gradient_bytes_fp32"], c["train"]["rows"] / c["train"]["seconds"],
                                 source=f"bergson:{dim}:{norm}", target=target, params=info["tensors"],
                                 cpu_seconds=c["train"]["cpu_seconds"] + c["query"]["cpu_seconds"])
        rng = np.random.default_rng(a.seed)
        evaluate("random (mean of 100 draws)", rng.standard_normal((len(rows), 100)), None, "signed", source="random",
                 target="-", params="-")
        bm = bm25_scores([json.loads(line) for line in open(self.data_path)], rows,
                         [g["triggered_response"] for g in gens["attributed"]])
        evaluate("BM25 (response vs row)", bm, None, "signed", source="bm25", target="whole", params="-")
        report = {
            "setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                      "rows_scored": int(len(rows)), "positives_scored": int(np.asarray(positive)[rows].sum()),
                      "D": {key: int(m.sum()) for key, m in self.columns().items()},
                      "hand_words": HAND_WORDS, "torch_threads": torch.get_num_threads()},
            "generation": {"queries": gens["queries"], "fired": gens["fired"], "plain_clean": gens["plain_clean"],
                           "attributed": n_gen},
            "targets": json.loads((self.wd / "queries.json").read_text()),
            "attribute_check": json.loads((self.wd / "attribute_check.json").read_text()),
            "preconditioners": json.loads((self.wd / "precond.json").read_text())["fits"] if precond_check else None,
            "precond_check": precond_check, "peers": peers,
            "bergson": json.loads((self.wd / "bergson.json").read_text()) if (self.wd / "bergson.json").exists() else None,
            "timings_s": self.timings, "methods": methods,
        }
        return report


    def score_precond(self, evaluate, exact) -> dict:
        """Every preconditioner x row normalisation x tensor set. Returns the stage's consistency check: its
        unpreconditioned layer-wise queries equal the queries stage's, and how far its scores are from the exact
        stage's (the same vectors, multiplied in other float32 orders)."""
        pre = np.load(self.wd / "precond.npz")
        meta = json.loads((self.wd / "precond.json").read_text())
        cost = meta["fits"]
        check = {"same_queries_as_exact_stage": meta["same_queries_as_exact_stage"]}
        for key in pre.files:
            params, norm, kind = key.split("|")
            for t, target in enumerate(("whole", "auto")):
                for ranking in ("signed", "magnitude"):
                    evaluate(f"exact, {kind} preconditioner, {norm} rows", pre[key][:, :, t], None, ranking,
                             cost.get(kind, {}).get("factor_bytes"), None, source=f"precond:{kind}:{norm}",
                             target=target, params=params, fit_seconds=cost.get(kind, {}).get("fit_seconds"))
            if kind == "none" and norm == "layer":
                ref = exact[params][:, :, [0, 2]]
                check[params] = {"max_abs_diff": float(np.abs(pre[key] - ref).max()),
                                 "max_abs_score": float(np.abs(ref).max())}
        return check

    def tracin_weights(self, epochs: list[int]) -> dict[int, float] | None:
        """Each checkpoint's learning-rate weight relative to the final epoch's (the flows' learning_rate weighting);
        None without the fine-tune's settings (a workdir started from the test fixture)."""
        from rapidin.finetune import FinetuneConfig

        path = self.wd / "finetune.json"
        if not path.exists():
            return None
        lrs = FinetuneConfig.model_validate_json(path.read_text()).epoch_learning_rates(self.args.rows)
        return {e: lrs[e] / lrs[max(lrs)] for e in epochs}

    def score_tracin(self, evaluate, exact, subsets, rows) -> None:
        """One earlier checkpoint alone, and the sum over the earlier checkpoints and the final one: equal weights
        (exact), learning-rate weights (exact), and through the product (rapidin.attribute with checkpoints,
        RapidGrad caches, equal weights) when the tracin_product stage ran."""
        epochs = json.loads((self.wd / "tracin" / "done").read_text())["epochs"]
        var = np.load(self.wd / "variants.npz") if (self.wd / "variants.npz").exists() else None
        per = {e: np.load(self.wd / "tracin" / f"epoch-{e}.npz") for e in epochs}
        for e in epochs:
            assert (per[e]["rows"] == rows).all()
        weights = self.tracin_weights(epochs)
        name = "+".join(f"epoch-{e}" for e in epochs) + " + final"
        for params in subsets:
            for t, rule in enumerate(self.tracin_rules()):
                final = exact[params][:, :, t] if t < 3 else var[params][:, :, list(var["names"]).index(rule)]
                total = final + sum(per[e][params][:, :, t] for e in epochs)
                for ranking in ("signed", "magnitude"):
                    for e in epochs:
                        evaluate(f"exact, epoch-{e} checkpoint only", per[e][params][:, :, t], None, ranking,
                                 source=f"epoch{e}", target=rule, params=params)
                    evaluate(f"TracIn sum ({name})", total, None, ranking, source="tracin", target=rule, params=params)
                    if weights:
                        weighted = final + sum(weights[e] * per[e][params][:, :, t] for e in epochs)
                        evaluate(f"TracIn sum ({name}), learning-rate weights {weights}", weighted, None, ranking,
                                 source="tracin-lr", target=rule, params=params)
        if (self.wd / "tracin_product.npz").exists():
            got = np.load(self.wd / "tracin_product.npz")
            meta = json.loads((self.wd / "tracin_product.json").read_text())
            params, t = meta["tensors"], 2  # the auto-target rule, the default tensor set
            sk = np.load(self.wd / "sketched.npz")
            for k, run in meta["per_k"].items():
                size = int(sk[f"{params}:{k}|bytes"]) + sum(c["bytes"] for c in run["checkpoints"].values())
                for weighting, w in meta["weights"].items():
                    rows_k = got[f"rows|{k}|{weighting}"]
                    order = np.argsort(rows_k)
                    assert (rows_k[order] == rows).all(), "the product's rows differ from the exact stage's"
                    ref = exact[params][:, :, t] + sum(w[str(e)] * per[e][params][:, :, t] for e in epochs)
                    for ranking in ("signed", "magnitude"):
                        evaluate(f"RapidGrad K=2^{int(math.log2(int(k)))} TracIn ({name}, {weighting} weights), "
                                 "rapidin.attribute", got[f"scores|{k}|{weighting}"][order], ref, ranking, size, None,
                                 source=f"tracin K={k}" + ("" if weighting == "equal" else " lr"), target="auto",
                                 params=params)

PRINTED = [  # (source, target, ranking, params) rows of the printed table; the JSON has the full grid
    # the paper's scoring, exact and sketched
    ("exact", "whole", "signed", "all"), ("K=4096", "whole", "signed", "all"), ("K=16384", "whole", "signed", "all"),
    ("K=65536", "whole", "signed", "all"), ("K=262144", "whole", "signed", "all"),
    # one change at a time from the paper's: ranking, tensors, target
    ("exact", "whole", "magnitude", "all"), ("exact", "whole", "signed", "B"), ("exact", "whole", "signed", "mlpB"),
    ("exact", "auto", "signed", "all"), ("exact", "words", "signed", "all"),
    # tensor sets under the default target and ranking
    ("exact", "auto", "magnitude", "all"), ("exact", "auto", "magnitude", "attn"), ("exact", "auto", "magnitude", "mlp"),
    ("exact", "auto", "magnitude", "B"), ("exact", "auto", "magnitude", "attnB"), ("exact", "auto", "magnitude", "mlpB"),
    # target rules on the default tensors
    ("exact", "words", "magnitude", "mlpB"), ("exact", "auto1", "magnitude", "mlpB"), ("exact", "auto2", "magnitude", "mlpB"),
    ("exact", "auto8", "magnitude", "mlpB"), ("exact", "auto16", "magnitude", "mlpB"),
    ("exact", "gradnorm4", "magnitude", "mlpB"), ("exact", "whole", "magnitude", "mlpB"),
    # checkpoints
    ("epoch2", "auto", "magnitude", "mlpB"), ("epoch3", "auto", "magnitude", "mlpB"), ("tracin", "auto", "magnitude", "mlpB"),
    ("tracin-lr", "auto", "magnitude", "mlpB"), ("tracin K=65536", "auto", "magnitude", "mlpB"),
    ("tracin K=65536 lr", "auto", "magnitude", "mlpB"), ("tracin K=65536 lr", "auto", "signed", "mlpB"),
    ("tracin K=131072 lr", "auto", "magnitude", "mlpB"), ("tracin K=262144 lr", "auto", "magnitude", "mlpB"),
    ("tracin", "whole", "signed", "all"),
    # RapidGrad against exact
    ("K=4096", "auto", "magnitude", "mlpB"), ("K=16384", "auto", "magnitude", "mlpB"), ("K=65536", "auto", "magnitude", "mlpB"),
    ("K=262144", "auto", "magnitude", "mlpB"), ("K=65536", "auto", "signed", "mlpB"), ("K=65536", "words", "magnitude", "mlpB"),
    ("K=65536", "auto", "magnitude", "B"), ("K=65536", "auto", "magnitude", "all"),
    # preconditioners x row normalisation (exact gradients)
    *[(f"precond:{kind}:{norm}", target, ranking, params)
      for target, ranking, params in (("auto", "magnitude", "mlpB"), ("auto", "magnitude", "all"), ("whole", "signed", "all"))
      for norm in ("layer", "raw", "cosine") for kind in ("none", "diagonal", "ekfac")],
    # peers, same rows and generations
    *[(f"kronfluence:{strategy}", target, ranking, "mlpB") for strategy in ("ekfac", "diagonal")
      for target, ranking in (("auto", "magnitude"), ("auto", "signed"), ("whole", "signed"))],
    ("K=65536 float16", "auto", "magnitude", "mlpB"), ("K=65536 int8", "auto", "magnitude", "mlpB"),
    *[(f"bergson:16:{norm}", target, ranking, "mlpB") for norm in ("raw", "cosine")
      for target, ranking in (("auto", "magnitude"), ("whole", "signed"))],
    ("random", "-", "signed", "-"), ("bm25", "whole", "signed", "-"),
]


def table(report: dict, full: bool = False) -> str:
    head = ("| method | loss on | ranking | tensors | auPRC@5 | auPRC@10 | auPRC@50 | auROC@5 | auROC@10 | auROC@50 "
            "| P@5 | P@10 | P@50 | Spearman vs exact | top-50 overlap | cache bytes | ex/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    index = {(m["source"], m["target"], m["ranking"], m["params"]): m for m in report["methods"]}
    keys = list(index) if full else [k for k in PRINTED if k in index]
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for key in keys:
        m = index[key]
        lines.append(
            f"| {m['method']} | {m['target']} | {m['ranking']} | {m['params']} | " + " | ".join(
                fmt(m.get(f"{s}@{k}")) for s in ("auprc", "auroc", "precision") for k in (5, 10, 50))
            + f" | {fmt(m.get('spearman'))} | {fmt(m.get('top50_overlap'), 2)} | "
            + ("-" if m["cache_bytes"] is None else f"{m['cache_bytes'] / 2**20:.1f} MiB")
            + f" | {fmt(m['examples_per_s'], 2)} |")
    return "\n".join(lines)


