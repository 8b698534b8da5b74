"""Pure helpers of tasks/: no Prefect API, no MLflow, no model (fast)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


@pytest.mark.parametrize(("n", "groups"), [(8, 3), (8, 1), (3, 5), (1, 2), (16, 4)])
def test_split_groups_covers_every_shard_once_in_order(n: int, groups: int) -> None:
    from tasks.common import split_groups

    parts = split_groups(list(range(n)), groups)
    assert [i for p in parts for i in p] == list(range(n))
    assert 1 <= len(parts) <= min(groups, n) and all(parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_round_robin_queues() -> None:
    from tasks.dispatch import queue_for

    assert [queue_for(g, 2) for g in range(5)] == ["gpu-0", "gpu-1", "gpu-0", "gpu-1", "gpu-0"]
    assert {queue_for(g, 1) for g in range(3)} == {"gpu-0"}


def test_query_vectors_roundtrip_without_pickle() -> None:
    from rapidin.retrieval import QueryGroup
    from tasks.scan import queries_from_bytes, queries_to_bytes

    groups = [QueryGroup(torch.randn(16)), QueryGroup(torch.randn(16), torch.randn(3, 16))]
    data = queries_to_bytes(groups)
    assert b"pickle" not in data and data[8:9] == b"{"  # a safetensors header, not a pickle stream
    back = queries_from_bytes(data)
    assert torch.equal(back[0].whole, groups[0].whole) and back[0].tokens is None
    assert torch.equal(back[1].tokens, groups[1].tokens)


def test_fault_injection_fails_exactly_once_after_threshold(tmp_path, monkeypatch) -> None:
    from tasks.faults import InjectedFault, maybe_fail

    flag = tmp_path / "fault"
    flag.write_text("cache-shard:2")
    monkeypatch.setenv("RAPIDIN_FAULT_FILE", str(flag))
    maybe_fail("cache-shard", 1)  # below the threshold
    maybe_fail("scan", 5)  # another point
    with pytest.raises(InjectedFault):
        maybe_fail("cache-shard", 2)
    maybe_fail("cache-shard", 3)  # consumed: never again
    assert not flag.exists()


def test_retry_condition_skips_deterministic_errors() -> None:
    from rapidin.errors import CacheError, DataError, StorageError
    from tasks.common import worth_retrying

    def state(exc):
        return SimpleNamespace(data=exc)

    assert not worth_retrying(None, None, state(DataError("bad row")))
    assert not worth_retrying(None, None, state(CacheError("other model")))
    assert worth_retrying(None, None, state(StorageError("connection reset")))
    assert worth_retrying(None, None, state(RuntimeError("worker died")))


def test_uris_and_keys() -> None:
    from tasks.common import artifact_key
    from tasks.models import REGISTRY_URI
    from tasks.tracking import public_uri

    assert public_uri("http://user:pa55@mlflow:5000/x") == "http://mlflow:5000/x"
    assert artifact_key("cache-progress", "My_Model.v2", "10") == "cache-progress-my-model-v2-10"
    assert REGISTRY_URI.match("models:/tiny/3")["version"] == "3"
    assert REGISTRY_URI.match("models:/tiny@champion")["alias"] == "champion"
    assert REGISTRY_URI.match("models:/tiny") is None and REGISTRY_URI.match("/models/tiny/3") is None


def test_topk_markdown_escapes_and_links() -> None:
    from rapidin.data import alpaca_prompt
    from rapidin.report import markdown_summary
    from rapidin.results import Attribution, GenerationResult, Hit

    hit = Hit(rank=1, row=7, id="abc", score=1.5, prompt=alpaca_prompt("a | b"), response="x|y\nz")
    att = Attribution(cache_id="c1", cache_url="file:///c", model={"name": "m", "version": "1"}, sketch={}, top_k=1,
                      generations=[GenerationResult(prompt="p", response="r", influential=[hit], helpful=[hit])])
    md = markdown_summary(att, links={"MLflow run": "http://mlflow/#/experiments/1/runs/r1"})
    assert "[MLflow run](http://mlflow/#/experiments/1/runs/r1)" in md
    assert "| 1 | 1.5 | 7 | `abc` | a \\| b | x\\|y z |" in md  # the row's own words: no template, no "### Response:"
    assert "### Most helpful" in md and "### Most harmful" not in md  # empty lists are left out


def test_publish_topk_adds_a_link_artifact_for_a_tracking_server(monkeypatch) -> None:
    import uuid

    import tasks.publish as publish
    from rapidin.results import Attribution

    made = []
    monkeypatch.setattr(publish, "create_link_artifact", lambda link, **kw: made.append(("link", link, kw["key"])))
    monkeypatch.setattr(publish, "create_markdown_artifact", lambda md, **kw: made.append(("md", md, kw["key"])) or uuid.uuid4())
    att = Attribution(cache_id="c", cache_url="file:///c", model={"name": "tiny", "version": "2"}, sketch={}, top_k=1,
                      generations=[])
    publish.publish_topk(att, "http://mlflow:5000/#/experiments/1/runs/r")
    publish.publish_topk(att, "`mlflow ui --backend-store-uri sqlite:///x.db` then open experiment 1, run r")
    assert [(kind, key) for kind, _, key in made] == [("link", "attribution-tiny-2-mlflow"), ("md", "attribution-tiny-2"),
                                                       ("md", "attribution-tiny-2")]
    assert made[0][1] == "http://mlflow:5000/#/experiments/1/runs/r"


def test_auto_executor_fans_out_only_caches_that_pay_for_the_dispatch() -> None:
    from tasks.dispatch import FANOUT_MIN_BYTES, choose_scan_executor

    assert choose_scan_executor("auto", FANOUT_MIN_BYTES - 1, 2)[0] == "local"
    assert choose_scan_executor("auto", FANOUT_MIN_BYTES, 2)[0] == "deployment"
    assert choose_scan_executor("auto", 10 * FANOUT_MIN_BYTES, 1)[0] == "local"  # one queue: nothing to gain
    assert choose_scan_executor("deployment", 1, 2)[0] == "deployment" and choose_scan_executor("local", 2**40, 2)[0] == "local"
    assert "MiB cache <" in choose_scan_executor("auto", 2**20, 2)[1]  # the flow logs why
