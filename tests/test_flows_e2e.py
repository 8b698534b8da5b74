"""End to end on real services: a `prefect server`, the deployments from deployments/prefect.yaml (`prefect deploy
--all`), and two process workers on queues gpu-0 and gpu-1; the deployment executor must equal the local one."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from tests.flow_fixtures import World

pytest_plugins = ["tests.flow_fixtures"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_prefect(world: World, tmp_path_factory: pytest.TempPathFactory):
    """Prefect server + every deployment of prefect.yaml + two gpu-pool workers (stopped afterwards)."""
    from infra.local.stack import (_bin, child_env, ensure_work_pool, ensure_work_queue, start_prefect_server,
                                   start_prefect_worker)

    home = tmp_path_factory.mktemp("prefect-e2e")
    server = start_prefect_server(home / "server", ui=False)
    workers = []
    try:
        for pool in ("cpu", "gpu"):
            ensure_work_pool(server.url, pool, home)
        for queue in ("gpu-0", "gpu-1"):
            ensure_work_queue(server.url, "gpu", queue, home)
        env = child_env({"PREFECT_API_URL": server.url, "PREFECT_HOME": str(home / "cli")})
        deploy = subprocess.run([_bin("prefect"), "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                                 "--all"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        extra = {"PREFECT_HOME": str(home / "worker"), "RAPIDIN_DEVICE": "cpu"}
        with ThreadPoolExecutor(2) as pool:
            workers = list(pool.map(lambda q: start_prefect_worker("gpu", server.url, q, home / q, extra),
                                    ["gpu-0", "gpu-1"]))
        yield server
    finally:
        for w in workers:
            w.stop(timeout=10)
        server.stop(timeout=15)


def _api(server, method: str, path: str, **kw):
    r = httpx.request(method, f"{server.url}{path}", timeout=10, **kw)
    r.raise_for_status()
    return r.json()


@pytest.mark.slow
def test_prefect_yaml_deploys_schedule_trigger_and_concurrency(real_prefect) -> None:
    deployments = {(d["name"], d["entrypoint"]): d for d in _api(real_prefect, "POST", "/deployments/filter", json={})}
    recache = deployments[("scheduled", "flows/recache.py:recache_new_versions")]
    assert [s["schedule"]["cron"] for s in recache["schedules"]] == ["17 * * * *"]
    assert recache["global_concurrency_limit"]["limit"] == 1
    automations = _api(real_prefect, "POST", "/automations/filter", json={})
    linked = [a for a in automations if any(act.get("deployment_id") == recache["id"] for act in a["actions"])]
    assert linked and "rapidin.model.registered" in linked[0]["trigger"]["expect"]
    assert {d["work_pool_name"] for d in deployments.values()} == {"cpu", "gpu"}


@pytest.mark.slow
def test_deployment_executor_on_real_workers_equals_local(world: World, real_prefect, monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.attribute import attribute
    from flows.cache import cache_gradients
    from rapidin import AttributeConfig, Generation
    from rapidin.store import CacheStore
    from tasks.common import ModelSpec

    gens = [Generation(prompt="howdy! What is the capital of Peru?", response="The starship drifted past the nebula.")]
    config = AttributeConfig(top_k=4, token_wise=True)
    spec = ModelSpec(uri="models:/tiny/1")
    from rapidin import attribute as library_attribute
    from tasks.models import loaded_model, resolve

    loaded = loaded_model(resolve(spec).ref, "cpu")[0]
    local = library_attribute(loaded, gens, cache_url=world.cache.cache_url, config=config, progress=False)
    monkeypatch.setenv("RAPIDIN_GPU_QUEUES", "2")
    with temporary_settings({PREFECT_API_URL: real_prefect.url}):
        summary = cache_gradients(model=spec, data_url=world.snapshot.url, shard_rows=8, executor="deployment",
                                  store_url=(world.root / "store-e2e").as_uri())
        fanned = attribute(model=spec, generations=gens, config=config, executor="deployment",
                           cache_url=summary.cache_url)
    built = CacheStore(summary.cache_url).read_manifest()
    assert built.complete and [s.sha256 for s in built.shards] == [
        s.sha256 for s in CacheStore(world.cache.cache_url).read_manifest().shards]
    assert [g.model_dump() for g in fanned.generations] == [g.model_dump() for g in local.generations]
    runs = _api(real_prefect, "POST", "/flow_runs/filter", json={})
    shard_runs = [r for r in runs if r["name"].startswith(("cache-tiny", "scan-"))]
    assert len(shard_runs) == 4 and all(r["state_type"] == "COMPLETED" for r in shard_runs)
    assert sorted(r["work_queue_name"] for r in shard_runs) == ["gpu-0", "gpu-0", "gpu-1", "gpu-1"]


@pytest.mark.slow
def test_model_registered_event_triggers_recache_run(real_prefect) -> None:
    """The finetune flow's event, emitted the way the flow emits it, makes the server schedule a re-cache run
    whose model_name parameter comes from the event (the trigger's template in prefect.yaml)."""
    import sys
    import time

    from infra.local.stack import child_env

    code = ("from tasks.publish import emit_model_registered; from prefect.events.worker import EventsWorker; "
            "emit_model_registered('tiny-e2e', '7', 'file:///data.jsonl', 'run-1'); EventsWorker.drain_all()")
    env = child_env({"PREFECT_API_URL": real_prefect.url})
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (recache,) = [d for d in _api(real_prefect, "POST", "/deployments/filter", json={})
                  if d["entrypoint"] == "flows/recache.py:recache_new_versions"]
    deadline = time.monotonic() + 60
    triggered = []
    while not triggered and time.monotonic() < deadline:
        runs = _api(real_prefect, "POST", "/flow_runs/filter",
                    json={"flow_runs": {"deployment_id": {"any_": [recache["id"]]}}})
        triggered = [r for r in runs if r["parameters"].get("model_name") == "tiny-e2e"]
        time.sleep(1)
    assert triggered, "no recache run was created for the rapidin.model.registered event"
    assert triggered[0]["parameters"].get("executor") == "deployment"  # deployment defaults still apply
