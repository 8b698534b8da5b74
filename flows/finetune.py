"""finetune: LoRA or full fine-tune, register a new MLflow model version, emit `rapidin.model.registered`."""

from __future__ import annotations

import tempfile
from typing import Annotated

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import Field

from rapidin.finetune import FinetuneConfig
from tasks.common import ModelSpec, form_help, settings
from tasks.finetune import RegisteredVersion, train
from tasks.publish import emit_model_registered
from tasks.tracking import CHECKPOINTS_TAG, DATA_URL_TAG, register_model


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
                        "base": base.uri, CHECKPOINTS_TAG: ",".join(stats["checkpoints"])}
        reg = register_model(tmp, register_as, params, metrics, {"dataset_fingerprint": stats["dataset_fingerprint"]},
                             version_tags, alias)
    emit_model_registered(reg["name"], reg["version"], data_url, reg["run_id"])
    get_run_logger().info("registered %s version %s (MLflow run %s)", reg["name"], reg["version"], reg["link"])
    return RegisteredVersion(name=reg["name"], version=reg["version"], uri=f"models:/{reg['name']}/{reg['version']}",
                             mlflow_run_id=reg["run_id"], mlflow_link=reg["link"])
