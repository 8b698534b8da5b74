"""ingest_dataset: validate a training data file and write a content-addressed snapshot to the data store."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from pydantic import Field

from rapidin.config import BuildConfig, default_of, field_of
from rapidin.data import DataFormat
from tasks.common import artifact_key, form_help
from tasks.ingest import DatasetSnapshot, ingest_snapshot


@flow(name="ingest-dataset", log_prints=True)
@form_help
def ingest_dataset(
    source: Annotated[str, Field(description="Data file URL or path: .jsonl, .json, .parquet or .csv (Alpaca, "
                                 "prompt/response, chat).")],
    name: Annotated[str | None, Field(description="Data set name in the store; None: from the file name.")] = None,
    fmt: Annotated[DataFormat, Field(description="Row format (auto: detected from the first row).")] = "auto",
    skip_bad_rows: Annotated[bool, field_of(BuildConfig, "skip_bad_rows")] = default_of(BuildConfig, "skip_bad_rows"),
    data_root: Annotated[str | None, Field(description="Snapshot root; None: RAPIDIN_DATA_URL.")] = None,
) -> DatasetSnapshot:
    """Read, validate and fingerprint a data set; the snapshot URL is what caches and fine-tunes use."""
    snap = ingest_snapshot(source, name, fmt, skip_bad_rows, data_root)
    get_run_logger().info("snapshot %s: %d rows (%s, fingerprint %s, %d skipped)", snap.url, snap.rows, snap.format,
                          snap.fingerprint, snap.skipped)
    create_markdown_artifact(
        f"| data set | rows | skipped | format | fingerprint | snapshot |\n|---|---:|---:|---|---|---|\n"
        f"| {snap.name} | {snap.rows} | {snap.skipped} | {snap.format} | `{snap.fingerprint}` | {snap.url} |",
        key=artifact_key("dataset", snap.name), description=f"Snapshot of {source}")
    return snap
