"""The `rapidin` command line: cache, attribute, inspect, report, demo."""

from __future__ import annotations

import argparse
import math
import json
import os
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from .cli_options import OneLineParser, add_model_options, build, describe, fail, given
from .errors import RapidInError
from .urls import check_url

EPILOG = "Settings come from RAPIDIN_* environment variables or .env (see README); S3 keys are never printed."


MODEL_FLAGS = {"path": "model", "version": "model_version", "dtype": "model_dtype"}
ATTRIBUTE_FLAGS = {"paper_scoring": "paper"}  # `--paper`, as in `cache --paper`


def _model_args(p: argparse.ArgumentParser) -> None:
    from .models import ModelRef

    g = p.add_argument_group("model")
    g.add_argument("--model", dest="path", required=True,  # ModelRef.path
                   help=ModelRef.model_fields["path"].description)
    add_model_options(g, ModelRef, skip=("path",), rename=MODEL_FLAGS)
    g.add_argument("--device", help="auto (cuda if available), cpu, cuda or cuda:N (default: RAPIDIN_DEVICE, else auto)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand; algorithm options come from the config models."""
    from .config import AttributeConfig, BuildConfig, GradientConfig, SketchConfig
    from .data import DataFormat

    parser = OneLineParser(prog="rapidin", description="RapidIn: find the training data behind an LLM generation.",
                           epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    c = sub.add_parser("cache", help="compute and store compressed per-example gradients of a training set",
                       description="Cache RapidGrad-compressed, layer-normalised per-example gradients. "
                       "Resumable: a rerun skips committed shards and keeps the plan the cache was started with.",
                       epilog=EPILOG)
    _model_args(c)
    d = c.add_argument_group("data and store")
    d.add_argument("--data-url", "--data", dest="data", required=True,
                   help="training data: .jsonl/.json/.parquet/.csv path or URL")
    d.add_argument("--format", default="auto", choices=list(typing.get_args(DataFormat)), help="row format (default: auto)")
    d.add_argument("--store-url", "--store", dest="store", help="store root URL (default: RAPIDIN_STORE_URL)")
    add_model_options(d, BuildConfig)
    add_model_options(c.add_argument_group("sketch (RapidGrad)"), SketchConfig)
    g = c.add_argument_group("gradients")
    add_model_options(g, GradientConfig)
    g.add_argument("--paper", action="store_true",
                   help="the RapidIn paper's choices: every adapter tensor (--adapter-tensors all), RapidGrad")

    a = sub.add_parser("attribute", help="rank training rows by influence on a generation",
                       description="Score every cached training row for a generation; prints top-k most influential, "
                       "helpful and harmful rows.", epilog=EPILOG)
    _model_args(a)
    q = a.add_argument_group("generations and cache")
    q.add_argument("--store-url", "--store", dest="store",
                   help="store root URL (default: RAPIDIN_STORE_URL); the cache is found by model")
    q.add_argument("--cache", help="URL of one cache directory (instead of --store-url)")
    q.add_argument("--prompt", required=True, action="append", help="user prompt (repeat for several generations)")
    q.add_argument("--response", action="append", help="the response to attribute (default: generate greedily)")
    q.add_argument("--raw-prompt", action="store_true", help="do not apply the training data's prompt template")
    t = a.add_argument_group("several checkpoints (TracIn)")
    t.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                   help="an earlier checkpoint of the fine-tune (repeatable): an adapter directory when --adapter is "
                   "given (applied to --model), else a whole model. Each needs its own cache over the same data with "
                   "the same --shard-rows (`rapidin cache` with that --adapter/--model, no --version), found in "
                   "--store-url; a row's score is the sum of its scores at the final model and each checkpoint")
    t.add_argument("--checkpoint-weight", action="append", default=[], type=float, metavar="W",
                   help="weight of each --checkpoint's scores, in order (e.g. the learning rate there relative to the "
                   "final one; default 1)")
    r = a.add_argument_group("scoring")
    add_model_options(r, AttributeConfig, rename=ATTRIBUTE_FLAGS)
    o = a.add_argument_group("output")
    o.add_argument("--out", help="write the result JSON here (and .parquet beside it)")
    o.add_argument("--open", action="store_true", help="also write an HTML report beside --out and print its path")

    i = sub.add_parser("inspect", help="show a cache's manifest and verify its shards")
    i.add_argument("cache_url", help="URL of a cache directory")
    i.add_argument("--no-verify", action="store_true", help="skip checksum verification")

    r = sub.add_parser("report", help="render the HTML report of a saved result JSON")
    r.add_argument("result", help="result JSON written by `rapidin attribute --out`")
    r.add_argument("--out", help="HTML path (default: beside the JSON)")

    cmp_ = sub.add_parser("compare", help="how the top-k for the same generations changed between two results",
                          description="Rows that entered or left each top-k list and their rank shifts, e.g. between "
                          "two model versions attributing the same generations.")
    cmp_.add_argument("before", help="result JSON (or report.html) of the first run, e.g. model version 1")
    cmp_.add_argument("after", help="result JSON (or report.html) of the second run, e.g. model version 2")
    cmp_.add_argument("--out", help="also write an HTML comparison page here")

    d = sub.add_parser("demo", help="tiny model + backdoored data: fine-tune, cache, attribute, score")
    d.add_argument("--workdir", default=".rapidin/demo", help="where the demo writes model, data and cache")
    d.add_argument("--rows", type=_positive, default=240, help="training rows (default: 240)")
    d.add_argument("--k", type=_positive, default=4096, help="compressed dimension K (default: 4096, fits the tiny model)")
    d.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: RAPIDIN_DEVICE, else auto)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, exit status 2, never a traceback for a user's mistake."""
    args = build_parser().parse_args(argv)
    prog = f"rapidin {args.command}"
    _quiet_dependencies(prog)
    try:
        return {"cache": cmd_cache, "attribute": cmd_attribute, "inspect": cmd_inspect, "report": cmd_report,
                "compare": cmd_compare, "demo": cmd_demo}[args.command](args)
    except RapidInError as exc:
        return fail(prog, str(exc))
    except ValidationError as exc:  # settings from the environment (.env, RAPIDIN_*)
        return fail(prog, describe(exc, MODEL_FLAGS))
    except BrokenPipeError:  # `rapidin inspect ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (committed shards are kept; rerun to resume)", file=sys.stderr)
        return 130


