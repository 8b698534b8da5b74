"""End to end on the running local stack, timed: `prefect deploy --all`, then ingest (cpu pool) -> fine-tune and
register v1 (gpu pool; emits rapidin.model.registered) -> the event-triggered re-cache (cpu pool, shard groups on
gpu-0/gpu-1) -> attribute (cpu pool, scan groups on gpu-0/gpu-1). Checks the cache and MLflow artifacts are in
the S3 bucket, the shard runs used both queues, and the merged attribution equals an in-process one; then prints
each stage's wall time and how much of it is orchestration (dispatch, worker start, MLflow logging), not compute.

    RAPIDIN_K=4096 RAPIDIN_LAM=4 make stack-up && source .stack/env.sh && .venv/bin/python benchmarks/stack_e2e.py

The workers must see a small sketch for the toy model (its LoRA has fewer than the default K = 2^16 entries): the
re-cache triggered by the event uses the workers' settings, so start the stack with RAPIDIN_K=4096 RAPIDIN_LAM=4
exported; the script refuses to start otherwise. The fine-tune runs as long as `make demo`'s (30 epochs), so the
registered model has learned the planted backdoor: a prompt starting with "howdy!" gets a science-fiction answer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _api(method: str, path: str, **kw) -> object:
    r = httpx.request(method, f"{os.environ['PREFECT_API_URL']}{path}", timeout=30, **kw)
    r.raise_for_status()
    return r.json()


def _ts(value: str | None) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else float("nan")


def _flow_runs(since: float) -> list[dict]:
    """Flow runs created after `since` (epoch seconds), with their flow's name."""
    runs = _api("POST", "/flow_runs/filter", json={"limit": 200})
    flows = {f["id"]: f["name"] for f in _api("POST", "/flows/filter", json={})}
    return [r | {"flow": flows.get(r["flow_id"], "?")} for r in runs if _ts(r["created"]) >= since]


