"""Model resolution (MLflow registry URIs included) and a per-process memo of loaded models."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from rapidin.errors import ModelError
from rapidin.models import LoadedModel, ModelRef, load_model
from rapidin.settings import Settings

from .common import IO_RETRIES, ModelSpec, settings

REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))/?$")
LAYOUT_FILE = "rapidin_model.json"
"""Written next to registered model files: {"base": dir-or-URI, "adapter": dir-or-null}."""


LOGGED_MODEL_TAG = "rapidin.logged_model_id"


class RegistryInfo(BaseModel):
    """Where a registered model version came from."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    alias: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = {}

    @property
    def model_id(self) -> str | None:
        """The MLflow logged model this version promotes (runs that use the version name it as their input)."""
        return self.tags.get(LOGGED_MODEL_TAG)


class ResolvedModel(BaseModel):
    """A ModelRef ready to load, plus the registry version it came from (if any)."""

    model_config = ConfigDict(frozen=True)

    ref: ModelRef
    registry: RegistryInfo | None = None
    checkpoint: str = ""  # set: this is a kept checkpoint of the registry version, not its final model
    checkpoints: dict[str, float] = {}  # the version's kept checkpoints and their learning rates (TracIn weights)
    final_lr: float | None = None  # the learning rate of the version's last epoch

    def pinned(self) -> ModelSpec:
        """A spec that resolves to exactly this model again (aliases replaced by the version number)."""
        if self.registry:
            return ModelSpec(uri=f"models:/{self.registry.name}/{self.registry.version}", dtype=self.ref.dtype,
                             checkpoint=self.checkpoint)
        return ModelSpec(uri=self.ref.path, adapter=self.ref.adapter or "", name=self.ref.name or "",
                         version=self.ref.version or "", dtype=self.ref.dtype)


def mlflow_client(s: Settings):
    """An MLflow client for the configured tracking (and registry) URI."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=s.mlflow_tracking_uri, registry_uri=s.mlflow_tracking_uri)


def resolve(spec: ModelSpec, s: Settings | None = None) -> ResolvedModel:
    """Turn a spec into a ModelRef; models:/ URIs are looked up in MLflow and downloaded once per version."""
    s = s or settings()
    match = REGISTRY_URI.match(spec.uri)
    if not match:
        if spec.uri.startswith("models:/"):
            raise ModelError(f"{spec.uri}: not a registry URI (use models:/name/version or models:/name@alias)")
        if spec.checkpoint:
            raise ModelError(f"{spec.uri}: checkpoints belong to registered versions (models:/name/version)")
        return ResolvedModel(ref=ModelRef(path=spec.uri, adapter=spec.adapter or None, name=spec.name or None,
                                          version=spec.version or None, dtype=spec.dtype))
    if spec.adapter:
        raise ModelError(f"{spec.uri}: a registered model carries its own adapter; do not pass adapter")
    name, alias = match["name"], match["alias"]
    client = mlflow_client(s)
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, match["version"])
    except MlflowException as exc:
        raise ModelError(f"{spec.uri}: not found in the MLflow registry at {_public(s.mlflow_tracking_uri)} "
                         f"({str(exc).splitlines()[0][:200]})") from None
    info = RegistryInfo(name=name, version=str(mv.version), alias=alias, run_id=mv.run_id, tags=dict(mv.tags or {}))
    local = _download(name, info.version, s)
    path, adapter = _layout(local, s)
    layout = json.loads((local / LAYOUT_FILE).read_text()) if (local / LAYOUT_FILE).exists() else {}
    kept = layout.get("checkpoints", {})
    version = info.version
    if spec.checkpoint:
        if spec.checkpoint not in kept:
            raise ModelError(f"{spec.uri}: no checkpoint {spec.checkpoint!r} kept by its fine-tune (kept: "
                             f"{', '.join(kept) or 'none'})")
        where = str((local / kept[spec.checkpoint]["dir"]).resolve())
        path, adapter = (path, where) if adapter else (where, None)
        version = f"{info.version}-{spec.checkpoint}"  # its caches live beside the final model's, never mixed
    ref = ModelRef(path=path, adapter=adapter, name=name, version=version, dtype=spec.dtype)
    return ResolvedModel(ref=ref, registry=info, checkpoint=spec.checkpoint,
                         checkpoints={c: float(v["lr"]) for c, v in kept.items()}, final_lr=layout.get("final_lr"))


_DOWNLOAD_LOCK = threading.Lock()


def _download(name: str, version: str, s: Settings) -> Path:
    """Download a registered version's files into the model cache dir (once; atomic rename, so workers
    sharing the dir never see a partial copy and never delete one another's)."""
    import mlflow.artifacts

    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    target = Path(os.path.expanduser(s.model_cache_dir)) / "mlflow" / safe / version
    with _DOWNLOAD_LOCK:
        if (target / ".complete").exists():
            return target
        tmp = target.parent / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            source = mlflow_client(s).get_model_version_download_uri(name, version)
            got = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                      tracking_uri=s.mlflow_tracking_uri, registry_uri=s.mlflow_tracking_uri)
            got_path = Path(got)
            (got_path / ".complete").touch()
            try:
                os.replace(got_path, target)  # atomic: a target dir only ever appears complete
            except OSError:
                if not (target / ".complete").exists():  # not another worker's finished copy: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _layout(local: Path, s: Settings) -> tuple[str, str | None]:
    """(model path, adapter path) of downloaded files, following rapidin_model.json when present."""
    layout_file = local / LAYOUT_FILE
    if not layout_file.exists():
        if (local / "adapter_config.json").exists():
            base = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelError(f"{local}: adapter without a base model (add {LAYOUT_FILE})")
            return base, str(local)
        return str(local), None
    layout = json.loads(layout_file.read_text())
    base, adapter = layout.get("base", "."), layout.get("adapter")
    if REGISTRY_URI.match(base):
        base_path = resolve(ModelSpec(uri=base), s).ref.path
    elif "://" in base or os.path.isabs(base):
        base_path = base
    else:
        base_path = str((local / base).resolve())
    return base_path, (str((local / adapter).resolve()) if adapter else None)


def _public(uri: str) -> str:
    """A URI without user:password@."""
    return re.sub(r"//[^/@]+@", "//", uri)


# ------------------------------------------------------------------ loaded-model memo

_MEMO: OrderedDict[tuple, LoadedModel] = OrderedDict()
_MEMO_LOCK = threading.Lock()
_MEMO_SIZE = 2


def loaded_model(ref: ModelRef, device: str, s: Settings | None = None) -> tuple[LoadedModel, float]:
    """Load a model once per process (small LRU) and return it with the seconds this call spent loading."""
    s = s or settings()
    key = (ref.model_dump_json(), device)
    with _MEMO_LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key], 0.0
        t0 = time.perf_counter()
        loaded = load_model(ref, device, s.storage_options(ref.path), s.model_cache_dir)
        _MEMO[key] = loaded
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
        return loaded, time.perf_counter() - t0


@task(name="resolve-model", **IO_RETRIES, cache_policy=NO_CACHE)
def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Resolve a model spec (registry lookups and downloads retried: they are I/O)."""
    return resolve(spec)