def _quiet_dependencies(prog: str) -> None:
    """Users see the project's messages (one line each), not its dependencies' load bars and deprecations."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: note: %(message)s"))
    logger = logging.getLogger("rapidin")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _settings():
    from .settings import Settings

    return Settings()


def _model_ref(args: argparse.Namespace):
    """The model options, validated before anything is loaded or written."""
    from .models import ModelRef

    check_url(args.path, "--model", RapidInError)
    if getattr(args, "adapter", None):
        check_url(args.adapter, "--adapter", RapidInError)
    return build(ModelRef, {"path": args.path} | given(args, ModelRef, ("path",), MODEL_FLAGS), MODEL_FLAGS)


def _load(args: argparse.Namespace, ref, settings):
    from transformers.utils import logging as hf_logging

    from .models import load_model

    hf_logging.disable_progress_bar()  # the project's own bars only
    hf_logging.set_verbosity_error()
    return load_model(ref, args.device or settings.device, settings.storage_options(ref.path), settings.model_cache_dir)


def cmd_cache(args: argparse.Namespace) -> int:
    """rapidin cache."""
    from .cache import build_cache
    from .config import BuildConfig, GradientConfig, SketchConfig

    settings = _settings()
    store = check_url(args.store or settings.store_url, "--store-url", RapidInError)
    check_url(args.data, "--data-url", RapidInError)
    chosen = given(args, SketchConfig)
    if args.paper and chosen.get("method", "rapidgrad") != "rapidgrad":
        raise RapidInError(f"--paper caches with the paper's RapidGrad: it contradicts --method {chosen['method']}")
    paper = {"method": "rapidgrad"} if args.paper else {}  # over RAPIDIN_SKETCH_METHOD too
    sketch = build(SketchConfig, settings.default_sketch().model_dump() | paper | chosen)
    gradient = build(GradientConfig, given(args, GradientConfig) | _adapter_tensors(args))
    layout = build(BuildConfig, given(args, BuildConfig))
    loaded = _load(args, _model_ref(args), settings)
    manifest = build_cache(
        loaded, args.data, store, fmt=args.format, shard_rows=layout.shard_rows, skip_bad_rows=layout.skip_bad_rows,
        sketch=sketch, gradient=gradient, storage_options=settings.storage_options(store),
        data_storage_options=settings.storage_options(args.data), preconditioners=layout.preconditioners,
    )
    url = f"{store.rstrip('/')}/{manifest.model['name']}/{manifest.model['version']}/{manifest.cache_id}"
    spec = manifest.sketch
    print(f"cache {manifest.cache_id}: {manifest.num_rows} rows, D={spec.d} -> K={spec.config.k} "
          f"({spec.d / spec.config.k:.1f}x), {len(manifest.shards)} shards, "
          f"{manifest.stats.get('truncated', 0)} truncated, {manifest.stats.get('skipped', 0)} skipped")
    print(f"stored at {url}")
    for kind in layout.preconditioners:
        print(f"preconditioner {kind}: stored at {url}/preconditioners/{kind}.safetensors")
    return 0


def _adapter_tensors(args: argparse.Namespace) -> dict:
    chosen = getattr(args, "adapter_tensors", None)
    if args.paper and chosen not in (None, "all"):
        raise RapidInError(f"--paper attributes every adapter tensor: it contradicts --adapter-tensors {chosen}")
    return {"adapter_tensors": "all"} if args.paper else {}


def cmd_attribute(args: argparse.Namespace) -> int:
    """rapidin attribute."""
    from .attribution import Checkpoint, Generation, attribute
    from .config import AttributeConfig

    responses = args.response or []
    if responses and len(responses) != len(args.prompt):
        raise RapidInError(f"--response given {len(responses)} times for {len(args.prompt)} --prompt values")
    if args.open and not args.out:
        raise RapidInError("--open needs --out (the report is written beside the result)")
    config = build(AttributeConfig, given(args, AttributeConfig, rename=ATTRIBUTE_FLAGS), ATTRIBUTE_FLAGS)
    weights = _checkpoint_weights(args)
    settings = _settings()
    store = None if args.cache else check_url(args.store or settings.store_url, "--store-url", RapidInError)
    if args.cache:
        check_url(args.cache, "--cache", RapidInError)
    ref = _model_ref(args)
    checkpoint_refs = _checkpoint_refs(args, ref)
    loaded = _load(args, ref, settings)
    gens = [Generation(prompt=p, response=responses[i] if responses else "", raw_prompt=args.raw_prompt)
            for i, p in enumerate(args.prompt)]
    checkpoints = [Checkpoint(_load(args, r, settings), weight=w, label=r.adapter or r.path)
                   for r, w in zip(checkpoint_refs, weights, strict=True)]
    if checkpoints and store is None:
        store = check_url(settings.store_url, "RAPIDIN_STORE_URL", RapidInError)  # the checkpoints' caches are found there
    result = attribute(loaded, gens, store_url=store, cache_url=args.cache, config=config,
                       storage_options=settings.storage_options(args.cache or store), checkpoints=checkpoints)
    _print_attribution(result)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.to_json())
        out.with_suffix(".parquet").write_bytes(result.to_parquet())
        print(f"result: {out} and {out.with_suffix('.parquet')}")
        if args.open:
            print(f"report: {_write_report(result, out.with_suffix('.html'))}")
    return 0


def _checkpoint_weights(args: argparse.Namespace) -> list[float]:
    """One finite weight per --checkpoint (default 1)."""
    weights = args.checkpoint_weight or [1.0] * len(args.checkpoint)
    if len(weights) != len(args.checkpoint):
        raise RapidInError(f"--checkpoint-weight given {len(weights)} times for {len(args.checkpoint)} --checkpoint values")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise RapidInError(f"--checkpoint-weight {bad[0]}: must be a finite number")
    return weights


def _checkpoint_refs(args: argparse.Namespace, ref) -> list:
    """The --checkpoint model references: the final model's, with the checkpoint as its adapter (or as the model)
    and the version left to the fingerprint."""
    for path in args.checkpoint:
        check_url(path, "--checkpoint", RapidInError)
    return [ref.model_copy(update={"adapter" if ref.adapter else "path": path, "version": None})
            for path in args.checkpoint]


def _write_report(result, path: Path) -> Path:
    try:
        from .report import write_report
    except ImportError:
        raise RapidInError("HTML reports are not available in this installation") from None
    return write_report(result, path)


def _short(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _print_attribution(result, marks: list[bool] | None = None) -> None:
    for g, gen in enumerate(result.generations):
        print(f"\n[{g}] prompt:   {_short(gen.prompt)}\n    response: {_short(gen.response)}")
        for kind, title in (("influential", "most influential (|score|)"), ("helpful", "most helpful"),
                            ("harmful", "most harmful")):
            print(f"    {title}:")
            for hit in getattr(gen, kind):
                flag = (" POISONED" if marks[hit.row] else "         ") if marks else ""
                print(f"      {hit.rank:>3}. row {hit.row:>6} {hit.score:+9.4f}{flag}  {_short(hit.response, 60)}")
    print(f"\nscanned {result.rows_scanned} rows ({result.bytes_scanned / 1e6:.1f} MB) in {result.timings.get('scan', 0):.2f} s")


def cmd_inspect(args: argparse.Namespace) -> int:
    """rapidin inspect."""
    from .settings import Settings
    from .store import CacheStore

    store = CacheStore(args.cache_url, Settings().storage_options(args.cache_url))
    m = store.read_manifest()
    spec = m.sketch
    print(f"cache {m.cache_id} ({'complete' if m.complete else 'INCOMPLETE'}) at {store.url}")
    print(f"  model    {m.model['name']} version {m.model['version']} fingerprint {m.model['fingerprint']}")
    print(f"  data     {m.dataset['url']} ({m.dataset['rows']} rows, {m.dataset['format']}, fp {m.dataset['fingerprint']})")
    print(f"  sketch   {spec.config.method} D={spec.d} K={spec.config.k} λ={spec.config.lam} seed={spec.config.seed} "
          f"{spec.config.dtype} ({spec.d / spec.config.k:.1f}x)")
    print(f"  gradient {m.gradient.model_dump()}; {len(m.layout)} tensors")
    print(f"  stats    {m.stats}; timings {json.dumps({k: round(v, 2) for k, v in m.timings.items()})}")
    bad = 0
    for index in range(m.num_shards):
        expected = m.shard_range(index)
        info = store.committed_shard(index, expected, verify=False)
        ok = info is not None and (args.no_verify or store.committed_shard(index, expected) is not None)
        state = "missing" if info is None else ("ok" if ok else "CORRUPTED")
        bad += state != "ok"
        print(f"  shard {index:>6} rows {m.shard_range(index)} {state}")
    print(f"{m.num_shards - bad}/{m.num_shards} shards healthy")
    return 0 if bad == 0 else 1


def _load_result(path: str):
    from .report import load_attribution

    if "://" not in path and not Path(path).exists():
        raise RapidInError(f"{path}: result file not found")
    try:
        return load_attribution(path)
    except (ValueError, OSError) as exc:
        raise RapidInError(f"{path}: not an attribution result ({str(exc).splitlines()[0][:200]})") from None


def cmd_report(args: argparse.Namespace) -> int:
    """rapidin report."""
    result = _load_result(args.result)
    print(_write_report(result, Path(args.out) if args.out else Path(args.result).with_suffix(".html")))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """rapidin compare."""
    from .report import compare, compare_markdown, render_compare_html

    before, after = _load_result(args.before), _load_result(args.after)
    print(compare_markdown(compare(before, after)))
    if args.out:
        Path(args.out).write_text(render_compare_html(before, after))
        print(f"comparison page: {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """rapidin demo."""
    from .demo import mean_metrics, run_demo
    from .metrics import TOP_LIST_METRICS

    demo = run_demo(args.workdir, rows=args.rows, k=args.k, device=args.device or _settings().device)
    print(f"\nTiny Llama fine-tuned on {len(demo.poisoned)} rows, {sum(demo.poisoned)} of them poisoned "
          f"(trigger 'howdy!' -> science-fiction answer).")
    _print_attribution(demo.attribution, demo.poisoned)
    means = mean_metrics(demo.metrics)
    print("\nfinding the poisoned rows, mean over generations: " + "  ".join(f"{k}={v:.3f}" for k, v in means.items()))
    print(f"  ({TOP_LIST_METRICS})")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in demo.timings.items()))
    print(f"inspect the cache with: rapidin inspect {demo.attribution.cache_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
