"""EleutherAI bergson (a peer, installed by `make peers` beside the venv) on this project's tokenised rows: per-example
gradients of the given LoRA modules collected by bergson's own hooks (InMemoryCollector + CollectorComputer), with
its per-module random projection (projection_dim x projection_dim per module; 0: the full gradient, no projection).
The loss is the mean over the labelled positions, as rapidin's. Used by the quality benchmark (howdy.py --bergson)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from kronfluence_task import example


def module_names(peft_model, weights: list[str]) -> list[str]:
    """bergson's names (relative to the PEFT model's base_model) of the modules whose `.weight` is listed."""
    wanted = set(weights)
    names = [name for name, _ in peft_model.base_model.named_modules() if f"base_model.{name}.weight" in wanted]
    if len(names) != len(wanted):
        raise SystemExit(f"bergson: found {len(names)} of the {len(wanted)} attributed modules")
    return names


def collect(peft_model, items, targets: list[list[int] | None], names: list[str], projection_dim: int,
            batch_size: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """[len(items), D'] gradients (modules concatenated in `names` order) and the wall/CPU seconds of collecting."""
    from bergson.collector.collector import CollectorComputer
    from bergson.collector.in_memory_collector import InMemoryCollector
    from bergson.config.config import IndexConfig
    from bergson.gradients import GradientProcessor
    from datasets import Dataset

    rows = [example(item, t) for item, t in zip(items, targets, strict=True)]
    data = Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows],
                              "labels": [r["labels"].tolist() for r in rows]})
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # length-sorted batches, as ours
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = IndexConfig(run_path=str(Path(tmp) / "run"), projection_dim=projection_dim, projection_seed=seed,
                          loss_reduction="mean")
        cfg.partial_run_path.mkdir(parents=True)
        processor = GradientProcessor(projection_dim=projection_dim or None, projection_seed=seed)
        collector = InMemoryCollector(model=peft_model.base_model, cfg=cfg, processor=processor, data=data,
                                      target_modules=set(names))
        wall, cpu = time.perf_counter(), time.process_time()
        CollectorComputer(model=peft_model, data=data, collector=collector, batches=batches,
                          cfg=cfg).run_with_collector_hooks(desc=f"bergson gradients (projection_dim {projection_dim})")
        cost = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu, "rows": len(rows)}
    grads = torch.cat([collector.gradients[n].float().reshape(len(rows), -1) for n in names], dim=1)
    return grads, cost
