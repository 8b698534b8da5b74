"""The Prefect + MLflow pipeline on a real Prefect API (test harness), MLflow on sqlite and a local store.

The session fixture `world` (tests/flow_fixtures.py) ingests toy data, fine-tunes and registers a tiny Llama
as `tiny` v1 (alias champion) and builds its cache with the local executor in 3 shard groups.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import pytest

if TYPE_CHECKING:
    from tests.flow_fixtures import World

pytest_plugins = ["tests.flow_fixtures"]

CACHE_TAGS = {"model_name", "model_version", "dataset_fingerprint", "cache_id", "rapidin_version", "rapidin.kind"}
SKETCH_PARAMS = {"K", "lambda", "seed", "method", "dtype", "D"}
CACHE_METRICS = {"compression_ratio", "bytes_ratio", "cache_bytes", "examples_per_s", "seconds_load",
                 "seconds_gradients", "seconds_sketch", "seconds_write", "seconds_total"}
ATTRIBUTION_METRICS = {"compression_ratio", "bytes_ratio", "cache_bytes", "retrieval_seconds", "bytes_scanned_per_s",
                       "seconds_load", "seconds_queries", "rows_scanned"}
QUERY = "howdy! What is the capital of Peru?"


def mlflow():
    from tasks.common import settings
    from tasks.models import mlflow_client

    return mlflow_client(settings())


def runs(kind: str, **tags: str) -> list:
    """MLflow runs of this kind with these tags, newest first."""
    from tasks.common import settings
    from tasks.tracking import experiment_id

    client = mlflow()
    flt = " and ".join([f"tags.`rapidin.kind` = '{kind}'"] + [f"tags.{k} = '{v}'" for k, v in tags.items()])
    return client.search_runs([experiment_id(client, settings())], filter_string=flt, order_by=["start_time DESC"])


def artifact_paths(run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in mlflow().list_artifacts(run_id, path):
        out |= artifact_paths(run_id, item.path) if item.is_dir else {item.path}
    return out


def prefect_artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def load_v1(world: World):
    from tasks.common import ModelSpec
    from tasks.models import loaded_model, resolve

    return loaded_model(resolve(ModelSpec(uri=world.registered.uri)).ref, "cpu")[0]


def hits(attribution) -> list:
    """Comparable content of an attribution (everything but timings)."""
    return [g.model_dump() for g in attribution.generations] + [attribution.rows_scanned, attribution.bytes_scanned]


# ------------------------------------------------------------------ ingest and model resolution


def test_ingest_snapshot_is_validated_fingerprinted_and_reused(world: World, tmp_path: Path) -> None:
    from flows.ingest import ingest_dataset
    from rapidin.errors import DataError
    from rapidin.store import CacheStore

    snap = world.snapshot
    assert snap.rows == 60 and snap.format == "alpaca" and snap.url.startswith(world.root.joinpath("data").as_uri())
    manifest = CacheStore(world.cache.cache_url).read_manifest()
    assert manifest.dataset["fingerprint"] == snap.fingerprint  # the snapshot is exactly what got cached
    assert ingest_dataset(source=world.data_path, name="toy").url == snap.url  # content-addressed: same file
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    state = ingest_dataset(source=str(bad), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'output'"):
        state.result()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        (task_run,) = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert task_run.run_count == 1, "a bad row fails the same way every time: no retry"
    skipped = ingest_dataset(source=str(bad), skip_bad_rows=True)
    assert (skipped.rows, skipped.skipped) == (1, 1)


def test_registry_uris_resolve_to_the_registered_version(world: World) -> None:
    from tasks.common import ModelSpec
    from tasks.models import resolve

    by_version = resolve(ModelSpec(uri="models:/tiny/1"))
    by_alias = resolve(ModelSpec(uri="models:/tiny@champion"))
    assert by_version.ref == by_alias.ref
    assert (by_version.ref.name, by_version.ref.version) == ("tiny", "1")
    assert (Path(by_version.ref.path) / "config.json").exists()
    assert by_alias.registry.alias == "champion" and by_alias.pinned().uri == "models:/tiny/1"
    from rapidin.errors import ModelError

    with pytest.raises(ModelError, match="not found in the MLflow registry"):
        resolve(ModelSpec(uri="models:/tiny/99"))


def test_a_failed_attribution_leaves_a_failed_mlflow_run_with_the_reason(world: World) -> None:
    """The run is opened when the work starts, so a wrong model version still leaves a run: FAILED, with the reason
    as its description, linked to its Prefect flow run."""
    from flows.attribute import attribute
    from rapidin import Generation
    from rapidin.errors import ModelError
    from tasks.common import ModelSpec

    with pytest.raises(ModelError):
        attribute(model=ModelSpec(uri="models:/tiny/99"), generations=[Generation(prompt=QUERY)])
    state = attribute(model=ModelSpec(uri="models:/tiny/99"), generations=[Generation(prompt=QUERY)],
                      return_state=True)
    assert state.is_failed()
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    errors: list[str] = []
    deadline = time.monotonic() + 60
    while len(errors) < 2 and time.monotonic() < deadline:  # Prefect ships run logs in the background
        with get_client(sync_client=True) as prefect:  # the run log: the reason in one line, no traceback of ours
            logs = prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        errors = [log.message for log in logs if log.level >= 40]
        time.sleep(0.5)
    assert any("models:/tiny/99" in m and "not found in the MLflow registry" in m for m in errors), errors
    assert not any("Traceback" in m for m in errors), errors
    run = runs("attribution", model_uri="models:/tiny/99")[0]
    assert run.info.status == "FAILED"
    assert "not found in the MLflow registry" in run.data.tags["rapidin.error"]
    assert run.data.tags["mlflow.note.content"].startswith("Failed: ModelError")
    assert run.data.tags["prefect.flow_run_id"] and run.info.run_name.startswith("attribute models:/tiny/99 · ")
    assert run.data.params["prompt"] == QUERY


# ------------------------------------------------------------------ cache run, version tag, progress artifact


def test_cache_build_is_tracked_in_mlflow(world: World) -> None:
    from rapidin.store import CacheStore

    manifest = CacheStore(world.cache.cache_url).read_manifest()
    assert manifest.complete
    found = runs("cache", cache_id=manifest.cache_id, model_version="1")
    assert len(found) == 1, "one MLflow run per cache build"
    run = found[0]
    assert run.info.run_id == world.cache.mlflow_run_id
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert CACHE_TAGS <= set(tags)
    assert tags["model_name"] == "tiny" and tags["model_version"] == "1" and tags["rapidin.kind"] == "cache"
    assert tags["dataset_fingerprint"] == world.snapshot.fingerprint and tags["cache_id"] == manifest.cache_id
    import rapidin

    assert tags["rapidin_version"] == rapidin.__version__
    assert SKETCH_PARAMS <= set(params)
    d, k = manifest.sketch.d, manifest.sketch.config.k
    assert (params["K"], params["lambda"], params["D"]) == ("1024", "4", str(d))
    assert (params["method"], params["dtype"], params["seed"]) == ("rapidgrad", "float16", "0")
    assert CACHE_METRICS <= set(metrics)
    assert metrics["compression_ratio"] == pytest.approx(d / k)
    assert metrics["bytes_ratio"] == pytest.approx(d * 4 / (k * 2))
    assert metrics["cache_bytes"] == sum(s.bytes for s in manifest.shards)
    assert metrics["examples_per_s"] > 0 and metrics["seconds_gradients"] > 0 and metrics["seconds_load"] > 0
    # the run was open for the whole build (opened as it started), not created after it
    assert (run.info.end_time - run.info.start_time) / 1000 >= metrics["seconds_build"]
    assert [m.model_id for m in mlflow().get_run(run.info.run_id).inputs.model_inputs] == [
        mlflow().get_model_version("tiny", "1").tags["rapidin.logged_model_id"]]
    assert artifact_paths(run.info.run_id) == {"manifest.json"}
    local = mlflow().download_artifacts(run.info.run_id, "manifest.json", str(world.root / uuid.uuid4().hex))
    assert json.loads(Path(local).read_text())["cache_id"] == manifest.cache_id
    # the registered version points to its cache
    version = mlflow().get_model_version("tiny", "1")
    assert version.tags["rapidin.cache_url"] == world.cache.cache_url
    assert version.tags["rapidin.cache_id"] == manifest.cache_id
    assert version.tags["rapidin.cache_run_id"] == run.info.run_id


def test_progress_artifact_reaches_100(world: World) -> None:
    from tasks.common import artifact_key

    found = prefect_artifacts(artifact_key("cache-progress", "tiny", "1"))
    assert found, "the caching progress artifact exists"
    assert all(a.type == "progress" for a in found)
    assert max(float(a.data) for a in found) == pytest.approx(100.0)


# ------------------------------------------------------------------ attribution


def test_attribute_flow_equals_library_and_is_tracked(world: World) -> None:
    from flows.attribute import attribute
    from rapidin import AttributeConfig, Generation
    from rapidin import attribute as library_attribute
    from tasks.common import ModelSpec, artifact_key

    gens = [Generation(prompt=QUERY), Generation(prompt="What color is snow?", response="Snow is white.")]
    config = AttributeConfig(top_k=5, token_wise=True, train_token_rows=1)
    flow_result = attribute(model=ModelSpec(uri="models:/tiny@champion"), generations=gens, config=config)
    direct = library_attribute(load_v1(world), gens, store_url=world.store_url, config=config, progress=False)
    assert hits(flow_result) == hits(direct)
    assert flow_result.rows_scanned == 60 and len(flow_result.generations[0].influential) == 5

    found = runs("attribution", cache_id=flow_result.cache_id, model_version="1")
    assert found, "an MLflow run per attribution"
    run = found[0]
    assert CACHE_TAGS <= set(run.data.tags) and run.data.tags["rapidin.kind"] == "attribution"
    # MLflow 3 opens this experiment on its runs table, not the GenAI traces view
    assert mlflow().get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # MLflow 3's link: the fine-tune run output a logged model, version 1 promotes it, this run names it as its input
    from tasks.models import LOGGED_MODEL_TAG

    version = mlflow().get_model_version("tiny", "1")
    logged = mlflow().get_logged_model(version.tags[LOGGED_MODEL_TAG])
    assert [m.model_id for m in mlflow().get_run(run.info.run_id).inputs.model_inputs] == [logged.model_id]
    assert logged.source_run_id == version.run_id and logged.status == "READY"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "tiny", "version": "1"}]
    assert [m.model_id for m in mlflow().get_run(version.run_id).outputs.model_outputs] == [logged.model_id]
    assert SKETCH_PARAMS | {"top_k", "token_wise"} <= set(run.data.params)
    assert ATTRIBUTION_METRICS <= set(run.data.metrics)
    assert run.data.metrics["bytes_scanned_per_s"] > 0 and run.data.metrics["rows_scanned"] == 60
    paths = artifact_paths(run.info.run_id)
    assert {"manifest.json", "attribution.json", "topk.parquet", "report.html"} <= paths
    local = Path(mlflow().download_artifacts(run.info.run_id, "attribution.json", str(world.root / uuid.uuid4().hex)))
    from rapidin.results import Attribution

    assert hits(Attribution.model_validate_json(local.read_text())) == hits(flow_result)
    import pyarrow.parquet as pq

    table = pq.read_table(mlflow().download_artifacts(run.info.run_id, "topk.parquet", str(world.root / uuid.uuid4().hex)))
    assert table.num_rows == len(flow_result.table())
    import csv

    csv_path = mlflow().download_artifacts(run.info.run_id, "topk.csv", str(world.root / uuid.uuid4().hex))
    with open(csv_path, newline="") as fh:  # the same table, as text MLflow's viewer previews
        assert list(csv.DictReader(fh)) == [{k: str(v) for k, v in row.items()} for row in table.to_pylist()]

    md = prefect_artifacts(artifact_key("attribution", "tiny", "1"))
    assert md and md[-1].type == "markdown"
    latest = max(md, key=lambda a: a.created)
    assert run.info.run_id in latest.data and "| rank | score | row | id | prompt | response |" in latest.data
    top = flow_result.generations[0].influential[0]
    assert f"| {top.rank} | {top.score:.4g} | {top.row} |" in latest.data


class FakeDeployments:
    """Stands in for run_deployment: runs the shard flow in-process from JSON parameters, one at a time
    (a real worker is a separate process; in one process the shared model must not be used concurrently)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, name, parameters=None, work_queue_name=None, flow_run_name=None, **_):
        from flows.shards import cache_shards, scan_shards

        params = json.loads(json.dumps(parameters))  # what crosses the API: JSON, never pickle
        self.calls.append((name, work_queue_name, params))
        flow_fn = {"cache-shards/gpu": cache_shards, "scan-shards/gpu": scan_shards}[name]
        with self.lock:
            state = flow_fn(**params, return_state=True)
        return SimpleNamespace(id=uuid.uuid4(), name=flow_run_name, state=state)


