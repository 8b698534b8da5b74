"""Pytest plugin for the pipeline tests: Prefect test harness, MLflow on sqlite, local store, a registered tiny model.

Use with `pytest_plugins = ["tests.flow_fixtures"]`. Everything is session-scoped: the Prefect API and the
fine-tuned, registered, cached tiny model are built once and shared.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SECRET_MARKER = "sekrit-MARKER-5f3a9c"
ACCESS_MARKER = "akid-MARKER-77b1"


@dataclass
class World:
    """The shared pipeline state the tests read."""

    root: Path
    store_url: str
    data_path: str
    snapshot: object  # tasks.ingest.DatasetSnapshot
    registered: object  # tasks.finetune.RegisteredVersion
    cache: object  # flows.cache.CacheSummary
    rows: list[dict]


@pytest.fixture(scope="session")
def pipeline_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """RAPIDIN_* settings pointing at temp dirs, small K, CPU, and marker S3 keys that must never be logged."""
    root = tmp_path_factory.mktemp("pipeline")
    env = {
        "RAPIDIN_STORE_URL": (root / "store").as_uri(),
        "RAPIDIN_DATA_URL": (root / "data").as_uri(),
        "RAPIDIN_MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        "RAPIDIN_MLFLOW_ARTIFACT_LOCATION": str(root / "mlartifacts"),
        "RAPIDIN_MLFLOW_EXPERIMENT": "rapidin-tests",
        "RAPIDIN_MODEL_CACHE_DIR": str(root / "models"),
        "RAPIDIN_DEVICE": "cpu",
        "RAPIDIN_K": "1024",
        "RAPIDIN_LAM": "4",
        "RAPIDIN_POLL_SECONDS": "0.5",
        "RAPIDIN_S3_ACCESS_KEY": ACCESS_MARKER,
        "RAPIDIN_S3_SECRET_KEY": SECRET_MARKER,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    mp.chdir(root)  # nothing may land in the repository (mlflow.db, mlruns/)
    try:
        yield root
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def prefect_api(pipeline_env: Path) -> Iterator[None]:
    """A real (temporary, sqlite) Prefect API for the whole session; task results stored under the temp root."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(pipeline_env / "prefect-results")}):
            yield


@pytest.fixture(scope="session")
def world(prefect_api: None, pipeline_env: Path) -> World:
    """Toy data ingested, a tiny Llama fine-tuned and registered as tiny v1 (alias champion), its cache built."""
    from flows.cache import cache_gradients
    from flows.finetune import finetune_model
    from flows.ingest import ingest_dataset
    from rapidin import toy
    from rapidin.data import alpaca_prompt
    from rapidin.finetune import FinetuneConfig
    from tasks.common import ModelSpec

    rows = toy.demo_rows(60, poison_rate=0.2, seed=1)
    data_path = str(toy.write_jsonl(rows, pipeline_env / "src" / "toy.jsonl"))
    texts = [alpaca_prompt(r["instruction"]) + r["output"] for r in toy.demo_rows(240)]
    base = toy.build_tiny_llama(pipeline_env / "tiny-base", texts, hidden=32, layers=2)
    snap = ingest_dataset(source=data_path, name="toy")
    reg = finetune_model(base=ModelSpec(uri=str(base)), data_url=snap.url, register_as="tiny",
                         config=FinetuneConfig(epochs=2, batch_size=16, lr=3e-3, keep_checkpoints=()),
                         alias="champion")  # no checkpoint: the TracIn default has its own test
    cache = cache_gradients(model=ModelSpec(uri=reg.uri), data_url=snap.url, shard_rows=8, groups=3)
    return World(root=pipeline_env, store_url=os.environ["RAPIDIN_STORE_URL"], data_path=data_path, snapshot=snap,
                 registered=reg, cache=cache, rows=rows)
