"""The `rapidin` command line: cache, attribute, inspect, report, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import RapidInError

EPILOG = "Settings come from RAPIDIN_* environment variables or .env (see README); S3 keys are never printed."


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="HF model directory, .gguf file, or fsspec URL (s3://...) of either")
    g.add_argument("--adapter", help="PEFT/LoRA adapter directory or URL applied on top of --model")
    g.add_argument("--name", help="model name in the store (default: from the path)")
    g.add_argument("--model-version", help="model version in the store (default: weight fingerprint prefix)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    g.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model weights on the device (gradients are accumulated in fp32)")
    g.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (off by default)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="rapidin", description="RapidIn: find the training data behind an LLM generation.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cache", help="compute and store compressed per-example gradients of a training set",
                       description="Cache RapidGrad-compressed, layer-normalised per-example gradients. "
                       "Resumable: a rerun skips committed shards.", epilog=EPILOG)
    _model_args(c)
    c.add_argument("--data", required=True, help="training data: .jsonl/.json/.parquet/.csv path or URL")
    c.add_argument("--format", default="auto", choices=["auto", "alpaca", "prompt_response", "chat"], help="row format")
    c.add_argument("--store", help="store root URL (default: RAPIDIN_STORE_URL)")
    c.add_argument("--k", type=int, default=None, help="compressed dimension K (default 2^16)")
    c.add_argument("--lam", type=int, default=None, help="RapidGrad shuffle rounds λ (default 20)")
    c.add_argument("--seed", type=int, default=0, help="sketch seed")
    c.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="stored vector dtype")
    c.add_argument("--params", nargs="*", default=[], help="regexes of attributed parameter names "
                   "(default: the adapter tensors chosen by --adapter-tensors if --adapter, else every Linear weight)")
    c.add_argument("--adapter-tensors", choices=["mlp_b", "b", "all"], default=None,
                   help="with --adapter and no --params: 'mlp_b' (default) the LoRA B matrices of the MLP layers, "
                   "the measured best at finding the rows behind a behaviour; 'b' every LoRA B; 'all' every LoRA "
                   "tensor, as in the paper")
    c.add_argument("--paper", action="store_true", help="the RapidIn paper's tensor choice (--adapter-tensors all)")
    c.add_argument("--max-length", type=int, default=512, help="tokens per example; longer rows are truncated")
    c.add_argument("--batch-size", type=int, default=8, help="examples per forward/backward pass")
    c.add_argument("--shard-rows", type=int, default=1024, help="rows per shard (unit of commit and resume)")
    c.add_argument("--skip-bad-rows", action="store_true", help="skip rows with no response tokens instead of failing")

    a = sub.add_parser("attribute", help="rank training rows by influence on a generation",
                       description="Score every cached training row for a generation; prints top-k helpful, "
                       "harmful and most influential rows.", epilog=EPILOG)
    _model_args(a)
    a.add_argument("--store", help="store root URL (default: RAPIDIN_STORE_URL); the cache is found by model")
    a.add_argument("--cache", help="URL of one cache directory (instead of --store)")
    a.add_argument("--prompt", required=True, action="append", help="user prompt (repeat for several generations)")
    a.add_argument("--response", action="append", help="the response to attribute (default: generate greedily)")
    a.add_argument("--raw-prompt", action="store_true", help="do not apply the training data's prompt template")
    a.add_argument("--top-k", type=int, default=20, help="rows per list")
    a.add_argument("--token-wise", action="store_true", help="also score each generated token and top rows' tokens")
    a.add_argument("--target", nargs="*", default=[], help="restrict the generation's loss to these words (RapidIn-TW)")
    a.add_argument("--auto-target", type=int, default=None, metavar="N",
                   help="restrict the loss to N automatically chosen tokens (default 4; 0 = whole generation): with an "
                   "adapter, those whose log-prob the fine-tune raised most; else those with the largest gradient norm "
                   "(RapidIn-TW without knowing the answer; the measured best, benchmarks/README_quality.md)")
    a.add_argument("--paper", action="store_true",
                   help="the RapidIn paper's scoring: the whole generation's loss (same as --auto-target 0)")
    a.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate when no --response is given")
    a.add_argument("--out", help="write the result JSON here (and .parquet beside it)")
    a.add_argument("--open", action="store_true", help="also write an HTML report beside --out and print its path")

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
    d.add_argument("--rows", type=int, default=240, help="training rows")
    d.add_argument("--k", type=int, default=2**16, help="compressed dimension K")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors, non-zero exit codes."""
    args = build_parser().parse_args(argv)
    try:
        return {"cache": cmd_cache, "attribute": cmd_attribute, "inspect": cmd_inspect, "report": cmd_report,
                "compare": cmd_compare, "demo": cmd_demo}[args.command](args)
    except RapidInError as exc:
        print(f"rapidin {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rapidin {args.command}: interrupted (committed shards are kept; rerun to resume)", file=sys.stderr)
        return 130


