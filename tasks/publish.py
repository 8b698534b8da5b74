"""Prefect artifacts (progress while caching, top-k table after attribution) and events."""

from __future__ import annotations

from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.events import emit_event

from rapidin.report import markdown_summary
from rapidin.results import Attribution

from .common import artifact_key

MODEL_REGISTERED = "rapidin.model.registered"


def start_progress(model: str, version: str, cache_id: str, done: int, total: int) -> str:
    """Create the caching progress artifact; returns its id."""
    key = artifact_key("cache-progress", model, version)
    return str(create_progress_artifact(100.0 * done / max(total, 1), key=key,
                                        description=f"Gradient cache {cache_id} of {model} v{version}: shards committed"))


def set_progress(artifact_id: str, done: int, total: int) -> None:
    """Move the progress artifact to done/total."""
    update_progress_artifact(UUID(artifact_id), 100.0 * done / max(total, 1))


def publish_topk(attribution: Attribution, run_link: str) -> str:
    """Create the top-k markdown artifact (with the MLflow run link); returns its id."""
    key = artifact_key("attribution", str(attribution.model.get("name")), str(attribution.model.get("version")))
    if run_link.startswith(("http://", "https://")):  # a tracking server: also a clickable link artifact
        create_link_artifact(run_link, link_text="MLflow run", key=artifact_key(key, "mlflow"),
                             description="The attribution's MLflow run (report, top-k JSON/Parquet, timings)")
    return str(create_markdown_artifact(markdown_summary(attribution, links={"MLflow run": run_link}), key=key,
                                        description=f"Top-{attribution.top_k} training rows; MLflow run: {run_link}"))


def emit_model_registered(name: str, version: str, data_url: str | None, run_id: str) -> None:
    """Tell Prefect a new model version exists (deployment triggers re-cache on this event)."""
    resource = {"prefect.resource.id": f"mlflow.model.{name}.{version}", "prefect.resource.name": f"{name} v{version}",
                "mlflow.model.name": name, "mlflow.model.version": str(version)}
    emit_event(MODEL_REGISTERED, resource=resource,
               payload={"name": name, "version": str(version), "data_url": data_url or "", "run_id": run_id})
