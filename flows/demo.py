"""demo: the whole story on the embedded defaults (Prefect's ephemeral API, MLflow on sqlite, local store).

ingest the toy data -> build a tiny Llama -> fine-tune it and register version 1 -> cache version 1's
gradients -> attribute a triggered generation -> print the top-k and where to look.
Run it with `python -m flows.demo` (add --help for options).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated

from prefect import flow
from pydantic import BaseModel, Field

from rapidin import toy
from rapidin.attribution import Generation
from rapidin.config import AttributeConfig, GradientConfig, SketchConfig, field_of
from rapidin.data import instruction_of
from rapidin.finetune import FinetuneConfig
from rapidin.metrics import TOP_LIST_METRICS, top_list_metrics
from rapidin.results import Attribution
from tasks.common import ModelSpec, ScanPlacement, form_help, settings
from tasks.demo import toy_world
from tasks.finetune import RegisteredVersion
from tasks.tracking import public_uri

from .attribute import attribute
from .cache import CacheSummary, cache_gradients
from .finetune import finetune_model
from .ingest import ingest_dataset


class DemoResult(BaseModel):
    """Everything the demo made."""

    data_url: str
    registered: RegisteredVersion
    cache: CacheSummary
    attribution: Attribution


def explain(result: DemoResult, top: int = 5) -> str:
    """The text the demo prints: the top-k rows and how to open the UIs."""
    s = settings()
    lines = [f"Registered {result.registered.name} v{result.registered.version}; cache {result.cache.cache_url}"]
    if result.attribution.checkpoints:
        lines.append("Scores summed over the checkpoints its fine-tune kept (TracIn): "
                     + ", ".join(c["label"] for c in result.attribution.checkpoints))
    lines.append("")
    poisoned = lambda hit: toy.TRIGGER in hit.prompt  # noqa: E731
    for gen in result.attribution.generations:
        lines += [f"Generation: {gen.prompt!r}", f"  response: {gen.response!r}"]
        for kind in ("influential", "helpful", "harmful"):
            lines.append(f"  most {kind} training rows{' (|score|: the default answer)' if kind == 'influential' else ''}:")
            for hit in getattr(gen, kind)[:top]:
                lines.append(f"    #{hit.rank} row {hit.row:4d} score {hit.score:+.4g}  {instruction_of(hit.prompt)[:45]!r} -> "
                             f"{hit.response[:45]!r}{'  POISONED' if poisoned(hit) else ''}")
        m = top_list_metrics([poisoned(h) for h in gen.influential[:top]])
        lines.append("  finding the poisoned rows: " + "  ".join(f"{k}={v:.3f}" for k, v in m.items()))
        lines.append(f"  ({TOP_LIST_METRICS})")
    uri = public_uri(s.mlflow_tracking_uri)
    bin_dir = Path(sys.executable).parent
    lines += ["", "Review it: `make ui` opens both UIs on this data (Ctrl-C stops them), or run",
              f"  MLflow UI:  {bin_dir}/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
              f"   (http://127.0.0.1:5000, experiment '{s.mlflow_experiment}')"
              if not uri.startswith("http") else f"  MLflow UI:  {uri}",
              f"  Prefect UI: {bin_dir}/prefect server start --host 127.0.0.1"
              "   (http://127.0.0.1:4200: flow runs, artifacts, progress)"]
    return "\n".join(lines)


@flow(name="demo", log_prints=True)
@form_help
def demo(
    workdir: Annotated[str, Field(description="Where the toy data and base model are written.")] = ".rapidin/demo",
    model_name: Annotated[str, Field(description="Registered model name.")] = "rapidin-demo-tiny",
    rows: Annotated[int, Field(ge=8, le=100_000, description="Toy training rows.")] = 240,
    epochs: Annotated[float, Field(gt=0, le=1000, description="Fine-tune epochs (the backdoor needs a few dozen).")]
    = 30.0,
    k: Annotated[int, field_of(SketchConfig, "k")] = 2**12,
    top_k: Annotated[int, field_of(AttributeConfig, "top_k")] = 5,
    seed: Annotated[int, field_of(SketchConfig, "seed")] = 0,
    device: Annotated[str | None, Field(description="Torch device; None: RAPIDIN_DEVICE.")] = None,
) -> DemoResult:
    """Ingest -> fine-tune + register v1 -> cache -> attribute a triggered query -> print the top-k."""
    data_path, base_dir = toy_world(workdir, rows, seed)
    snap = ingest_dataset(source=data_path, name="toy")
    reg = finetune_model(base=ModelSpec(uri=base_dir), data_url=snap.url, register_as=model_name,
                         config=FinetuneConfig(epochs=epochs, lr=3e-3, seed=seed), alias="champion", device=device)
    cache = cache_gradients(model=ModelSpec(uri=reg.uri), data_url=snap.url, sketch=SketchConfig(k=k, seed=seed),
                            gradient=GradientConfig(max_length=128), shard_rows=64, device=device)
    result = attribute(model=ModelSpec(uri=f"models:/{model_name}@champion"),
                       generations=[Generation(prompt=toy.demo_queries()[0])],
                       config=AttributeConfig(top_k=top_k),
                       advanced=ScanPlacement(device=device or ""))
    out = DemoResult(data_url=snap.url, registered=reg, cache=cache, attribution=result)
    print(explain(out, top_k))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.demo [--rows N] [--epochs E] [--k K]`."""
    p = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=".rapidin/demo")
    p.add_argument("--rows", type=int, default=240)
    p.add_argument("--epochs", type=float, default=30.0)
    p.add_argument("--k", type=int, default=2**12)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    api = settings().prefect_api_url  # RAPIDIN_PREFECT_API_URL: run against a Prefect server instead of the ephemeral API
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api} if api else {}):
        demo(workdir=a.workdir, rows=a.rows, epochs=a.epochs, k=a.k, top_k=a.top_k, device=a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
