"""Faults on real services: nothing committed is lost, nothing half-written is ever read as done.

The cache builds here are real `rapidin cache` processes writing to SeaweedFS S3 (24 shards of 2 rows, so a
kill lands mid-build); every finished cache is compared, shard by shard, with an uninterrupted in-process
build of the same model, data and sketch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from infra.local.mlflow_server import start_mlflow_server
from infra.local.s3 import S3Service, start_seaweedfs

pytest_plugins = ["tests.s3_fixtures", "tests.flow_fixtures"]

ROWS, SHARD_ROWS = 48, 2
SHARDS = ROWS // SHARD_ROWS
PROGRESS_BAR = re.compile(r"^[\w ]+:\s+\d+%\|")  # a tqdm line, e.g. "caching gradients:  4%|▍  | 4/96 [...]"
CLI_OPTIONS = ["--name", "tiny", "--model-version", "1", "--device", "cpu", "--k", "1024", "--lam", "4",
               "--seed", "0", "--dtype", "float16", "--batch-size", "8", "--max-length", "512",
               "--shard-rows", str(SHARD_ROWS)]


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """48 toy rows as JSONL (24 shards of 2)."""
    from rapidin import toy

    return str(toy.write_jsonl(toy.demo_rows(ROWS, poison_rate=0.25, seed=3),
                               tmp_path_factory.mktemp("fault-data") / "train.jsonl"))


@pytest.fixture(scope="module")
def reference(tiny_dir: str, fault_data: str, tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted build (in-process, local disk) with exactly the CLI's options."""
    from rapidin import GradientConfig, SketchConfig, build_cache
    from rapidin.models import ModelRef, load_model

    loaded = load_model(ModelRef(path=tiny_dir, name="tiny", version="1"), device="cpu")
    return build_cache(loaded, fault_data, tmp_path_factory.mktemp("reference").as_uri(), progress=False,
                       sketch=SketchConfig(k=1024, lam=4, seed=0, dtype="float16"),
                       gradient=GradientConfig(params=(), max_length=512, batch_size=8), shard_rows=SHARD_ROWS)


def cli_env(s3: S3Service, **override: str) -> dict[str, str]:
    """The environment of a `rapidin` process pointed at s3 (keys via RAPIDIN_S3_*, never argv), bars off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAPIDIN_", "AWS_"))}
    env |= {"RAPIDIN_S3_ENDPOINT_URL": s3.endpoint_url, "RAPIDIN_S3_ACCESS_KEY": s3.access_key,
            "RAPIDIN_S3_SECRET_KEY": s3.secret_key, "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "DO_NOT_TRACK": "1"}
    return env | override


def cache_cmd(tiny_dir: str, data: str, store: str) -> list[str]:
    """`rapidin cache` for the tiny model and the fault data into store."""
    return [sys.executable, "-m", "rapidin.cli", "cache", "--model", tiny_dir, "--data", data, "--store", store,
            *CLI_OPTIONS]


def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start cmd in its own session with captured output."""
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run cmd to completion."""
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def objects(s3: S3Service, prefix: str) -> dict[str, dict]:
    """Every object under prefix in the bucket: key -> {LastModified, Size, ETag}."""
    client, out, token = s3.client(), {}, None
    while True:
        kw = {"Bucket": s3.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kw)
        out |= {o["Key"]: o for o in page.get("Contents", [])}
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def commit_records(s3: S3Service, prefix: str) -> dict[str, dict]:
    """The shard commit records (shards/shard-NNNNNN.json) under prefix."""
    return {k: o for k, o in objects(s3, prefix).items() if "/shards/shard-" in k and k.endswith(".json")}


def wait_for_commits(s3: S3Service, prefix: str, proc: subprocess.Popen, n: int = 1, timeout: float = 180) -> None:
    """Poll until n shard commit records exist; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(commit_records(s3, prefix)) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"rapidin cache ended (rc {proc.returncode}) before {n} shard commit(s):\n"
                        f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {n} shard commit record(s) under {prefix} after {timeout}s")


def shard_view(manifest) -> list[dict]:
    """What must be byte-identical between two builds: each shard's range, size and checksum (not timings)."""
    return [s.model_dump(exclude={"seconds"}) for s in manifest.shards]