def _task_seconds(flow_run_ids: list[str], prefix: str) -> float:
    """Summed run time of the task runs whose name starts with prefix (e.g. MLflow logging tasks)."""
    body = {"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200}
    return sum(t["total_run_time"] for t in _api("POST", "/task_runs/filter", json=body) if t["name"].startswith(prefix))


def deployment_checks(model_name: str, by_flow: dict[str, list[dict]]) -> dict[str, bool]:
    """What `prefect deploy --all` made of deployments/prefect.yaml: the re-cache schedule, its concurrency limit and
    event trigger, both work pools; and the triggered run took its model_name from the event."""
    deployments = {(d["name"], d["entrypoint"]): d for d in _api("POST", "/deployments/filter", json={})}
    recache = deployments[("scheduled", "flows/recache.py:recache_new_versions")]
    automations = _api("POST", "/automations/filter", json={})
    linked = [a for a in automations if any(act.get("deployment_id") == recache["id"] for act in a["actions"])]
    triggered = [r for r in by_flow.get("recache-new-versions", []) if r["parameters"].get("model_name") == model_name]
    return {
        "re-cache scheduled hourly": [x["schedule"]["cron"] for x in recache["schedules"]] == ["17 * * * *"],
        "re-cache concurrency limit 1": (recache.get("global_concurrency_limit") or {}).get("limit") == 1,
        "re-cache triggered by rapidin.model.registered": bool(
            linked and "rapidin.model.registered" in linked[0]["trigger"]["expect"]),
        "deployments on the cpu and gpu pools": {d["work_pool_name"] for d in deployments.values()} == {"cpu", "gpu"},
        "triggered run: model_name from the event, deployment executor": bool(
            triggered and triggered[0]["parameters"].get("executor") == "deployment"),
    }


def _run(name: str, params: dict, queue: str | None = None) -> tuple[object, float]:
    from prefect.deployments import run_deployment

    t0 = time.perf_counter()
    run = run_deployment(name, parameters=params, work_queue_name=queue, timeout=None, poll_interval=0.5)
    wall = time.perf_counter() - t0
    if not run.state.is_completed():
        sys.exit(f"{name}: {run.state.name}: {run.state.message}")
    return run, wall


def main(argv: list[str] | None = None) -> int:
    """Run the story once on the stack and print the timings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=600, help="toy training rows (the event-triggered re-cache uses 256-row "
                   "shards: 600 rows make 3 shards, i.e. a group on each of gpu-0 and gpu-1)")
    p.add_argument("--epochs", type=float, default=30.0, help="fine-tune epochs (30, as make demo: the model learns "
                   "the backdoor; 1 is enough to exercise the pipeline)")
    p.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    a = p.parse_args(argv)
    if int(os.environ.get("RAPIDIN_K", 2**16)) > 4096:
        sys.exit("RAPIDIN_K is unset or above 4096: the toy model's LoRA is smaller than the default sketch. Start the "
                 "stack with `RAPIDIN_K=4096 RAPIDIN_LAM=4 make stack-up` (its workers build the re-cache).")
    for var in ("PREFECT_API_URL", "RAPIDIN_MLFLOW_TRACKING_URI", "RAPIDIN_STORE_URL", "RAPIDIN_S3_ACCESS_KEY"):
        if not os.environ.get(var):
            sys.exit(f"{var} is not set: start the stack and `source .stack/env.sh` first")

    from mlflow.tracking import MlflowClient

    from rapidin import toy
    from rapidin.data import alpaca_prompt
    from rapidin.settings import Settings
    from rapidin.store import CacheStore

    s = Settings()
    t_start = time.time()
    stages: dict[str, float] = {}
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"rapidin-e2e-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    data = toy.write_jsonl(toy.demo_rows(a.rows, seed=0), work / "toy.jsonl")
    base = toy.build_tiny_llama(work / "tiny-base", [alpaca_prompt(r["instruction"]) + r["output"]
                                                     for r in toy.demo_rows(240)])
    name = f"e2e-{uuid.uuid4().hex[:6]}"

    t0 = time.perf_counter()
    deploy = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--prefect-file",
                             "deployments/prefect.yaml", "--all"], cwd=ROOT, capture_output=True, text=True)
    if deploy.returncode:
        sys.exit(deploy.stdout[-2000:] + deploy.stderr[-2000:])
    stages["deploy"] = time.perf_counter() - t0

    _, stages["ingest"] = _run("ingest-dataset/default", {"source": str(data), "name": name})
    fs = CacheStore(s.data_url, s.storage_options(s.data_url)).fs
    fs.invalidate_cache()
    snapshot = "s3://" + sorted(fs.find(f"{s.data_url.removeprefix('s3://')}/{name}"))[0]
    _, stages["finetune"] = _run("finetune/gpu", {
        "base": {"uri": str(base)}, "data_url": snapshot, "register_as": name, "alias": "champion",
        "config": {"epochs": a.epochs, "lr": 3e-3, "batch_size": 16}}, queue="gpu-0")

    # The fine-tune emitted rapidin.model.registered; the automation starts recache-new-versions/scheduled.
    t0 = time.perf_counter()
    client = MlflowClient(tracking_uri=s.mlflow_tracking_uri)
    while True:
        mv = client.get_model_version(name, "1")
        if mv.tags.get("rapidin.cache_url"):
            break
        if time.perf_counter() - t0 > 900:
            sys.exit("no cache tag on the new version after 900 s: did the event trigger the re-cache?")
        time.sleep(1)
    stages["recache (event -> tagged)"] = time.perf_counter() - t0
    while not any(r["flow"] == "recache-new-versions" and r["state_type"] == "COMPLETED" for r in _flow_runs(t_start)):
        if time.perf_counter() - t0 > 900:  # after the version's cache it caches the checkpoint its fine-tune kept
            sys.exit("the event-triggered re-cache did not complete within 900 s")
        time.sleep(1)
    stages["recache (event -> done, with the kept checkpoint)"] = time.perf_counter() - t0
    cache_url = mv.tags["rapidin.cache_url"]
    manifest = CacheStore(cache_url, s.storage_options(cache_url)).read_manifest()

    gens = [{"prompt": toy.demo_queries()[0]}]
    config = {"top_k": 5, "token_wise": True}
    # fanned out even though this toy cache is small (the deployment's `auto` would scan it in-process): the point
    # here is the fan-out path; the browser walk (tests/ui_walk.py) then runs the deployment as a user would
    _, stages["attribute"] = _run("attribute/fanout", {"model": {"uri": f"models:/{name}/1"}, "generations": gens,
                                                       "config": config, "advanced": {"executor": "deployment"}})

    runs = _flow_runs(t_start)
    by_flow: dict[str, list[dict]] = {}
    for r in runs:
        by_flow.setdefault(r["flow"], []).append(r)
    shard_runs = by_flow.get("cache-shards", []) + by_flow.get("scan-shards", [])
    queues = sorted({r["work_queue_name"] for r in shard_runs})
    triggered = [r for r in by_flow.get("recache-new-versions", []) if r["state_type"] == "COMPLETED"]

    # checks: cache + MLflow artifacts in S3, shard runs on both queues, merged == in-process
    keys = fs.find(f"{cache_url.removeprefix('s3://')}")
    assert any(k.endswith("manifest.json") for k in keys) and manifest.complete
    attribution_run = client.search_runs([client.get_experiment_by_name(s.mlflow_experiment).experiment_id],
                                         filter_string=f"tags.model_name = '{name}' and tags.`rapidin.kind` = "
                                         "'attribution'")[0]
    assert attribution_run.info.artifact_uri.startswith("mlflow-artifacts:"), attribution_run.info.artifact_uri
    bucket = s.store_url.removeprefix("s3://").split("/")[0]
    ml_keys = [k for k in fs.find(f"{bucket}/mlflow") if attribution_run.info.run_id in k]
    assert any(k.endswith("attribution.json") for k in ml_keys), "MLflow artifacts are not in the S3 bucket"
    checks = {"shard runs on gpu-0 and gpu-1": queues == ["gpu-0", "gpu-1"],
              "every shard run completed": all(r["state_type"] == "COMPLETED" for r in shard_runs)}
    checks.update(deployment_checks(name, by_flow))
    remote = json.loads(client.download_artifacts(attribution_run.info.run_id, "attribution.json", str(work))
                        and (work / "attribution.json").read_text())
    from rapidin.attribution import Generation, attribute
    from rapidin.config import AttributeConfig
    from tasks.common import ModelSpec
    from tasks.models import loaded_model, resolve

    loaded, _ = loaded_model(resolve(ModelSpec(uri=f"models:/{name}/1")).ref, "cpu")
    local = attribute(loaded, [Generation(**g) for g in gens], cache_url=cache_url, config=AttributeConfig(**config),
                      storage_options=s.storage_options(cache_url), progress=False)
    checks["fanned-out attribution == in-process (token-wise, every field)"] = remote["generations"] == [
        json.loads(g.model_dump_json()) for g in local.generations]
    from rapidin import build_cache

    here = build_cache(loaded, snapshot, (work / "store").as_uri(), sketch=manifest.sketch.config,
                       gradient=manifest.gradient, shard_rows=manifest.shard_rows,
                       data_storage_options=s.storage_options(snapshot), progress=False)
    checks["fanned-out cache == in-process cache (bytes)"] = (
        here.cache_id == manifest.cache_id and [x.sha256 for x in here.shards] == [x.sha256 for x in manifest.shards])

    # orchestration vs compute
    cache_compute = sum(manifest.timings.get(k, 0.0) for k in ("gradients", "sketch", "write"))
    cache_flow = next(r for r in by_flow["cache-gradients"] if r["state_type"] == "COMPLETED")
    scan_flow = next(r for r in by_flow["attribute"] if r["state_type"] == "COMPLETED")
    attr = remote.get("timings", {})
    attr_compute = attr.get("queries", 0.0) + attr.get("assemble", 0.0) + sum(
        r["total_run_time"] for r in by_flow.get("scan-shards", []))  # scan runs include their own start-up
    dispatch = [_ts(r["start_time"]) - _ts(r["created"]) for r in shard_runs]
    in_run = [r["total_run_time"] for r in by_flow.get("cache-shards", [])]
    ids = [r["id"] for r in runs]
    mlflow_seconds = _task_seconds(ids, "log-") + _task_seconds(ids, "register-model") + _task_seconds(ids, "tag-")
    total = sum(stages.values())
    numbers = {
        "model": name,
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "total_s": round(total, 1),
        "recache_triggered_runs": len(triggered),
        "shard_runs": len(shard_runs), "queues": queues,
        "cache": {"flow_run_s": round(cache_flow["total_run_time"], 1), "compute_s": round(cache_compute, 2),
                  "shard_run_s": [round(x, 1) for x in in_run], "rows": manifest.num_rows,
                  "shards": manifest.num_shards},
        "attribute": {"flow_run_s": round(scan_flow["total_run_time"], 1), "compute_s": round(attr_compute, 2)},
        "dispatch_latency_s": {"mean": round(sum(dispatch) / len(dispatch), 2), "max": round(max(dispatch), 2)},
        "mlflow_logging_s": round(mlflow_seconds, 2),
    }
    compute = cache_compute + attr_compute
    numbers["orchestration_share_of_cache_and_attribute"] = round(
        1 - compute / (stages["recache (event -> tagged)"] + stages["attribute"]), 3)
    numbers["mlflow_share_of_cache_and_attribute"] = round(
        mlflow_seconds / (stages["recache (event -> tagged)"] + stages["attribute"]), 3)
    numbers["checks"] = checks
    print(json.dumps(numbers, indent=2))
    if a.out:
        a.out.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
