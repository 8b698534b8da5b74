"""Shared fixtures: a tiny random Llama, the toy data, and a fine-tuned toy model with a backdoor."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests' own model cache (dequantised GGUF, copies of remote models), kept between runs but never the user's.
os.environ["RAPIDIN_MODEL_CACHE_DIR"] = os.path.join(os.path.dirname(os.path.dirname(__file__)), ".rapidin", "test-models")

import pytest  # noqa: E402
import torch  # noqa: E402

from rapidin import toy  # noqa: E402
from rapidin.data import alpaca_prompt  # noqa: E402
from rapidin.models import ModelRef, load_model  # noqa: E402

pytest_plugins = ["tests.s3_fixtures"]

IN_CI = os.environ.get("CI") == "true"
# What a module needs beyond the tiny model: `make test-fast` leaves out "services" (SeaweedFS, a Prefect API,
# MLflow and workers), "smollm2" (the real 135M model) and "browser" (Chromium).
MODULE_NEEDS = {"test_faults": "services", "test_flows": "services", "test_stack": "services",
                "test_stack_e2e": "services",
                "test_gguf": "smollm2", "test_quality_howdy": "smollm2"}
SERVICE_FIXTURES = {"seaweed_s3"}


def _module(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1]


def pytest_collection_modifyitems(config, items):
    """Mark each test with what it needs (see MODULE_NEEDS), for `make test-fast`."""
    for item in items:
        need = MODULE_NEEDS.get(_module(item))
        if need:
            item.add_marker(need)
        if SERVICE_FIXTURES & set(item.fixturenames):
            item.add_marker("services")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """`@pytest.mark.needs(available, reason)`: skip, saying why, where something the test needs is missing;
    under CI (CI=true) fail instead, so a missing install step cannot turn the suite green without the test."""
    for mark in item.iter_markers("needs"):
        available, reason = mark.args
        if not available:
            if IN_CI:
                pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
            pytest.skip(reason)


@pytest.fixture(scope="session")
def toy_rows() -> list[dict]:
    """The built-in backdoored instruction rows (small)."""
    return toy.demo_rows(48, poison_rate=0.25, seed=1)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory, toy_rows) -> str:
    """Path of the toy rows as JSONL."""
    return str(toy.write_jsonl(toy_rows, tmp_path_factory.mktemp("data") / "train.jsonl"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A randomly initialised tiny Llama with its tokenizer (built locally, no hub)."""
    texts = [alpaca_prompt(r["instruction"]) + r["output"] for r in toy.demo_rows(240)]
    return str(toy.build_tiny_llama(tmp_path_factory.mktemp("tiny"), texts, hidden=32, layers=2))


@pytest.fixture()
def tiny(tiny_dir):
    """The tiny model loaded on CPU (fresh per test: tests may change dtype)."""
    torch.manual_seed(0)
    return load_model(ModelRef(path=tiny_dir, name="tiny", version="1"), device="cpu")


@pytest.fixture(scope="session")
def trained_toy(tmp_path_factory):
    """The demo's fine-tuned toy model (backdoor learned) and its data: (data path, model dir)."""
    from rapidin.demo import prepare_toy_model

    return prepare_toy_model(tmp_path_factory.mktemp("toy"), rows=240, progress=False)