def assert_one_intact_cache(s3: S3Service, prefix: str, reference) -> str:
    """Exactly one cache directory, complete, every shard's bytes matching its checksum and the reference."""
    from rapidin.store import CacheStore

    version_dir = f"{prefix}/tiny/1/"
    dirs = {k[len(version_dir):].split("/", 1)[0] for k in objects(s3, version_dir)}
    assert dirs == {reference.cache_id}, f"one cache expected, found {sorted(dirs)}"
    store = CacheStore(f"s3://{s3.bucket}/{version_dir}{reference.cache_id}", s3.storage_options())
    manifest = store.read_manifest()
    assert manifest.complete and manifest.num_shards == SHARDS
    assert shard_view(manifest) == shard_view(reference)
    for info in manifest.shards:  # the files and commit records themselves, not just the manifest's word
        assert hashlib.sha256(store.read_bytes(info.file)).hexdigest() == info.sha256
        # content, not timings: two racing builders may both compute a shard; the later commit record (same bytes,
        # same checksum, its own `seconds`) can land after the manifest took the first one
        record = store.committed_shard(info.index, (info.start, info.stop), verify=False)
        assert record.model_dump(exclude={"seconds"}) == info.model_dump(exclude={"seconds"})
    names = {k.rsplit("/", 1)[-1] for k in objects(s3, f"{version_dir}{reference.cache_id}/")}
    assert names == {"manifest.json", "examples.parquet"} | {f"shard-{i:06d}.{ext}" for i in range(SHARDS)
                                                             for ext in ("safetensors", "json")}
    return store.url


