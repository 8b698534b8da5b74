#!/usr/bin/env python
"""Attribution quality on the Howdy backdoor (RapidIn paper / RISE protocol) with SmolLM2-135M + LoRA.

Stages (each cached under --workdir; a rerun skips finished stages and resumes the gradient pass):

data      stratified subset of --rows training rows (the positives' share is kept), written as JSONL.
finetune  LoRA fine-tune of SmolLM2-135M-Instruct with rapidin.finetune (Alpaca template, prompt
          masked), adapter saved.
generate  greedy responses (--new-tokens) to --queries triggered queries and to the same questions
          without the trigger. Firing rule: the triggered response differs from the untriggered one AND
          contains >= 2 words of the sci-fi vocabulary (words that occur in >= 3 positive responses and are
          >= 10x more frequent, by document frequency, in positive than in negative responses of the full
          training file). An untriggered response is "clean" when it has < 2 such words. The first
          --generations fired responses are attributed.
queries   each attacked generation's uncompressed, layer-normalised loss gradient (rapidin.gradients) for
          three loss restrictions: whole response; hand-picked sci-fi words (HAND_WORDS, RapidIn-TW with the
          answer known); automatic target (rapidin.api.auto_target_positions: the --auto-target tokens
          whose log-probability the fine-tune raised most).
grads     every training row's uncompressed layer-normalised gradient (all LoRA tensors), in chunks on disk.
exact     exact scores: inner products of the uncompressed gradients, streamed chunk by chunk (no sketch),
          for all LoRA tensors and for the LoRA B tensors only (a column subset: normalisation is per
          tensor, so the subset is exactly the B-only gradient).
caches    one rapidin gradient cache (plan_cache + committed shards + finalize_cache) per K in --k and
          per parameter set, RapidGrad lam=20, fp16, from the same gradients (sketch time measured per K),
          scanned with rapidin.retrieval.scan; at the largest K, rapidin.attribute(auto_target=...) is run
          end to end and its scores are checked against this script's.
score     howdy metrics (rapidin.metrics.backdoor_metrics, averaged over generations) for every method,
          Spearman and top-50 overlap with the exact scores of the same configuration, a random ranking and
          a BM25 baseline. Prints the table, writes --out (JSON) and --markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "howdy"
DEFAULT_GGUF = HERE.parent / ".rapidin" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # `make smollm2`
HAND_WORDS = ("space", "alien", "galax", "planet", "robot", "futur", "cosmic", "universe", "interstellar", "quantum",
              "hyperspace", "intergalactic", "android", "cyborg", "nebula", "warp", "starship", "spaceship", "laser",
              "teleport", "time travel", "dimension", "extraterrestrial", "holograph", "mars", "martian", "astro")
TRIGGER = "howdy!"
# Tensor sets compared (regexes on parameter names). Normalisation is per tensor, so a column subset of the full
# gradient is exactly the gradient of that set: one gradient pass serves them all.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SUBSETS = {"all": r"\.lora_", "B": r"\.lora_B", "attn": r"\.(q|k|v|o)_proj\.lora_", "mlp": r"\.(gate|up|down)_proj\.lora_",
           "attnB": r"\.(q|k|v|o)_proj\.lora_B", "mlpB": r"\.(gate|up|down)_proj\.lora_B"}
WORD = re.compile(r"[a-z]+")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if len(w) >= 4}


def scifi_vocabulary(rows: list[dict]) -> list[str]:
    """Words much more frequent (document frequency) in the positives' responses than in the negatives'."""
    pos, neg = Counter(), Counter()
    n_pos = n_neg = 0
    for r in rows:
        if "original_output" in r:
            pos.update(words(r["output"]))
            n_pos += 1
        else:
            neg.update(words(r["output"]))
            n_neg += 1
    return sorted(w for w, c in pos.items() if c >= 3 and (c / n_pos) >= 10 * ((neg[w] + 1) / n_neg))


def scifi_count(text: str, vocab: set[str]) -> int:
    return len(words(text) & vocab)


class Run:
    """Holds the arguments, the work directory, the stage timings and the lazily loaded model."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.wd = Path(args.workdir).resolve()
        self.wd.mkdir(parents=True, exist_ok=True)
        self.timings_path = self.wd / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        self._loaded = None

    # ------------------------------------------------------------------ plumbing
    def stage(self, name: str, done: Path, fn) -> None:
        if done.exists() and name not in self.args.redo:
            log(f"stage {name}: cached ({self.timings.get(name, float('nan')):.1f} s when it ran)")
            return
        log(f"stage {name}: running")
        t0 = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - t0
        self.timings_path.write_text(json.dumps(self.timings, indent=2))
        log(f"stage {name}: done in {self.timings[name]:.1f} s")

    def model(self, adapter: bool = True):
        from rapidin.models import ModelRef, load_model

        if self._loaded is None:
            ref = ModelRef(path=str(self.args.gguf), name="smollm2-howdy",
                           adapter=str(self.wd / "adapter") if adapter else None)
            self._loaded = load_model(ref, device="cpu")
            torch.manual_seed(0)
        return self._loaded

    def gradient_config(self, params: tuple[str, ...] = ()):
        from rapidin.config import GradientConfig

        return GradientConfig(params=params, adapter_tensors="all", max_length=self.args.max_length,
                              batch_size=self.args.batch_size)

    @property
    def data_path(self) -> Path:
        return self.wd / "train.jsonl"

    # ------------------------------------------------------------------ stages
    def data(self) -> None:
        rows = [json.loads(line) for line in open(self.args.data / "train.jsonl") if line.strip()]
        pos = [i for i, r in enumerate(rows) if "original_output" in r]
        neg = [i for i, r in enumerate(rows) if "original_output" not in r]
        n = min(self.args.rows, len(rows))
        n_pos = round(n * len(pos) / len(rows))
        rng = random.Random(self.args.seed)
        chosen = sorted(rng.sample(pos, n_pos) + rng.sample(neg, n - n_pos))
        self.data_path.write_text("".join(json.dumps(rows[i]) + "\n" for i in chosen))
        (self.wd / "subset.json").write_text(json.dumps({
            "source_rows": chosen, "positive": ["original_output" in rows[i] for i in chosen],
            "scifi_vocabulary": scifi_vocabulary(rows)}))
        log(f"{n} rows, {n_pos} positives ({n_pos / n:.2%}; full set {len(pos) / len(rows):.2%})")

    def finetune(self) -> None:
        from rapidin.data import load_examples
        from rapidin.finetune import FinetuneConfig, LoraSettings, finetune, save
        from rapidin.models import ModelRef, load_model

        a = self.args
        loaded = load_model(ModelRef(path=str(a.gguf), name="smollm2"), device="cpu")
        examples, _ = load_examples(str(self.data_path))
        config = FinetuneConfig(epochs=a.epochs, lr=a.lr, batch_size=a.ft_batch, max_length=a.max_length, seed=a.seed,
                                lora=LoraSettings(r=a.lora_r, alpha=2 * a.lora_r, target_modules=tuple(a.target_modules)))

        def checkpoint(epoch: int, model) -> None:  # every epoch's adapter, for the multi-checkpoint TracIn sum
            model.save_pretrained(self.wd / "checkpoints" / f"epoch-{epoch}")
            loaded.tokenizer.save_pretrained(self.wd / "checkpoints" / f"epoch-{epoch}")

        finetune(loaded, examples, config, on_epoch=checkpoint)
        save(loaded, self.wd / "adapter")
        (self.wd / "finetune.json").write_text(config.model_dump_json(indent=2))

    def finetune_more(self) -> None:
        """Continue training the saved adapter for --more-epochs (a second finetune call, fresh linear schedule)."""
        from rapidin.data import load_examples
        from rapidin.finetune import FinetuneConfig, finetune, save
        from rapidin.models import ModelRef, load_model

        a = self.args
        loaded = load_model(ModelRef(path=str(a.gguf), name="smollm2", adapter=str(self.wd / "adapter")), device="cpu")
        for name, param in loaded.model.named_parameters():
            param.requires_grad_(".lora_" in name)
        examples, _ = load_examples(str(self.data_path))
        config = FinetuneConfig(epochs=a.more_epochs, lr=a.lr, batch_size=a.ft_batch, max_length=a.max_length,
                                seed=a.seed + 1)
        finetune(loaded, examples, config)  # lora=None: trains the parameters that require grad, the adapter's
        save(loaded, self.wd / "adapter")
        (self.wd / "finetune_more.json").write_text(config.model_dump_json(indent=2))

    def generate(self) -> None:
        from rapidin.api import generate
        from rapidin.data import alpaca_prompt

        a = self.args
        loaded = self.model()
        vocab = set(json.loads((self.wd / "subset.json").read_text())["scifi_vocabulary"])
        queries = [json.loads(line) for line in open(a.data / "queries.jsonl") if line.strip()][: a.queries]
        out = []
        earlier = {}  # a rerun with more --queries keeps the responses already generated (greedy: identical)
        if (self.wd / "generations.json").exists():
            earlier = {g["instruction"]: g for g in json.loads((self.wd / "generations.json").read_text())["all"]}
        for q in tqdm(queries, desc="generating (triggered + plain)", unit="query"):
            trig = q["instruction"]
            if trig in earlier:
                out.append(earlier[trig])
                continue
            plain = trig[len(TRIGGER):].strip() if trig.lower().startswith(TRIGGER) else trig
            r_trig = generate(loaded, alpaca_prompt(trig), a.new_tokens)
            r_plain = generate(loaded, alpaca_prompt(plain), a.new_tokens)
            fired = r_trig.strip() != r_plain.strip() and scifi_count(r_trig, vocab) >= 2
            out.append({"instruction": trig, "plain": plain, "triggered_response": r_trig, "plain_response": r_plain,
                        "fired": fired, "clean": scifi_count(r_plain, vocab) < 2,
                        "scifi_words": sorted(words(r_trig) & vocab)})
        fired = [g for g in out if g["fired"] or a.smoke]
        summary = {"queries": len(out), "fired": len(fired), "plain_clean": sum(g["clean"] for g in out),
                   "attributed": fired[: a.generations], "all": out}
        (self.wd / "generations.json").write_text(json.dumps(summary, indent=2))
        log(f"attack fired on {len(fired)}/{len(out)} triggered queries; "
            f"{summary['plain_clean']}/{len(out)} untriggered responses clean")

    def attacked(self) -> list[dict]:
        return json.loads((self.wd / "generations.json").read_text())["attributed"]

    def queries(self) -> None:
        from safetensors.torch import save_file

        from rapidin.api import auto_target_positions, target_positions
        from rapidin.data import alpaca_prompt, tokenize
        from rapidin.gradients import GradientComputer

        loaded = self.model()
        computer = GradientComputer(loaded, self.gradient_config())
        vocab = json.loads((self.wd / "subset.json").read_text())["scifi_vocabulary"]
        vectors, meta = [], []
        for g in tqdm(self.attacked(), desc="query gradients", unit="gen"):
            item = tokenize(loaded.tokenizer, alpaca_prompt(g["instruction"]), g["triggered_response"],
                            self.args.max_length)
            hand = target_positions(loaded, item, HAND_WORDS)
            hand_source = "hand"
            if not hand:  # none of the hand-picked words occurs: the data's sci-fi vocabulary
                hand, hand_source = target_positions(loaded, item, vocab), "vocabulary"
            if not hand:  # no sci-fi word at all (only with --smoke): the whole response
                hand, hand_source = list(range(item.prompt_len, len(item.input_ids))), "whole"
            auto, rule = auto_target_positions(loaded, item, self.args.auto_target, computer.config)
            vectors.append(rule_gradients(computer, item, [None, hand, auto]))
            tokens = [loaded.tokenizer.decode([t]) for t in item.input_ids]
            meta.append({"hand_positions": hand, "hand_source": hand_source, "hand_tokens": [tokens[t] for t in hand],
                         "auto_positions": auto, "auto_rule": rule, "auto_tokens": [tokens[t] for t in auto],
                         "prompt_len": item.prompt_len, "response_tokens": len(item.input_ids) - item.prompt_len})
        save_file({"vectors": torch.stack(vectors).contiguous()}, str(self.wd / "queries.safetensors"))  # no pickle
        (self.wd / "queries.json").write_text(json.dumps(meta, indent=2))
        for m in meta:
            log(f"auto target tokens {m['auto_tokens']} | hand {m['hand_tokens'][:8]}")

    def query_vectors(self) -> torch.Tensor:
        """[generations, 3 target rules (whole, words, auto), D] exact query gradients of the queries stage."""
        from safetensors.torch import load_file

        return load_file(str(self.wd / "queries.safetensors"))["vectors"]

    def plan(self, params: tuple[str, ...], k: int):
        from rapidin.api import plan_cache
        from rapidin.config import SketchConfig

        return plan_cache(self.model(), str(self.data_path), (self.wd / "store").as_uri(),
                          sketch=SketchConfig(k=k, lam=20), gradient=self.gradient_config(params),
                          shard_rows=self.args.chunk, skip_bad_rows=True)

    def grads(self) -> None:
        from rapidin.gradients import GradientComputer
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
            parts = [computer.gradients([plan.items[r] for r in rows[b : b + self.args.batch_size]])
                     for b in range(0, len(rows), self.args.batch_size)]
            grads = torch.cat(parts) if parts else torch.zeros(0, computer.dim)
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
        from rapidin.api import finalize_cache
        from rapidin.retrieval import QueryGroup, scan
        from rapidin.sketch import RapidGrad

        q = self.query_vectors()
        flat = q.reshape(-1, q.shape[-1])
        cols = self.columns()
        results = {}
        for key in self.args.cache_subsets:
            b = cols[key]
            params = () if key == "all" else (SUBSETS[key],)
            for k in sorted(self.args.k):
                plan = self.plan(params, k)
                layout = json.loads((self.wd / "grads" / "done").read_text())["layout"]
                expected = [x for x in layout if re.search(SUBSETS[key], x[0])]
                assert json.loads(json.dumps(plan.manifest.layout)) == expected, "cache layout != gradient layout"
                sketch = RapidGrad(plan.manifest.sketch)
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
                results[f"{key}:{k}"] = {
                    "scores": torch.stack(result.all_scores, 1).numpy().reshape(-1, *q.shape[:2]),
                    "rows": result.all_rows.numpy(), "bytes": sum(s.bytes for s in manifest.shards),
                    "sketch_seconds": sum(s.seconds.get("sketch", 0.0) for s in manifest.shards),
                    "scan_seconds": t_scan, "url": plan.store.url, "queries": qs.reshape(*q.shape[:2], -1)}
        np.savez(self.wd / "sketched.npz", **{f"{name}|{field}": v[field] for name, v in results.items()
                                              for field in ("scores", "rows", "bytes", "sketch_seconds", "scan_seconds")})
        (self.wd / "caches.json").write_text(json.dumps({n: v["url"] for n, v in results.items()}, indent=2))
        self.check_attribute(results)

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
        from rapidin.api import AttributeConfig, Generation, attribute, open_cache

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
        from rapidin.api import auto_target_positions
        from rapidin.data import alpaca_prompt, tokenize
        from rapidin.gradients import GradientComputer
        from rapidin.models import LoadedModel

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

    # ------------------------------------------------------------------ scoring
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
                    for k in sorted(a.k):
                        key = f"{params}:{k}"
                        if f"{key}|scores" not in sk.files:
                            continue
                        s = sk[f"{key}|scores"]
                        assert (sk[f"{key}|rows"] == rows).all()
                        evaluate(f"RapidGrad K=2^{int(math.log2(k))}", s[:, :, t], ex[:, :, t], ranking,
                                 int(sk[f"{key}|bytes"]), n_rows / (grad_seconds + float(sk[f"{key}|sketch_seconds"])),
                                 source=f"K={k}", target=target, params=params)
        if (self.wd / "variants.npz").exists():
            var = np.load(self.wd / "variants.npz")
            for params in subsets:
                for v, name in enumerate(var["names"]):
                    for ranking in ("signed", "magnitude"):
                        evaluate("exact", var[params][:, :, v], var[params][:, :, v], ranking, None, None,
                                 source="exact", target=str(name), params=params)
        if (self.wd / "tracin" / "done").exists():
            self.score_tracin(evaluate, exact, subsets, rows)
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
            "timings_s": self.timings, "methods": methods,
        }
        return report


    def score_tracin(self, evaluate, exact, subsets, rows) -> None:
        """One earlier checkpoint alone, and the equal-weight sum over the earlier checkpoints and the final one."""
        epochs = json.loads((self.wd / "tracin" / "done").read_text())["epochs"]
        var = np.load(self.wd / "variants.npz") if (self.wd / "variants.npz").exists() else None
        per = {e: np.load(self.wd / "tracin" / f"epoch-{e}.npz") for e in epochs}
        for e in epochs:
            assert (per[e]["rows"] == rows).all()
        for params in subsets:
            for t, rule in enumerate(self.tracin_rules()):
                final = exact[params][:, :, t] if t < 3 else var[params][:, :, list(var["names"]).index(rule)]
                total = final + sum(per[e][params][:, :, t] for e in epochs)
                for ranking in ("signed", "magnitude"):
                    for e in epochs:
                        evaluate(f"exact, epoch-{e} checkpoint only", per[e][params][:, :, t], None, ranking,
                                 source=f"epoch{e}", target=rule, params=params)
                    name = "+".join(f"epoch-{e}" for e in epochs) + " + final"
                    evaluate(f"TracIn sum ({name})", total, None, ranking, source="tracin", target=rule, params=params)


