"""Fine-tune task: train a fresh copy of the base model and save it as a registrable directory."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from rapidin.data import dataset_fingerprint, load_examples
from rapidin.finetune import FinetuneConfig, finetune, save
from rapidin.models import load_model

from .common import ModelSpec, settings
from .models import LAYOUT_FILE, REGISTRY_URI, resolve_model


class RegisteredVersion(BaseModel):
    """A model version this flow registered."""

    name: str
    version: str
    uri: str
    mlflow_run_id: str
    mlflow_link: str


@task(name="train", cache_policy=NO_CACHE)
def train(base: ModelSpec, data_url: str, config: FinetuneConfig, device: str, out_dir: str,
          embed_base: bool) -> dict:
    """Fine-tune a fresh copy of the base model and save the result as a registrable directory."""
    s = settings()
    resolved = resolve_model.fn(base)
    t0 = time.perf_counter()
    loaded = load_model(resolved.ref, device, s.storage_options(resolved.ref.path), s.model_cache_dir)
    examples, fmt = load_examples(data_url, "auto", loaded.tokenizer, s.storage_options(data_url))
    t1 = time.perf_counter()
    out = Path(out_dir)

    def keep(epoch: int, model) -> None:  # the adapter (LoRA) or the whole model, for TracIn attributions
        if epoch in config.checkpoint_epochs():
            model.save_pretrained(out / "checkpoints" / f"epoch-{epoch}")
            loaded.tokenizer.save_pretrained(out / "checkpoints" / f"epoch-{epoch}")

    finetune(loaded, examples, config, progress=False, on_epoch=keep)
    t2 = time.perf_counter()
    if config.lora is None:
        save(loaded, out)
        layout = {"base": ".", "adapter": None}
    else:
        save(loaded, out / "adapter")
        base_ref = resolved.ref
        if base_ref.adapter:
            raise ValueError("fine-tuning a LoRA on top of an adapter model is not supported; merge it first")
        if embed_base and not REGISTRY_URI.match(base.uri):
            shutil.copytree(base_ref.path, out / "base", dirs_exist_ok=True)
            layout = {"base": "base", "adapter": "adapter"}
        else:
            layout = {"base": base.uri if REGISTRY_URI.match(base.uri) else base_ref.path, "adapter": "adapter"}
    rates = config.epoch_learning_rates(len(examples))
    layout["checkpoints"] = {f"epoch-{e}": {"dir": f"checkpoints/epoch-{e}", "lr": rates[e]}
                             for e in config.checkpoint_epochs()}
    layout["final_lr"] = rates[max(rates)]
    (out / LAYOUT_FILE).write_text(json.dumps(layout))
    return {"checkpoints": list(layout["checkpoints"]), "rows": len(examples), "format": fmt,
            "dataset_fingerprint": dataset_fingerprint(examples, fmt),
            "seconds_load": t1 - t0, "seconds_train": t2 - t1}
