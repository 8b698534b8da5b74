"""Ingest: read and validate a training data file, fingerprint it, write a JSONL snapshot to the data store."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta

import fsspec
from prefect import task
from pydantic import BaseModel, ConfigDict

from rapidin.data import DataFormat, dataset_fingerprint, detect_format, read_rows, to_example
from rapidin.errors import DataError
from rapidin.store import CacheStore

from .common import IO_RETRIES, settings


class DatasetSnapshot(BaseModel):
    """An immutable, content-addressed copy of a data set in the data store."""

    model_config = ConfigDict(frozen=True)

    url: str
    source: str
    name: str
    fingerprint: str
    format: str
    rows: int
    skipped: int = 0


def _validate(url: str, rows: list[tuple[int, dict]], fmt: DataFormat, skip_bad_rows: bool) -> tuple[list[dict], list, int]:
    """Rows that parse as examples of the format (bad ones raise, or are skipped and counted)."""
    kept, examples, skipped = [], [], 0
    for line, row in rows:
        try:
            if fmt == "chat":
                messages = row.get("messages")
                if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
                    raise DataError(f"{url}:{line}: 'messages' must be a list ending with an assistant message")
                example = None
            else:
                example = to_example(url, line, row, fmt, None, index=len(kept))
                if not example.response.strip():
                    raise DataError(f"{url}:{line}: response is empty")
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        kept.append(row)
        examples.append(example)
    if not kept:
        raise DataError(f"{url}: no valid rows")
    return kept, examples, skipped


def snapshot(source: str, name: str | None = None, fmt: DataFormat = "auto", skip_bad_rows: bool = False,
             data_root: str | None = None) -> DatasetSnapshot:
    """Read, validate and fingerprint `source`; write {data_root}/{name}/{fingerprint}.jsonl unless it exists."""
    s = settings()
    rows = read_rows(source, s.storage_options(source))
    fmt = detect_format(rows[0][1]) if fmt == "auto" else fmt
    if fmt == "auto":
        raise DataError(f"{source}:{rows[0][0]}: cannot tell the format (need instruction/output, prompt/response or messages)")
    kept, examples, skipped = _validate(source, rows, fmt, skip_bad_rows)
    lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in kept).encode()
    if fmt == "chat":  # chat templating needs the model's tokenizer: fingerprint the normalised rows instead
        fingerprint = hashlib.sha256(fmt.encode() + lines).hexdigest()[:16]
    else:
        fingerprint = dataset_fingerprint(examples, fmt)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name or source.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]) or "data"
    root = (data_root or s.data_url).rstrip("/")
    store = CacheStore(f"{root}/{name}", s.storage_options(root))
    file = f"{fingerprint}.jsonl"
    if not store.exists(file):
        store.write_bytes(file, lines)
    return DatasetSnapshot(url=f"{store.url}/{file}", source=source, name=name, fingerprint=fingerprint,
                           format=fmt, rows=len(kept), skipped=skipped)


def _source_key(context, parameters: dict) -> str | None:
    """Cache key: the source's identity on its filesystem (size, mtime or ETag) plus the options."""
    source = parameters["source"]
    try:
        fs, path = fsspec.core.url_to_fs(source, **settings().storage_options(source))
        info = fs.info(path)
    except (OSError, ValueError):
        return None  # unknown source: no caching, the task reports the error
    stamp = {k: str(info.get(k)) for k in ("size", "mtime", "ETag", "LastModified", "created") if info.get(k) is not None}
    opts = {k: parameters.get(k) for k in ("name", "fmt", "skip_bad_rows", "data_root")}
    payload = json.dumps([source, stamp, opts, settings().data_url], sort_keys=True, default=str)
    return "ingest-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


@task(name="ingest-snapshot", **IO_RETRIES, cache_key_fn=_source_key, persist_result=True,
      result_serializer="json", cache_expiration=timedelta(days=1))
def ingest_snapshot(source: str, name: str | None = None, fmt: DataFormat = "auto", skip_bad_rows: bool = False,
                    data_root: str | None = None) -> DatasetSnapshot:
    """Snapshot a data file (cached on the source's identity: an unchanged file is not re-read)."""
    return snapshot(source, name, fmt, skip_bad_rows, data_root)

