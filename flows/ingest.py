"""ingest_dataset: validate a training data file and write a content-addressed snapshot to the data store."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from pydantic import Field

from rapidin.data import DataFormat
from tasks.common import artifact_key
from tasks.ingest import DatasetSnapshot, ingest_snapshot


@flow(name="ingest-dataset", log_prints=True)
def ingest_dataset(
    source: str = Field(description="Data file URL or path: .jsonl, .json, .parquet or .csv (Alpaca, prompt/response, chat)."),
    name: str | None = Field(None, description="Data set name in the store; None: from the file name."),
    fmt: DataFormat = "auto",
    skip_bad_rows: bool = Field(False, description="Skip and count bad rows instead of failing on the first."),
    data_root: str | None = Field(None, description="Snapshot root; None: RAPIDIN_DATA_URL."),
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