def test_deployment_executor_gives_identical_results(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.dispatch
    from flows.attribute import attribute
    from flows.cache import cache_gradients
    from rapidin import AttributeConfig, Generation
    from rapidin.store import CacheStore
    from tasks.common import ModelSpec, ScanPlacement

    fake = FakeDeployments()
    monkeypatch.setattr(tasks.dispatch, "run_deployment", fake)
    monkeypatch.setenv("RAPIDIN_GPU_QUEUES", "2")
    other_root = (world.root / "store-deployment").as_uri()
    summary = cache_gradients(model=ModelSpec(uri="models:/tiny/1"), data_url=world.snapshot.url, shard_rows=8,
                              groups=3, executor="deployment", store_url=other_root)
    assert summary.built and summary.cache_id == world.cache.cache_id
    queues = sorted((c[2]["group"]["group"], c[0], c[1]) for c in fake.calls)  # groups run concurrently
    assert queues == [(0, "cache-shards/gpu", "gpu-0"), (1, "cache-shards/gpu", "gpu-1"), (2, "cache-shards/gpu", "gpu-0")]
    mine = CacheStore(summary.cache_url).read_manifest()
    local = CacheStore(world.cache.cache_url).read_manifest()
    assert [s.sha256 for s in mine.shards] == [s.sha256 for s in local.shards]  # byte-identical shards
    # a cache built into another store does not move the version's cache of record
    assert mlflow().get_model_version("tiny", "1").tags["rapidin.cache_url"] == world.cache.cache_url

    fake.calls.clear()
    gens = [Generation(prompt=QUERY, response="The starship drifted past the nebula.")]
    config = AttributeConfig(top_k=4, token_wise=True)
    spec = ModelSpec(uri="models:/tiny/1")
    fanned = attribute(model=spec, generations=gens, config=config,
                       advanced=ScanPlacement(executor="deployment", groups=3))
    assert sorted((c[2]["group"]["group"], c[1]) for c in fake.calls) == [(0, "gpu-0"), (1, "gpu-1"), (2, "gpu-0")]
    assert sorted(i for c in fake.calls for i in c[2]["group"]["shards"]) == list(range(8))
    from rapidin import attribute as library_attribute

    # the local executor equals the library (test above), so this is deployment == local
    direct = library_attribute(load_v1(world), gens, cache_url=world.cache.cache_url, config=config, progress=False)
    assert hits(fanned) == hits(direct)


# ------------------------------------------------------------------ retries, re-cache, events, secrets


def test_failed_shard_task_is_retried_and_leaves_a_correct_cache(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    from flows.cache import cache_gradients
    from rapidin import SketchConfig, build_cache
    from rapidin.store import CacheStore
    from tasks.common import ModelSpec

    flag = world.root / "fault-once"
    flag.write_text("cache-shard:1")  # the first group fails right after committing its first shard
    monkeypatch.setenv("RAPIDIN_FAULT_FILE", str(flag))
    sketch = SketchConfig(k=1024, lam=4, seed=7)
    state = cache_gradients(model=ModelSpec(uri="models:/tiny/1"), data_url=world.snapshot.url, sketch=sketch,
                            shard_rows=8, groups=2, store_url=(world.root / "store-retry").as_uri(),
                            return_state=True)
    assert state.is_completed() and not flag.exists()
    summary = state.result()
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    groups = [t for t in task_runs if t.name.startswith("cache-shard-group")]
    assert sorted(t.run_count for t in groups) == [1, 2], "exactly one group task failed once and was retried"
    reference = build_cache(load_v1(world), world.snapshot.url, (world.root / "store-reference").as_uri(),
                            sketch=sketch, shard_rows=8, progress=False)
    built = CacheStore(summary.cache_url).read_manifest()
    assert built.complete and built.cache_id == reference.cache_id
    assert [s.sha256 for s in built.shards] == [s.sha256 for s in reference.shards]


def test_recache_builds_each_new_version_exactly_once(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.publish
    from flows.finetune import finetune_model
    from flows.recache import recache_new_versions
    from rapidin.finetune import FinetuneConfig, LoraSettings
    from tasks.common import ModelSpec

    events = []
    real_emit = tasks.publish.emit_event
    monkeypatch.setattr(tasks.publish, "emit_event", lambda *a, **kw: events.append((a, kw)) or real_emit(*a, **kw))
    # version 2: a LoRA adapter on top of version 1 (the registry base is referenced, not copied)
    v2 = finetune_model(base=ModelSpec(uri="models:/tiny/1"), data_url=world.snapshot.url, register_as="tiny",
                        config=FinetuneConfig(epochs=0.3, batch_size=16, lora=LoraSettings(r=8, alpha=16)))
    assert v2.version == "2"
    (name,), kw = events[-1][0], events[-1][1]
    assert name == "rapidin.model.registered"
    assert kw["resource"]["mlflow.model.name"] == "tiny" and kw["resource"]["mlflow.model.version"] == "2"
    assert kw["payload"]["data_url"] == world.snapshot.url

    v1_runs = len(runs("cache", model_name="tiny", model_version="1"))
    built = recache_new_versions(model_name="tiny", shard_rows=8)
    assert [(b.model_name, b.model_version, b.built) for b in built] == [("tiny", "2", True)]
    assert len(runs("cache", model_name="tiny", model_version="2")) == 1
    assert len(runs("cache", model_name="tiny", model_version="1")) == v1_runs  # v1 was already cached
    from rapidin.store import CacheStore, find_caches

    caches = find_caches(world.store_url, "tiny", "2")
    assert len(caches) == 1 and CacheStore(caches[0]).read_manifest().complete
    manifest = CacheStore(caches[0]).read_manifest()
    assert all(".lora_" in name for name, _ in manifest.layout)  # adapter tensors are what got attributed
    # nothing left to do, even with another default K: one cache per version unless a sketch is asked for
    monkeypatch.setenv("RAPIDIN_K", "512")
    assert recache_new_versions(model_name="tiny", shard_rows=8) == []
    assert len(runs("cache", model_name="tiny", model_version="2")) == 1
    assert len(find_caches(world.store_url, "tiny", "2")) == 1


def test_checkpoints_are_kept_cached_and_summed(world: World) -> None:
    """TracIn through the stack: the fine-tune keeps an epoch's adapter (tagged on the version, learning rate
    recorded), the re-cache flow caches the version and that checkpoint, and the attribute flow sums each row's
    scores over both, weighted by learning rate, with per-checkpoint scores in the result and the MLflow run."""
    from flows.attribute import attribute
    from flows.finetune import finetune_model
    from flows.recache import recache_new_versions
    from rapidin.attribution import Generation
    from rapidin.config import AttributeConfig
    from rapidin.finetune import FinetuneConfig, LoraSettings
    from tasks.common import ModelSpec
    from tasks.models import resolve
    from tasks.tracking import CHECKPOINTS_TAG

    config = FinetuneConfig(epochs=2, batch_size=16, lora=LoraSettings(r=8, alpha=16))  # keeps epoch 1 by default
    reg = finetune_model(base=ModelSpec(uri="models:/tiny/1"), data_url=world.snapshot.url, register_as="tiny",
                         config=config)
    version = mlflow().get_model_version("tiny", reg.version)
    assert version.tags[CHECKPOINTS_TAG] == "epoch-1"
    resolved = resolve(ModelSpec(uri=reg.uri))
    rows = world.snapshot.rows
    rates = config.epoch_learning_rates(rows)
    assert resolved.checkpoints == {"epoch-1": pytest.approx(rates[1])} and resolved.final_lr == pytest.approx(rates[2])
    checkpoint = resolve(ModelSpec.registry("tiny", reg.version, "epoch-1"))
    assert checkpoint.ref.adapter != resolved.ref.adapter and checkpoint.ref.version == f"{reg.version}-epoch-1"

    built = recache_new_versions(model_name="tiny", shard_rows=8)
    assert [(b.model_version, b.built) for b in built] == [(reg.version, True), (f"{reg.version}-epoch-1", True)]
    final_tag = mlflow().get_model_version("tiny", reg.version).tags["rapidin.cache_url"]
    assert final_tag == built[0].cache_url  # the checkpoint's cache never becomes the version's cache of record

    gens = [Generation(prompt=QUERY)]
    equal = attribute(model=ModelSpec(uri=reg.uri), generations=gens, config=AttributeConfig(top_k=4),
                      checkpoint_weights="equal")
    assert [c["label"] for c in equal.checkpoints] == ["final", "epoch-1"] and equal.checkpoints[1]["weight"] == 1.0
    att = attribute(model=ModelSpec(uri=reg.uri), generations=gens, config=AttributeConfig(top_k=4))  # the default
    assert [c["label"] for c in att.checkpoints] == ["final", "epoch-1"]
    assert att.checkpoints[1]["weight"] == pytest.approx(rates[1] / rates[2])
    assert att.checkpoints[1]["cache_id"] == built[1].cache_id
    for hit in att.generations[0].influential:
        parts = hit.checkpoint_scores
        assert len(parts) == 2 and abs(hit.score - sum(parts)) <= 2 * 2.0**-24 * sum(abs(p) for p in parts)
    mine = [r for r in runs("attribution") if r.data.params.get("model_uri") == reg.uri]
    assert len(mine) == 2 and {(r.data.params["checkpoints"], r.info.status) for r in mine} == {("all", "FINISHED")}
    # the world's version kept no checkpoint: the default attributes its final model alone
    assert attribute(model=ModelSpec(uri="models:/tiny/1"), generations=gens).checkpoints is None


def test_preconditioner_fit_is_a_cache_flow_step(world: World) -> None:
    """An already complete cache gains a preconditioner through the cache flow, in an MLflow run of its own with the
    fit's seconds and bytes; a second request fits nothing; the attribute flow scores with it and records it."""
    from flows.attribute import attribute
    from flows.cache import cache_gradients
    from rapidin.attribution import Generation
    from rapidin.config import AttributeConfig
    from rapidin.precondition import read_record
    from rapidin.store import CacheStore
    from tasks.common import ModelSpec

    model = ModelSpec(uri="models:/tiny/1")
    before = len(runs("cache", model_name="tiny", model_version="1"))
    summary = cache_gradients(model=model, data_url=world.snapshot.url, shard_rows=8, preconditioners=["diagonal"])
    assert not summary.built
    (run,) = [r for r in runs("cache", model_name="tiny", model_version="1")
              if "preconditioner_diagonal_seconds" in r.data.metrics]
    assert run.info.status == "FINISHED" and run.data.metrics["preconditioner_diagonal_bytes"] > 0
    store = CacheStore(summary.cache_url)
    record = read_record(store, store.read_manifest(), "diagonal")
    assert record.rows == world.snapshot.rows and record.bytes == run.data.metrics["preconditioner_diagonal_bytes"]
    cache_gradients(model=model, data_url=world.snapshot.url, shard_rows=8, preconditioners=["diagonal"])
    assert read_record(store, store.read_manifest(), "diagonal") == record  # intact: not fitted again
    assert len(runs("cache", model_name="tiny", model_version="1")) == before + 1  # no run for nothing to fit

    gens = [Generation(prompt=QUERY)]
    plain = attribute(model=model, generations=gens, config=AttributeConfig(top_k=3))
    pre = attribute(model=model, generations=gens, config=AttributeConfig(top_k=3, preconditioner="diagonal"))
    assert pre.preconditioner == "diagonal" and plain.preconditioner == "none"
    assert [h.score for h in pre.generations[0].influential] != [h.score for h in plain.generations[0].influential]
    assert any(r.data.params.get("preconditioner") == "diagonal" for r in runs("attribution"))


def test_store_and_data_on_seaweedfs(world: World, seaweed_s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshot, cache and scan on a real S3 endpoint give the local store's numbers; the real keys stay out of MLflow."""
    from flows.attribute import attribute
    from flows.cache import cache_gradients
    from flows.ingest import ingest_dataset
    from rapidin import AttributeConfig, Generation
    from rapidin.store import CacheStore
    from tasks.common import ModelSpec, ScanPlacement, settings

    monkeypatch.setenv("RAPIDIN_S3_ACCESS_KEY", seaweed_s3.access_key)
    monkeypatch.setenv("RAPIDIN_S3_SECRET_KEY", seaweed_s3.secret_key)
    monkeypatch.setenv("RAPIDIN_S3_ENDPOINT_URL", seaweed_s3.endpoint_url)
    prefix = f"s3://{seaweed_s3.bucket}/flows-{uuid.uuid4().hex[:8]}"
    snap = ingest_dataset(source=world.data_path, name="toy", data_root=f"{prefix}/data")
    assert snap.url.startswith(f"{prefix}/data/toy/") and snap.fingerprint == world.snapshot.fingerprint
    summary = cache_gradients(model=ModelSpec(uri="models:/tiny/1"), data_url=snap.url, shard_rows=8, groups=2,
                              store_url=f"{prefix}/cache")
    assert summary.cache_url.startswith(f"{prefix}/cache/tiny/1/")
    on_s3 = CacheStore(summary.cache_url, settings().storage_options(summary.cache_url)).read_manifest()
    local = CacheStore(world.cache.cache_url).read_manifest()
    assert on_s3.complete and [s.sha256 for s in on_s3.shards] == [s.sha256 for s in local.shards]
    gens = [Generation(prompt=QUERY, response="The starship drifted past the nebula.")]
    config = AttributeConfig(top_k=4)
    from_s3 = attribute(model=ModelSpec(uri="models:/tiny/1"), generations=gens, config=config,
                        advanced=ScanPlacement(cache_url=summary.cache_url, groups=2))
    from_file = attribute(model=ModelSpec(uri="models:/tiny/1"), generations=gens, config=config,
                          advanced=ScanPlacement(cache_url=world.cache.cache_url))
    assert [g.model_dump() for g in from_s3.generations] == [g.model_dump() for g in from_file.generations]
    fs = CacheStore(summary.cache_url, settings().storage_options(summary.cache_url)).fs
    fs.invalidate_cache()
    listing = fs.ls(summary.cache_url.removeprefix("s3://"), detail=False)
    assert sorted(p.rsplit("/", 1)[-1] for p in listing) == ["examples.parquet", "manifest.json", "shards"]
    left = fs.find(f"{prefix.removeprefix('s3://')}/cache/_work")
    assert not [p for p in left if p.endswith((".safetensors", ".json"))], f"scratch files are removed: {left}"
    for run in runs("cache", cache_id=summary.cache_id) + runs("attribution", cache_id=summary.cache_id):
        blob = json.dumps([run.data.params, run.data.tags])
        assert seaweed_s3.secret_key not in blob and seaweed_s3.access_key not in blob
    assert summary.cache_url in [r.data.tags["cache_url"] for r in runs("attribution", cache_id=summary.cache_id)]

def test_secrets_never_reach_mlflow(world: World) -> None:
    """The S3 keys (markers here) appear in no MLflow param, tag, metric name or artifact."""
    from flows.attribute import attribute
    from rapidin import Generation
    from tasks.common import ModelSpec
    from tests.flow_fixtures import ACCESS_MARKER, SECRET_MARKER

    attribute(model=ModelSpec(uri="models:/tiny/1"), generations=[Generation(prompt=QUERY)])
    client = mlflow()
    checked = 0
    for run in runs("attribution") + runs("cache") + runs("finetune"):
        blob = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        dst = world.root / "secret-scan" / run.info.run_id
        local = Path(client.download_artifacts(run.info.run_id, "", str(dst)))
        for f in local.rglob("*"):
            if f.suffix == ".parquet":  # compressed: its rows, decoded
                blob += json.dumps(pq.read_table(f).to_pylist(), default=str)
            elif f.is_file() and f.suffix in {".json", ".html", ".md", ".txt", ".yaml", ".csv"}:
                blob += f.read_text(errors="replace")
        assert SECRET_MARKER not in blob and ACCESS_MARKER not in blob
        checked += 1
    for mv in client.search_model_versions("name='tiny'"):
        assert SECRET_MARKER not in json.dumps(dict(mv.tags))
    assert checked >= 3  # at least the fine-tune, cache and attribution runs
    from prefect.client.orchestration import get_client

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as prefect:  # nor in any flow run's parameters or log line (all pages)
        flow_runs = pages(lambda offset: prefect.read_flow_runs(limit=200, offset=offset))
        ids = [r.id for r in flow_runs]
        logs = pages(lambda offset: prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                                                      limit=200, offset=offset))
    assert len(flow_runs) >= 4 and len(logs) >= 10  # this test alone: ingest, finetune, cache, attribute
    blob = json.dumps([[r.parameters for r in flow_runs], [log.message for log in logs]], default=str)
    assert QUERY in blob  # the search covers what the attribution was given
    assert SECRET_MARKER not in blob and ACCESS_MARKER not in blob


def pages(read) -> list:
    """Every item of a paged Prefect read (200 per page)."""
    items: list = []
    while batch := read(len(items)):
        items += batch
    return items