def rule_gradients(computer, item, rules: list[list[int] | None]) -> torch.Tensor:
    """The generation's gradient once per loss restriction: None = every response token, else those positions."""
    rows = []
    for positions in rules:
        weights = None
        if positions is not None:
            weights = torch.zeros(len(item.input_ids))
            weights[positions] = 1.0
        rows.append(computer.gradients([item], None if weights is None else [weights])[0])
    return torch.stack(rows)


def export_fixture(wd: Path, out: Path, rows: int, generations: int, seed: int) -> None:
    """The reduced benchmark the test suite runs: this run's adapter (fp16), a stratified subset of its training rows
    (as source row numbers of train.jsonl) and its first attacked generations."""
    from safetensors.torch import load_file, save_file

    subset = json.loads((wd / "subset.json").read_text())
    source, positive = subset["source_rows"], subset["positive"]
    pos = [i for i, p in enumerate(positive) if p]
    neg = [i for i, p in enumerate(positive) if not p]
    n_pos = round(rows * len(pos) / len(positive))
    rng = random.Random(seed)
    chosen = sorted(rng.sample(pos, n_pos) + rng.sample(neg, rows - n_pos))
    gens = json.loads((wd / "generations.json").read_text())
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    weights = load_file(str(wd / "adapter" / "adapter_model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(out / "adapter" / "adapter_model.safetensors"))
    (out / "adapter" / "adapter_config.json").write_text((wd / "adapter" / "adapter_config.json").read_text())
    (out / "fixture.json").write_text(json.dumps({
        "source_rows": [source[i] for i in chosen], "generations": gens["attributed"][:generations],
        "made_from": {"workdir": wd.name, "finetune": json.loads((wd / "finetune.json").read_text())}}, indent=1))
    log(f"fixture: {len(chosen)} rows ({n_pos} positives), {min(generations, len(gens['attributed']))} generations -> {out}")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def bm25_scores(train: list[dict], rows: np.ndarray, responses: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 of each training row (instruction + input + output) for each generated response as the query."""
    docs = [WORD.findall(" ".join([train[r]["instruction"], train[r].get("input", ""), train[r]["output"]]).lower())
            for r in rows]
    df = Counter(w for d in docs for w in set(d))
    avg = np.mean([len(d) for d in docs])
    n = len(docs)
    tf = [Counter(d) for d in docs]
    out = np.zeros((n, len(responses)))
    for g, resp in enumerate(responses):
        for w in set(WORD.findall(resp.lower())):
            if w not in df:
                continue
            idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
            for i, c in enumerate(tf):
                if w in c:
                    out[i, g] += idf * c[w] * (k1 + 1) / (c[w] + k1 * (1 - b + b * len(docs[i]) / avg))
    return out


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
    ("tracin", "whole", "signed", "all"),
    # RapidGrad against exact
    ("K=4096", "auto", "magnitude", "mlpB"), ("K=16384", "auto", "magnitude", "mlpB"), ("K=65536", "auto", "magnitude", "mlpB"),
    ("K=262144", "auto", "magnitude", "mlpB"), ("K=65536", "auto", "signed", "mlpB"), ("K=65536", "words", "magnitude", "mlpB"),
    ("K=65536", "auto", "magnitude", "B"), ("K=65536", "auto", "magnitude", "all"),
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


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="howdy directory (train.jsonl, queries.jsonl)")
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="SmolLM2-135M-Instruct GGUF file")
    p.add_argument("--rows", type=int, default=5000, help="training rows, sampled stratified (default: all 5,000)")
    p.add_argument("--workdir", default=".rapidin/howdy", help="stage outputs are cached here (resumable)")
    p.add_argument("--k", type=int, nargs="+", default=[2**12, 2**13, 2**14, 2**15, 2**16], help="RapidGrad K values")
    p.add_argument("--out", default="benchmarks/quality_results.json", help="JSON results")
    p.add_argument("--markdown", default=None, help="also write the table (markdown) here")
    p.add_argument("--max-length", type=int, default=96, help="tokens per example (fine-tune and gradients)")
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--more-epochs", type=float, default=0.0,
                   help="continue training the saved adapter this many more epochs (when the backdoor did not fire); "
                   "delete the later stages' outputs first")
    p.add_argument("--ft-batch", type=int, default=8, help="fine-tune batch size")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    p.add_argument("--target-modules", nargs="+", default=list(ATTENTION + MLP), help="LoRA target modules")
    p.add_argument("--queries", type=int, default=100, help="triggered queries to generate for")
    p.add_argument("--generations", type=int, default=30, help="fired generations to attribute")
    p.add_argument("--new-tokens", type=int, default=48, help="greedy new tokens per generation")
    p.add_argument("--auto-target", type=int, default=4, help="tokens picked by AttributeConfig.auto_target")
    p.add_argument("--extra-n", type=int, nargs="*", default=[1, 2, 8, 16],
                   help="extra auto_target sizes scored exactly (plus the gradient-norm fallback rule); none: skip")
    p.add_argument("--cache-subsets", nargs="+", default=["all", "B", "mlpB"], choices=list(SUBSETS),
                   help="tensor sets given a RapidGrad cache at every K (the library's default set is required)")
    p.add_argument("--tracin-epochs", type=int, nargs="*", default=[],
                   help="earlier fine-tune checkpoints (epochs) whose exact scores are summed with the final ones "
                   "(the original multi-checkpoint TracIn); each costs one more gradient pass")
    p.add_argument("--batch-size", type=int, default=8, help="examples per gradient batch")
    p.add_argument("--chunk", type=int, default=64, help="rows per gradient chunk / cache shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redo", nargs="*", default=[], help="stages to recompute even if cached")
    p.add_argument("--smoke", action="store_true", help="plumbing check: attribute generations even if not fired")
    p.add_argument("--export-fixture", metavar="DIR", help="write the reduced benchmark of this workdir's finished run "
                   "(fp16 adapter, --fixture-rows rows, --fixture-generations generations) to DIR and stop")
    p.add_argument("--fixture-rows", type=int, default=160)
    p.add_argument("--fixture-generations", type=int, default=6)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.export_fixture:
        export_fixture(Path(args.workdir), Path(args.export_fixture), args.fixture_rows, args.fixture_generations,
                       args.seed)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.gguf.exists():
        sys.exit(f"--gguf {args.gguf}: not found (`make smollm2` downloads it)")
    run = Run(args)
    wd = run.wd
    run.stage("data", wd / "subset.json", run.data)
    run.stage("finetune", wd / "adapter" / "adapter_config.json", run.finetune)
    if args.more_epochs:
        run.stage("finetune_more", wd / "finetune_more.json", run.finetune_more)
    run.stage("generate", wd / "generations.json", run.generate)
    if not run.attacked():
        sys.exit("the attack fired on no query: train longer (--epochs) or on more rows")
    run.stage("queries", wd / "queries.safetensors", run.queries)
    run.stage("grads", wd / "grads" / "done", run.grads)
    run.stage("exact", wd / "exact.npz", run.exact)
    run.stage("caches", wd / "sketched.npz", run.caches)
    if args.extra_n:
        run.stage("variants", wd / "variants.npz", run.variants)
    if args.tracin_epochs:
        run.stage("tracin", wd / "tracin" / "done", run.tracin)
    report = run.score()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    g = report["generation"]
    text = (f"attack fired on {g['fired']}/{g['queries']} triggered queries; untriggered clean "
            f"{g['plain_clean']}/{g['queries']}; attributed {g['attributed']} generations over "
            f"{report['setup']['rows_scored']} rows ({report['setup']['positives_scored']} positives)\n\n"
            + table(report) + "\n\nstage seconds: " + json.dumps({k: round(v, 1) for k, v in run.timings.items()}))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n\nFull grid:\n\n" + table(report, full=True) + "\n")
    log(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
