"""Every numeric parameter of every deployed flow (and the numeric fields of its config models), thrown random
values through Prefect's own parameter validation (what the UI form and `prefect deployment run` go through):
accepted exactly when the model's bounds accept it, else refused with a message naming the parameter."""

import importlib
import inspect
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.exceptions import ParameterTypeError
from pydantic import BaseModel, TypeAdapter, ValidationError

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = sorted({d["entrypoint"] for d in yaml.safe_load((ROOT / "deployments/prefect.yaml").read_text())
                      ["deployments"]})
REQUIRED = {"model": {"uri": "models:/m/1"}, "base": {"uri": "models:/m/1"}, "data_url": "file:///d.jsonl",
            "register_as": "m", "source": "file:///d.jsonl", "generations": [{"prompt": "p"}]}


def plain(annotation):
    """`Annotated[X | None, ...]` -> X."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def numeric_targets(fn) -> list[tuple[str, str | None, type]]:
    """(parameter, nested field or None, number type) for every numeric knob a flow exposes."""
    out = []
    hints = typing.get_type_hints(fn, include_extras=True)
    for name in inspect.signature(fn).parameters:
        kind = plain(hints[name])
        if kind in (int, float):
            out.append((name, None, kind))
        elif inspect.isclass(kind) and issubclass(kind, BaseModel):
            out += [(name, f, plain(i.annotation)) for f, i in kind.model_fields.items()
                    if plain(i.annotation) in (int, float)]
    return out


FLOWS = {}
for entry in ENTRYPOINTS:
    if entry.startswith("flows/shards.py"):  # internal: dispatched by cache-gradients / attribute with a job model
        continue
    path, name = entry.split(":")
    module = path.removesuffix(".py").replace("/", ".")
    flow = getattr(importlib.import_module(module), name)
    if numeric_targets(flow.fn):
        FLOWS[entry] = flow


def base_parameters(flow) -> dict:
    out = {}
    for name, param in inspect.signature(flow.fn).parameters.items():
        if param.default is inspect.Parameter.empty:
            out[name] = REQUIRED[name]
    return out


def test_every_flow_with_numbers_is_covered():
    assert {"flows/cache.py:cache_gradients", "flows/attribute.py:attribute", "flows/recache.py:recache_new_versions",
            "flows/finetune.py:finetune_model"} <= set(FLOWS)


values = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([-1, 0, 1, 2, 2**16, 2**63]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4))


@settings(max_examples=80, deadline=None)
@given(entry=st.sampled_from(sorted(FLOWS)), data=st.data())
def test_random_values_are_accepted_or_refused_by_name(entry, data):
    flow = FLOWS[entry]
    name, field, _ = data.draw(st.sampled_from(numeric_targets(flow.fn)))
    value = data.draw(values)
    params = base_parameters(flow)
    params[name] = {field: value} if field else value
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    if field:
        model = plain(hints[name])
        try:
            model(**{field: value})
            expected = True
        except ValidationError:
            expected = False
    else:
        try:
            TypeAdapter(hints[name]).validate_python(value)
            expected = True
        except ValidationError:
            expected = False
    try:
        flow.validate_parameters(params)
        accepted = True
    except ParameterTypeError as exc:
        accepted = False
        assert name in str(exc), str(exc)
    assert accepted == expected, (entry, name, field, value)


@pytest.mark.parametrize("entry", sorted(FLOWS))
def test_a_known_bad_value_names_the_parameter(entry):
    flow = FLOWS[entry]
    name, field, _ = numeric_targets(flow.fn)[0]
    params = base_parameters(flow) | {name: {field: -(2**70)} if field else -(2**70)}
    with pytest.raises(ParameterTypeError, match=name):
        flow.validate_parameters(params)
