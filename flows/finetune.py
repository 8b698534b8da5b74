"""finetune: LoRA or full fine-tune, register a new MLflow model version, emit `rapidin.model.registered`."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from rapidin.data import dataset_fingerprint, load_examples
from rapidin.finetune import FinetuneConfig, finetune, save
from rapidin.models import load_model
from tasks.common import ModelSpec, form_help, settings
from tasks.models import LAYOUT_FILE, REGISTRY_URI, resolve_model
from tasks.publish import emit_model_registered
from tasks.tracking import DATA_URL_TAG, register_model


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
    finetune(loaded, examples, config, progress=False)
    t2 = time.perf_counter()
    out = Path(out_dir)
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
    (out / LAYOUT_FILE).write_text(json.dumps(layout))
    return {"rows": len(examples), "format": fmt, "dataset_fingerprint": dataset_fingerprint(examples, fmt),
            "seconds_load": t1 - t0, "seconds_train": t2 - t1}


@flow(name="finetune", log_prints=True)
@form_help
def finetune_model(
    base: Annotated[ModelSpec, Field(description="The model to start from (a registry URI, a directory or a file).")],
    data_url: Annotated[str, Field(description="Training data (a snapshot URL from ingest_dataset).")],
    register_as: Annotated[str, Field(description="Registered model name in MLflow.")],
    config: Annotated[FinetuneConfig, Field(description="Training options.")] = FinetuneConfig(),
    alias: Annotated[str | None, Field(description="Move this registry alias (e.g. champion) to the new version.")]
    = None,
    embed_base: Annotated[bool, Field(description="LoRA: store the base model's files with the adapter.")] = True,
    device: Annotated[str | None, Field(description="Torch device; None: RAPIDIN_DEVICE.")] = None,
) -> RegisteredVersion:
    """Fine-tune, register the result as a new model version, and announce it (the re-cache trigger listens)."""
    s = settings()
    with tempfile.TemporaryDirectory(prefix="rapidin-ft-") as tmp:
        stats = train(base, data_url, config, device or s.device, tmp, embed_base)
        params = {"base": base.uri, "data_url": data_url, "method": "lora" if config.lora else "full",
                  **{k: v for k, v in config.model_dump().items() if k != "lora"},
                  **({f"lora_{k}": v for k, v in config.lora.model_dump().items()} if config.lora else {})}
        metrics = {"rows": float(stats["rows"]), "seconds_load": stats["seconds_load"],
                   "seconds_train": stats["seconds_train"]}
        version_tags = {DATA_URL_TAG: data_url, "dataset_fingerprint": stats["dataset_fingerprint"],
                        "base": base.uri}
        reg = register_model(tmp, register_as, params, metrics, {"dataset_fingerprint": stats["dataset_fingerprint"]},
                             version_tags, alias)
    emit_model_registered(reg["name"], reg["version"], data_url, reg["run_id"])
    get_run_logger().info("registered %s version %s (MLflow run %s)", reg["name"], reg["version"], reg["link"])
    return RegisteredVersion(name=reg["name"], version=reg["version"], uri=f"models:/{reg['name']}/{reg['version']}",
                             mlflow_run_id=reg["run_id"], mlflow_link=reg["link"])
