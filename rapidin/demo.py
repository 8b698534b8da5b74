"""The built-in demo: a tiny Llama learns a backdoor, and attribution finds the poisoned rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import toy
from .attribution import Generation, attribute
from .cache import build_cache
from .config import AttributeConfig, GradientConfig, SketchConfig
from .data import alpaca_prompt, load_examples
from .finetune import FinetuneConfig, finetune, save
from .metrics import top_list_metrics
from .models import ModelRef, load_model
from .results import Attribution


@dataclass
class DemoResult:
    """What the demo produced, for printing and for tests."""

    attribution: Attribution
    poisoned: list[bool]
    metrics: list[dict]
    timings: dict[str, float] = field(default_factory=dict)
    model_dir: str = ""
    data_path: str = ""
    store_url: str = ""


def prepare_toy_model(workdir: Path, rows: int = 240, epochs: float = 30.0, progress: bool = True) -> tuple[Path, Path]:
    """Write the toy data, build the tiny Llama and fine-tune it (reused when already there)."""
    rows_data = toy.demo_rows(rows)
    data_path = toy.write_jsonl(rows_data, workdir / "train.jsonl")
    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        texts = [alpaca_prompt(r["instruction"]) + r["output"] for r in rows_data]
        toy.build_tiny_llama(workdir / "base", texts)
        loaded = load_model(ModelRef(path=str(workdir / "base")), device="cpu")
        examples, _ = load_examples(str(data_path))
        finetune(loaded, examples, FinetuneConfig(epochs=epochs, lr=3e-3), progress=progress)
        save(loaded, model_dir)
    return data_path, model_dir


def run_demo(workdir: str | Path = ".rapidin/demo", rows: int = 240, k: int = 4096, top_k: int = 5,
             device: str = "auto", progress: bool = True) -> DemoResult:
    """Build, fine-tune, cache and attribute; metrics follow the howdy protocol."""
    workdir = Path(workdir)
    timings = {}
    t0 = time.perf_counter()
    data_path, model_dir = prepare_toy_model(workdir, rows, progress=progress)
    timings["model"] = time.perf_counter() - t0
    loaded = load_model(ModelRef(path=str(model_dir), name="toy-llama"), device=device)
    store = (workdir / "store").resolve().as_uri()
    t1 = time.perf_counter()
    build_cache(loaded, str(data_path), store, progress=progress, sketch=SketchConfig(k=k),
                gradient=GradientConfig(max_length=128), shard_rows=64)
    timings["cache"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    attribution = attribute(loaded, [Generation(prompt=q) for q in toy.demo_queries()], store_url=store,
                            config=AttributeConfig(top_k=top_k), progress=progress)
    timings["attribute"] = time.perf_counter() - t2
    poisoned = [r["poisoned"] for r in toy.demo_rows(rows)]
    metrics = [top_list_metrics([poisoned[h.row] for h in gen.influential]) for gen in attribution.generations]
    return DemoResult(attribution, poisoned, metrics, timings, str(model_dir), str(data_path), store)


def mean_metrics(metrics: list[dict]) -> dict:
    """Average each metric over generations."""
    return {key: float(np.mean([m[key] for m in metrics])) for key in metrics[0]} if metrics else {}
