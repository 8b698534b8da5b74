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
          answer known); automatic target (rapidin.targets.auto_target_positions: the --auto-target tokens
          whose log-probability the fine-tune raised most).
grads     every training row's uncompressed layer-normalised gradient (all LoRA tensors), in chunks on disk.
exact     exact scores: inner products of the uncompressed gradients, streamed chunk by chunk (no sketch),
          for all LoRA tensors and for the LoRA B tensors only (a column subset: normalisation is per
          tensor, so the subset is exactly the B-only gradient).
precond   (--preconditioners) none / diagonal / EK-FAC preconditioned exact scores, rows layer-normalised, raw
          or cosine (rapidin.precondition fitted on the training rows).
peers     (--peers) kronfluence 1.0.1 EK-FAC and diagonal on the same rows, generations and target tokens.
bergson   (--bergson) EleutherAI bergson 2.5.1's per-example gradients (checked equal to ours unprojected), with its
          per-module random projection (--bergson-dims), scored raw and as cosine.
int8      (--int8) the default tensor set's largest-K cache stored as int8 (per-row scale) beside fp16: ranking
          agreement and scan seconds.
tracin    (--tracin-epochs) exact scores at earlier fine-tune checkpoints; tracin_product: each checkpoint cached
          by rapidin.cache.build_cache and attributed with the final model by rapidin.attribute(checkpoints=...),
          equal and learning-rate weights, per K (the flows' default).
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
import sys
import time
from pathlib import Path

import torch

from howdy_common import ATTENTION, DEFAULT_DATA, DEFAULT_GGUF, MLP, SUBSETS, log
from howdy_measure import MeasureStages
from howdy_report import ScoreStages, table
from howdy_setup import SetupStages, export_fixture


class Run(SetupStages, MeasureStages, ScoreStages):
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
            ref = ModelRef(path=str(self.args.gguf), name="smollm2-howdy", dtype=self.args.model_dtype,
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
    p.add_argument("--preconditioners", action="store_true",
                   help="also score with the diagonal and EK-FAC preconditioners (fitted: two more gradient passes) "
                   "under layer-wise, raw and cosine row normalisation")
    p.add_argument("--peers", action="store_true",
                   help="also score with kronfluence EK-FAC and diagonal (needs `make bench-peers`, "
                   "PYTHONPATH=.rapidin/peers); runs last")
    p.add_argument("--peer-strategies", nargs="+", default=["ekfac", "diagonal"], choices=["ekfac", "diagonal"],
                   help="kronfluence strategies run by --peers (each: its fit plus one scoring pass over the rows)")
    p.add_argument("--int8", action="store_true",
                   help="also store the default cache as int8 and compare its ranking and scan time with fp16")
    p.add_argument("--bergson", action="store_true",
                   help="also run EleutherAI bergson (needs `make peers` and PYTHONPATH=.rapidin/peers)")
    p.add_argument("--bergson-dims", type=int, nargs="+", default=[16],
                   help="bergson's per-module projection sizes (each module's gradient -> dim x dim)")
    p.add_argument("--sketch-methods", nargs="+", default=["rapidgrad"], choices=["rapidgrad", "kronecker"],
                   help="sketches cached at each K (kronecker: LoGra-style per-layer projection)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per gradient batch")
    p.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights dtype of the model whose gradients are taken (bfloat16: faster on CPUs with AMX)")
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
    if args.int8:
        run.stage("int8", wd / "int8.npz", run.int8)
    if args.extra_n:
        run.stage("variants", wd / "variants.npz", run.variants)
    if args.tracin_epochs:
        run.stage("tracin", wd / "tracin" / "done", run.tracin)
        run.stage("tracin_product", wd / "tracin_product.npz", run.tracin_product)
    if args.preconditioners:
        run.stage("precond", wd / "precond.npz", run.precond)
    if args.peers:
        run.stage("peers", wd / "peers.npz", run.peers)
    if args.bergson:
        run.stage("bergson", wd / "bergson.npz", run.bergson)
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