def one_line_error(proc: subprocess.CompletedProcess | subprocess.Popen | SimpleNamespace, stderr: str) -> str:
    """The process failed with exit 2 and exactly one stderr line, `rapidin cache: error: ...`, no traceback."""
    assert proc.returncode == 2, f"rc {proc.returncode}; stderr:\n{stderr[-3000:]}"
    lines = [ln for ln in re.split(r"[\r\n]", stderr) if ln.strip() and not PROGRESS_BAR.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("rapidin cache: error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------ a killed build resumes byte-identically


def test_sigkilled_cache_build_resumes_byte_identical(seaweed_s3: S3Service, tiny_dir: str, fault_data: str,
                                                      reference) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    store = f"s3://{seaweed_s3.bucket}/{prefix}"
    env = cli_env(seaweed_s3)
    proc = spawn(cache_cmd(tiny_dir, fault_data, store), env)
    try:
        wait_for_commits(seaweed_s3, prefix, proc)
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup, possibly in the middle of a PUT
        proc.communicate()
    assert proc.returncode == -9
    before = objects(seaweed_s3, prefix)
    committed = {k: o for k, o in before.items() if "/shards/shard-" in k and k.endswith(".json")}
    assert 1 <= len(committed) < SHARDS, f"the kill must land mid-build ({len(committed)}/{SHARDS} committed)"
    manifest_key = next(k for k in before if k.endswith("/manifest.json"))
    assert json.loads(seaweed_s3.client().get_object(Bucket=seaweed_s3.bucket, Key=manifest_key)["Body"].read())[
        "complete"] is False

    # S3 LastModified has 1 s resolution; the rerun's start-up alone takes longer, so a rewrite would show
    rerun = run(cache_cmd(tiny_dir, fault_data, store), env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_one_intact_cache(seaweed_s3, prefix, reference)
    after = objects(seaweed_s3, prefix)
    for key, obj in committed.items():  # every committed shard was reused, not recomputed and rewritten
        shard = key.replace(".json", ".safetensors")
        assert after[key]["LastModified"] == obj["LastModified"] and after[key]["ETag"] == obj["ETag"], key
        assert after[shard]["LastModified"] == before[shard]["LastModified"], shard
    rebuilt = [k for k, o in commit_records(seaweed_s3, prefix).items() if k not in committed]
    assert len(rebuilt) == SHARDS - len(committed)
    print(f"killed after {len(committed)}/{SHARDS} committed shards; the rerun reused them and built {len(rebuilt)}")


# ------------------------------------------------------------------ the S3 server goes away mid-run


def test_s3_outage_fails_in_one_line_then_resumes_on_restart(tmp_path: Path, tiny_dir: str, fault_data: str,
                                                             reference) -> None:
    import secrets

    key, secret = "outage-" + secrets.token_hex(6), secrets.token_urlsafe(24)
    s3 = start_seaweedfs(tmp_path / "weed", key, secret, "outage")
    restarted = None
    try:
        prefix = "cache"
        store = f"s3://{s3.bucket}/{prefix}"
        env = cli_env(s3)
        # botocore's default retries would wait ~9 s on a refused connection before the same error
        proc = spawn(cache_cmd(tiny_dir, fault_data, store), env | {"AWS_MAX_ATTEMPTS": "1"})
        try:
            wait_for_commits(s3, prefix, proc)
            os.kill(proc.pid, signal.SIGSTOP)  # freeze the build so it cannot finish while the server shuts down
            committed = commit_records(s3, prefix)
            s3.stop()  # the whole object store goes away mid-build
            os.kill(proc.pid, signal.SIGCONT)
            t0 = time.monotonic()
            _, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        failed_after = time.monotonic() - t0
        line = one_line_error(proc, stderr)
        assert store in line and "cannot" in line, line

        # Same data directory, same ports (so the same endpoint URL): the committed shards are still there.
        restarted = start_seaweedfs(tmp_path / "weed", key, secret, "outage", ports=s3.info["ports"])
        assert restarted.endpoint_url == s3.endpoint_url
        survived = commit_records(restarted, prefix)
        assert set(committed) <= set(survived)
        rerun = run(cache_cmd(tiny_dir, fault_data, store), env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert_one_intact_cache(restarted, prefix, reference)
        for k in committed:  # what was committed before the outage was reused
            assert commit_records(restarted, prefix)[k]["LastModified"] == survived[k]["LastModified"]
        print(f"outage after {len(committed)} shards: failed in {failed_after:.1f}s with: {line}")
    finally:
        for svc in (restarted, s3):
            if svc is not None:
                svc.stop(timeout=2)  # its data is not needed any more


# ------------------------------------------------------------------ wrong credentials, unknown bucket (CLI)


def test_cli_unknown_bucket_and_wrong_credentials_are_one_line_and_write_nothing(
        seaweed_s3: S3Service, tiny_dir: str, fault_data: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """`rapidin cache --store s3://nobucket/x` (keys from RAPIDIN_S3_*): exit 2, one stderr line, no bucket made;
    the same with a wrong secret. In-process `main()` (the CLI's own entry point) to spare two interpreter starts."""
    from rapidin.cli import main

    bucket, denied = f"nobucket-{uuid.uuid4().hex[:8]}", f"denied-{uuid.uuid4().hex[:8]}"
    cases = {"unknown bucket": (f"s3://{bucket}/x", seaweed_s3.secret_key),
             "wrong secret": (f"s3://{seaweed_s3.bucket}/{denied}", "wrong-" + uuid.uuid4().hex)}
    for case, (store, secret) in cases.items():
        for key, value in cli_env(seaweed_s3, RAPIDIN_S3_SECRET_KEY=secret).items():
            if key.startswith("RAPIDIN_"):
                monkeypatch.setenv(key, value)
        capsys.readouterr()
        rc = main(cache_cmd(tiny_dir, fault_data, store)[3:])
        err = capsys.readouterr().err
        line = one_line_error(SimpleNamespace(returncode=rc), err)
        assert store in line, (case, line)
        assert seaweed_s3.secret_key not in err and seaweed_s3.access_key not in err and secret not in err
        if case == "unknown bucket":
            assert f"bucket '{bucket}' does not exist" in line
    assert bucket not in [b["Name"] for b in seaweed_s3.client().list_buckets()["Buckets"]]
    assert objects(seaweed_s3, denied) == {}


# ------------------------------------------------------------------ two builds of one version at once


def test_two_concurrent_builds_make_one_complete_cache(seaweed_s3: S3Service, tiny_dir: str, fault_data: str,
                                                       reference) -> None:
    prefix = f"race-{uuid.uuid4().hex[:8]}"
    cmd, env = cache_cmd(tiny_dir, fault_data, f"s3://{seaweed_s3.bucket}/{prefix}"), cli_env(seaweed_s3)
    procs = [spawn(cmd, env) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert_one_intact_cache(seaweed_s3, prefix, reference)


# ------------------------------------------------------------------ secrets on the real-server path


@pytest.fixture()
def mlflow_on_s3(seaweed_s3: S3Service, tmp_path: Path) -> Iterator[object]:
    """An MLflow tracking server (sqlite) whose artifacts go to the SeaweedFS bucket."""
    server = start_mlflow_server(tmp_path / "mlflow", seaweed_s3)
    try:
        yield server
    finally:
        server.stop()


def test_secrets_reach_no_tracking_server_artifact_or_prefect_log(
        prefect_api, pipeline_env: Path, mlflow_on_s3, seaweed_s3: S3Service, tiny_dir: str, toy_data: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache + attribute flows with the real S3 keys; then every MLflow param/tag/artifact (read back from the
    bucket), the MLflow database, and every Prefect log line, artifact and flow-run parameter is searched."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.attribute import attribute
    from flows.cache import cache_gradients
    from rapidin import AttributeConfig, Generation
    from tasks.common import ModelSpec, ScanPlacement

    experiment = f"secrets-{uuid.uuid4().hex[:8]}"
    for key, value in {"RAPIDIN_MLFLOW_TRACKING_URI": mlflow_on_s3.url, "RAPIDIN_MLFLOW_EXPERIMENT": experiment,
                       "RAPIDIN_S3_ENDPOINT_URL": seaweed_s3.endpoint_url,
                       "RAPIDIN_S3_ACCESS_KEY": seaweed_s3.access_key,
                       "RAPIDIN_S3_SECRET_KEY": seaweed_s3.secret_key}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAPIDIN_MLFLOW_ARTIFACT_LOCATION", raising=False)  # the server's S3 artifact root
    store = f"s3://{seaweed_s3.bucket}/secrets-{uuid.uuid4().hex[:8]}/cache"
    spec = ModelSpec(uri=tiny_dir, name="tiny", version="1")
    cached = cache_gradients(model=spec, data_url=toy_data, shard_rows=16, store_url=store, return_state=True)
    summary = cached.result()
    attributed = attribute(model=spec, generations=[Generation(prompt="What is the capital of Peru?", response="Lima.")],
                           config=AttributeConfig(top_k=3), advanced=ScanPlacement(cache_url=summary.cache_url),
                           return_state=True)
    assert attributed.is_completed()
    run_ids = [cached.state_details.flow_run_id, attributed.state_details.flow_run_id]

    needles = [seaweed_s3.secret_key, seaweed_s3.access_key]
    client = MlflowClient(tracking_uri=mlflow_on_s3.url)
    exp = client.get_experiment_by_name(experiment)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server to S3
    mlruns = client.search_runs([exp.experiment_id])
    assert len(mlruns) == 2
    for r in mlruns:
        blob = json.dumps([r.data.params, r.data.tags, list(r.data.metrics)])
        assert not any(n in blob for n in needles)
    s3 = seaweed_s3.client()
    artifacts = [k for k in objects(seaweed_s3, "mlflow/") if any(r.info.run_id in k for r in mlruns)]
    assert len(artifacts) >= 4, artifacts
    for key in artifacts:
        body = s3.get_object(Bucket=seaweed_s3.bucket, Key=key)["Body"].read()
        assert not any(n.encode() in body for n in needles), key
    db = (Path(mlflow_on_s3.log_path).parent / "mlflow.db").read_bytes()
    assert not any(n.encode() in db for n in needles)

    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId, LogFilter, LogFilterFlowRunId)

    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))
        flow_runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
        prefect_artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids)))
    assert len(flow_runs) == 2 and len(logs) >= 4 and len(prefect_artifacts) >= 2
    blob = json.dumps([[lg.message for lg in logs], [r.parameters for r in flow_runs],
                       [a.model_dump(mode="json") for a in prefect_artifacts]], default=str)
    assert summary.cache_url in blob  # the search covers what these runs logged
    assert not any(n in blob for n in needles)