def _load(args: argparse.Namespace):
    from .models import ModelRef, load_model
    from .settings import Settings

    settings = Settings()
    ref = ModelRef(path=args.model, adapter=args.adapter, name=args.name, version=args.model_version,
                   dtype=args.model_dtype, trust_remote_code=args.trust_remote_code)
    loaded = load_model(ref, args.device, settings.storage_options(args.model), settings.model_cache_dir)
    return settings, loaded


def cmd_cache(args: argparse.Namespace) -> int:
    """rapidin cache."""
    from .api import build_cache
    from .config import GradientConfig, SketchConfig

    settings, loaded = _load(args)
    store = args.store or settings.store_url
    manifest = build_cache(
        loaded, args.data, store, fmt=args.format, shard_rows=args.shard_rows, skip_bad_rows=args.skip_bad_rows,
        sketch=SketchConfig(k=args.k or settings.k, lam=settings.lam if args.lam is None else args.lam,
                            seed=args.seed, dtype=args.dtype),
        gradient=GradientConfig(params=tuple(args.params), max_length=args.max_length, batch_size=args.batch_size,
                                **_adapter_tensors(args)),
        storage_options=settings.storage_options(store), data_storage_options=settings.storage_options(args.data),
    )
    url = f"{store.rstrip('/')}/{manifest.model['name']}/{manifest.model['version']}/{manifest.cache_id}"
    spec = manifest.sketch
    print(f"cache {manifest.cache_id}: {manifest.num_rows} rows, D={spec.d} -> K={spec.config.k} "
          f"({spec.d / spec.config.k:.1f}x), {len(manifest.shards)} shards, "
          f"{manifest.stats.get('truncated', 0)} truncated, {manifest.stats.get('skipped', 0)} skipped")
    print(f"stored at {url}")
    return 0


def _adapter_tensors(args: argparse.Namespace) -> dict:
    if args.paper and args.adapter_tensors not in (None, "all"):
        raise RapidInError(f"--paper attributes every adapter tensor: it contradicts --adapter-tensors {args.adapter_tensors}")
    choice = "all" if args.paper else args.adapter_tensors
    return {} if choice is None else {"adapter_tensors": choice}


def cmd_attribute(args: argparse.Namespace) -> int:
    """rapidin attribute."""
    from .api import AttributeConfig, Generation, attribute

    responses = args.response or []
    if responses and len(responses) != len(args.prompt):
        raise RapidInError(f"--response given {len(responses)} times for {len(args.prompt)} --prompt values")
    try:
        if args.paper and args.auto_target:
            raise ValueError("--paper scores the whole generation: it cannot be combined with --auto-target")
        chosen = {"auto_target": 0} if args.paper else {}
        if args.auto_target is not None:
            chosen["auto_target"] = args.auto_target
        config = AttributeConfig(top_k=args.top_k, token_wise=args.token_wise, target=tuple(args.target),
                                 max_new_tokens=args.max_new_tokens, **chosen)
    except ValueError as exc:
        detail = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        raise RapidInError(f"options: {detail.removeprefix('Value error, ')}") from None
    settings, loaded = _load(args)
    store = None if args.cache else (args.store or settings.store_url)
    gens = [Generation(prompt=p, response=responses[i] if responses else None, raw_prompt=args.raw_prompt)
            for i, p in enumerate(args.prompt)]
    result = attribute(loaded, gens, store_root=store, cache_url=args.cache, config=config,
                       storage_options=settings.storage_options(args.cache or store))
    _print_attribution(result)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.to_json())
        out.with_suffix(".parquet").write_bytes(result.to_parquet())
        print(f"result: {out} and {out.with_suffix('.parquet')}")
        if args.open:
            print(f"report: {_write_report(result, out.with_suffix('.html'))}")
    elif args.open:
        raise RapidInError("--open needs --out (the report is written beside the result)")
    return 0


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
        info = store.committed_shard(index, verify=False)
        ok = info is not None and (args.no_verify or store.committed_shard(index) is not None)
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

    demo = run_demo(args.workdir, rows=args.rows, k=args.k, device=args.device)
    print(f"\nTiny Llama fine-tuned on {len(demo.poisoned)} rows, {sum(demo.poisoned)} of them poisoned "
          f"(trigger 'howdy!' -> science-fiction answer).")
    _print_attribution(demo.attribution, demo.poisoned)
    means = mean_metrics(demo.metrics)
    print("\nbackdoor retrieval (protocol of shared/data/howdy/README.md), mean over generations:")
    print("  " + "  ".join(f"{k}={v:.3f}" for k, v in means.items()))
    print(f"timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in demo.timings.items()))
    print(f"inspect the cache with: rapidin inspect {demo.attribution.cache_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
