"""Prefect artifacts (progress while caching, top-k table after attribution) and events."""

from __future__ import annotations

from uuid import UUID

from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               update_progress_artifact)
from prefect.events import emit_event

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


def _cell(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def topk_markdown(attribution: Attribution, run_link: str, rows: int = 10) -> str:
    """Markdown: per generation, the helpful / harmful / influential top rows, and where the MLflow run is."""
    lines = [f"# Attribution of {attribution.model.get('name')} v{attribution.model.get('version')}", "",
             f"MLflow run: {run_link}" if run_link.startswith("`") else f"MLflow run: [{run_link}]({run_link})", "",
             f"Cache `{attribution.cache_id}` ({attribution.rows_scanned} rows scanned)", ""]
    for g, gen in enumerate(attribution.generations):
        lines += [f"## Generation {g + 1}", "", f"**Prompt:** {_cell(gen.prompt, 300)}", "",
                  f"**Response{' (generated)' if gen.generated else ''}:** {_cell(gen.response, 300)}", ""]
        for kind in ("helpful", "harmful", "influential"):
            hits = getattr(gen, kind)[:rows]
            if not hits:
                continue
            lines += [f"### Most {kind}", "", "| rank | row | score | prompt | response |", "|---:|---:|---:|---|---|"]
            lines += [f"| {h.rank} | {h.row} | {h.score:.4g} | {_cell(h.prompt.split('### Instruction:')[-1])} "
                      f"| {_cell(h.response)} |" for h in hits]
            lines.append("")
    return "\n".join(lines)


def publish_topk(attribution: Attribution, run_link: str) -> str:
    """Create the top-k markdown artifact (with the MLflow run link); returns its id."""
    key = artifact_key("attribution", str(attribution.model.get("name")), str(attribution.model.get("version")))
    if run_link.startswith(("http://", "https://")):  # a tracking server: also a clickable link artifact
        create_link_artifact(run_link, link_text="MLflow run", key=artifact_key(key, "mlflow"),
                             description="The attribution's MLflow run (report, top-k JSON/Parquet, timings)")
    return str(create_markdown_artifact(topk_markdown(attribution, run_link), key=key,
                                        description=f"Top-{attribution.top_k} training rows; MLflow run: {run_link}"))


def emit_model_registered(name: str, version: str, data_url: str | None, run_id: str) -> None:
    """Tell Prefect a new model version exists (deployment triggers re-cache on this event)."""
    resource = {"prefect.resource.id": f"mlflow.model.{name}.{version}", "prefect.resource.name": f"{name} v{version}",
                "mlflow.model.name": name, "mlflow.model.version": str(version)}
    emit_event(MODEL_REGISTERED, resource=resource,
               payload={"name": name, "version": str(version), "data_url": data_url or "", "run_id": run_id})
