"""Shared task plumbing: settings, typed job descriptions passed between flows and workers, naming."""

from __future__ import annotations

import inspect
import re
import typing
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from rapidin.config import AttributeConfig, GradientConfig, SketchConfig, default_of, field_of
from rapidin.data import DataFormat
from rapidin.models import ModelDtype
from rapidin.settings import Settings

Executor = Literal["local", "deployment"]
"""Where shard groups run: in this process, or as runs of a shard deployment on the GPU pool."""
ScanExecutor = Literal["auto", "local", "deployment"]
"""As Executor, plus auto: fan a scan out only when the cache is large enough to pay for the dispatch
(tasks.dispatch.choose_scan_executor)."""


def form_help(fn):
    """Give a flow's run form its help text from each parameter's `Annotated[T, Field(description=...)]`: Prefect
    reads parameter help from the docstring's Args section, so that section is generated here, and each
    description (with its bounds, which Prefect enforces from the annotation) is written once."""
    hints = typing.get_type_hints(fn, include_extras=True)
    lines = []
    for name in inspect.signature(fn).parameters:
        found = [m.description for m in getattr(hints.get(name), "__metadata__", ())
                 if isinstance(m, FieldInfo) and m.description]
        if found:
            lines.append(f"    {name}: {' '.join(found[0].split())}")
    if lines:
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "\n".join(lines) + "\n"
    return fn


def settings() -> Settings:
    """The settings of this process (environment and .env); read fresh so workers see their own env."""
    return Settings()


class ModelSpec(BaseModel):
    """Which model to use: a registry URI, a Hugging Face directory, a .gguf file or an fsspec URL."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(description="models:/name/version, models:/name@alias, a HF model dir, a .gguf file, or s3://...")
    adapter: str = Field("", description="A PEFT/LoRA adapter dir or URL on top; empty: none (models:/ URIs carry "
                         "their own).")
    name: str = Field("", description="The model's name in the cache store; empty: from the URI (models:/ URIs give "
                      "the registered name).")
    version: str = Field("", description="The model's version in the cache store; empty: from the URI (models:/ URIs "
                         "give the version), else the weights' fingerprint.")
    dtype: ModelDtype = Field("float32", description="Weights dtype on the device.")
    checkpoint: str = Field("", description="A checkpoint the fine-tune of a registered version kept (e.g. epoch-2) "
                            "instead of the final model; empty: the final model.")

    @classmethod
    def registry(cls, name: str, version: str | int, checkpoint: str = "") -> ModelSpec:
        """The spec of a registered model version (or of one of its kept checkpoints)."""
        return cls(uri=f"models:/{name}/{version}", checkpoint=checkpoint)


class ScanPlacement(BaseModel):
    """An attribution's deployment plumbing: which cache it reads and where its scan runs (the defaults suit most
    runs; a deployment may set them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    executor: ScanExecutor = Field("auto", description="Where the scan runs: auto = fanned out only when the cache is "
                                   "large enough to pay for the dispatch; local = in this flow run; deployment = runs "
                                   "of the scan deployment on the GPU pool, one per queue.")
    groups: int = Field(0, ge=0, description="Shard groups; 0: one per GPU queue with the deployment executor, else 1.")
    cache_url: str = Field("", description="A cache URL; empty: the registered version's cache (its rapidin.cache_url "
                           "tag), else the model's cache under the store.")
    store_url: str = Field("", description="Cache store root; empty: RAPIDIN_STORE_URL of the deployment.")
    device: str = Field("", description="Torch device; empty: RAPIDIN_DEVICE of whoever computes.")
    shard_deployment: str = Field("scan-shards/gpu", description="The scan deployment the deployment executor runs.")


class CacheJob(BaseModel):
    """Everything a worker needs to build shards of one cache (no secrets: workers read their own settings)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSpec
    data_url: str
    store_url: str
    sketch: SketchConfig
    gradient: GradientConfig
    shard_rows: int = Field(ge=1)
    fmt: DataFormat = "auto"
    skip_bad_rows: bool = False
    device: str = Field("", description="Torch device; empty: the worker's RAPIDIN_DEVICE.")
    cache_id: str = Field("", description="Expected cache id; a worker that plans another one refuses.")


class ShardGroup(BaseModel):
    """One unit of cache work: some shards of a cache, and where to report the group's statistics."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: CacheJob
    group: int = Field(ge=0)
    shards: list[int]
    report_url: str = Field(description="Directory URL where the group writes group-NNNN.json.")


class ScanGroup(BaseModel):
    """One unit of retrieval work: scan some shards of a cache with the queries stored at queries_url."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_url: str
    queries_url: str = Field(description="Directory URL holding queries.safetensors.")
    group: int = Field(ge=0)
    shards: list[int]
    top_k: int = Field(ge=1)
    verify: Annotated[bool, field_of(AttributeConfig, "verify")] = default_of(AttributeConfig, "verify")
    device: str = Field("", description="Torch device; empty: the worker's RAPIDIN_DEVICE.")


def split_groups(indices: list[int], groups: int) -> list[list[int]]:
    """Split shard indices into at most `groups` contiguous, non-empty, near-equal groups."""
    groups = max(1, min(groups, len(indices)))
    size, extra = divmod(len(indices), groups)
    out, start = [], 0
    for g in range(groups):
        stop = start + size + (1 if g < extra else 0)
        out.append(indices[start:stop])
        start = stop
    return [g for g in out if g]


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")[:100]


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a storage dtype name."""
    return {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]


def worth_retrying(task: object, task_run: object, state: object) -> bool:
    """Prefect retry condition: retry I/O and unexpected failures, not rapidin's deterministic errors
    (a bad row or an impossible sketch fails the same way every time; storage errors may pass)."""
    from rapidin.errors import RapidInError, StorageError

    exc = getattr(state, "data", None)
    if isinstance(exc, RapidInError) and not isinstance(exc, StorageError):
        return False
    return True


IO_RETRIES = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": worth_retrying}
"""Task options for I/O (store, registry, tracking): two retries unless the error is deterministic."""
WORK_RETRIES = {"retries": 2, "retry_delay_seconds": 1, "retry_condition_fn": worth_retrying}
"""Task options for shard work: a retry resumes after the shards already committed."""
