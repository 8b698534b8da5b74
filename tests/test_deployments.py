"""deployments/: every deployment's entrypoint imports, its parameters validate, triggers, schedules and templates parse."""

from __future__ import annotations

import importlib
import inspect
import json
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
DEPLOYMENTS = SPEC["deployments"]
IDS = [f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}" for d in DEPLOYMENTS]


def load(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(ROOT / entrypoint), use_placeholder_flow=False)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=IDS)
def test_entrypoint_imports_and_parameters_validate(deployment: dict) -> None:
    from prefect.flows import Flow
    from prefect.utilities.schema_tools import validate

    path, name = deployment["entrypoint"].split(":")
    assert (ROOT / path).is_file()
    flow = load(deployment["entrypoint"])
    assert isinstance(flow, Flow) and flow.fn.__name__ == name
    assert flow.fn.__doc__, "the UI shows the flow's docstring"
    hints = typing.get_type_hints(flow.fn)
    signature = inspect.signature(flow.fn)
    for pname, param in signature.parameters.items():
        assert pname in hints, f"{pname} has no type annotation (the UI form needs one)"
        if param.default is inspect.Parameter.empty or (isinstance(param.default, FieldInfo) and param.default.is_required()):
            assert pname in flow.parameters.required
            continue
        default = param.default.get_default(call_default_factory=True) if isinstance(param.default, FieldInfo) else param.default
        if default is not None or "None" in str(hints[pname]):
            TypeAdapter(hints[pname]).validate_python(default)  # every default is valid for its type
    schema = flow.parameters.model_dump(by_alias=True)
    assert set(schema["properties"]) == set(signature.parameters)  # a typed form field per parameter
    params = deployment.get("parameters") or {}
    assert set(params) <= set(signature.parameters)
    errors = validate(params, schema, ignore_required=True, raise_on_error=False)
    assert not errors, [e.message for e in errors]
    for name_, value in params.items():
        TypeAdapter(hints[name_]).validate_python(value)


def test_every_flow_has_a_deployment_and_pools_are_known() -> None:
    from prefect.flows import Flow

    deployed = {d["entrypoint"] for d in DEPLOYMENTS}
    for module_path in sorted((ROOT / "flows").glob("[a-z]*.py")):
        module = importlib.import_module(f"flows.{module_path.stem}")
        for attr, value in vars(module).items():
            if isinstance(value, Flow) and value.fn.__module__ == module.__name__:
                assert f"flows/{module_path.name}:{attr}" in deployed, f"{attr} has no deployment"
    pools = {d["work_pool"]["name"] for d in DEPLOYMENTS}
    assert pools == {"cpu", "gpu"}
    shard_flows = {load(d["entrypoint"]).name + "/" + d["name"]: d for d in DEPLOYMENTS if "shards.py" in d["entrypoint"]}
    # the names the fan-out uses by default are deployments on the gpu pool
    from tasks.common import ScanPlacement

    cache_default = inspect.signature(load("flows/cache.py:cache_gradients").fn).parameters["shard_deployment"].default
    for default in (cache_default, ScanPlacement.model_fields["shard_deployment"].default):
        assert default in shard_flows and shard_flows[default]["work_pool"]["name"] == "gpu"
        assert shard_flows[default]["work_pool"]["work_queue_name"].startswith("gpu-")


def test_recache_schedule_and_registration_trigger() -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from tasks.publish import MODEL_REGISTERED

    (recache,) = [d for d in DEPLOYMENTS if d["entrypoint"] == "flows/recache.py:recache_new_versions"]
    (schedule,) = recache["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert recache.get("concurrency_limit") == 1  # cron and event runs queue up: no version is built twice
    (trigger,) = [DeploymentEventTrigger.model_validate(t) for t in recache["triggers"]]
    assert trigger.expect == {MODEL_REGISTERED} and trigger.enabled
    assert set(trigger.parameters) <= set(inspect.signature(load(recache["entrypoint"]).fn).parameters)
    # the template reads a resource label the finetune flow's event really carries
    import tasks.publish

    seen = {}
    original = tasks.publish.emit_event
    tasks.publish.emit_event = lambda event, resource, payload=None, **_: seen.update(event=event, resource=resource)
    try:
        tasks.publish.emit_model_registered("tiny", "3", "file:///data.jsonl", "run")
    finally:
        tasks.publish.emit_event = original
    assert seen["event"] == MODEL_REGISTERED
    assert "mlflow.model.name" in trigger.parameters["model_name"] and seen["resource"]["mlflow.model.name"] == "tiny"
    pattern = trigger.match.root["prefect.resource.id"]
    assert seen["resource"]["prefect.resource.id"].startswith(pattern.rstrip("*"))


def _placeholders(template: dict) -> set[str]:
    from prefect.utilities.templating import find_placeholders

    return {p.name for p in find_placeholders(template["job_configuration"])}


@pytest.mark.parametrize("name", ["gpu-process.json", "gpu-kubernetes.json"])
def test_base_job_templates_declare_every_variable(name: str) -> None:
    template = json.loads((ROOT / "deployments" / name).read_text())
    assert set(template) == {"job_configuration", "variables"}
    declared = set(template["variables"]["properties"])
    assert _placeholders(template) <= declared


def test_kubernetes_template_requests_one_gpu_per_run() -> None:
    from prefect.utilities.templating import apply_values

    template = json.loads((ROOT / "deployments" / "gpu-kubernetes.json").read_text())
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    rendered = apply_values(template["job_configuration"], defaults)
    (container,) = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert rendered["job_manifest"]["kind"] == "Job"


def test_process_template_matches_prefects_default_shape() -> None:
    from prefect.workers.process import ProcessWorker

    ours = json.loads((ROOT / "deployments" / "gpu-process.json").read_text())
    default = ProcessWorker.get_default_base_job_template()
    assert ours["job_configuration"] == default["job_configuration"]
    assert set(ours["variables"]["properties"]) == set(default["variables"]["properties"])
