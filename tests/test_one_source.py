"""One source of truth: each option of a job is defined once, in its frozen config model (name, bounds, default,
help). The CLI's options, the Prefect flow's run form (its parameter schema) and the README's command synopsis must
show the same name and default; this walks every field of every job's models."""

import argparse
import re
from pathlib import Path

import pytest

from rapidin.cli import ATTRIBUTE_FLAGS, build_parser
from rapidin.cli_options import flag
from rapidin.config import AttributeConfig, BuildConfig, GradientConfig, SketchConfig
from rapidin.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
JOBS = {"cache": ("flows.cache:cache_gradients", [SketchConfig, GradientConfig, BuildConfig]),
        "attribute": ("flows.attribute:attribute", [AttributeConfig])}
FIELDS = [(job, model, name) for job, (_, models) in JOBS.items() for model in models for name in model.model_fields]


def cli_options(command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {option: action for action in sub._actions for option in action.option_strings}


def flow_schema(job: str) -> dict:
    import importlib

    module, name = JOBS[job][0].split(":")
    return getattr(importlib.import_module(module), name).parameters.model_dump()


def readme_synopsis(command: str) -> dict[str, str]:
    """`--option VALUE` pairs of the README's synopsis of `rapidin COMMAND` (placeholders in capitals skipped)."""
    block = README.split("## Command line", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    text = block.split(f"rapidin {command} ", 1)[1].split(".venv/bin/rapidin", 1)[0]
    return {m[1]: m[2] for m in re.finditer(r"(--[a-z][a-z-]*) ([a-z0-9.][^\s\]|\\]*)", text)}


def shown(value) -> str:
    return str(list(value) if isinstance(value, tuple) else value)


@pytest.mark.parametrize("job, model, name", FIELDS, ids=[f"{j}-{m.__name__}.{n}" for j, m, n in FIELDS])
def test_cli_flow_form_and_readme_agree_with_the_model(job, model, name):
    field = model.model_fields[name]
    assert field.description, f"{model.__name__}.{name} has no description"
    # the CLI: an option of that name whose help is the field's description and names the model's default
    option = flag(ATTRIBUTE_FLAGS.get(name, name) if job == "attribute" else name)
    action = cli_options(job)[option]
    assert action.default is argparse.SUPPRESS  # unset -> the model's own default applies
    assert field.description.replace("%", "%%") in action.help
    if field.default is not None:
        assert action.help.endswith(f"(default: {shown(field.default)})")
    # the Prefect form: the field inside the job's nested config parameter, or a top-level parameter of that name
    schema = flow_schema(job)
    nested = schema["definitions"].get(model.__name__, {}).get("properties", {})
    form = nested.get(name) or schema["properties"].get(name)
    assert form is not None, f"flow {JOBS[job][0]} has no parameter for {model.__name__}.{name}"
    assert form.get("default") == (list(field.default) if isinstance(field.default, tuple) else field.default)
    assert form.get("description") == field.description
    # the README's synopsis, where it shows a value for this option
    documented = readme_synopsis(job).get(option)
    if documented is not None and not isinstance(field.default, (tuple, bool)):
        assert documented == shown(field.default), f"README shows {option} {documented}"


def test_settings_defaults_are_the_models():
    """RAPIDIN_SKETCH_METHOD / RAPIDIN_K / RAPIDIN_LAM (per-deployment overrides) take the sketch model's default,
    bounds and choices, not their own."""
    for name, field in (("sketch_method", "method"), ("k", "k"), ("lam", "lam")):
        assert Settings.model_fields[name].default == SketchConfig.model_fields[field].default
        assert Settings.model_fields[name].metadata == SketchConfig.model_fields[field].metadata
        assert Settings.model_fields[name].annotation == SketchConfig.model_fields[field].annotation


def test_the_walk_sees_every_option():
    """Guards the test itself: the README parse and the CLI lookup find what they should."""
    assert readme_synopsis("cache")["--shard-rows"] == "256" and readme_synopsis("attribute")["--top-k"] == "20"
    assert len(FIELDS) >= 15


# ---------------------------------------------------------------- the rules of the house (docs/ARCHITECTURE.md)

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return {name.split(".")[0] for name in names}


def _decorators(path: Path) -> set[str]:
    import ast

    return {ast.unparse(d).split("(")[0] for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for d in n.decorator_list}


def test_data_flows_one_way_and_every_task_lives_in_tasks():
    for path in (ROOT / "rapidin").rglob("*.py"):
        assert not _imports(path) & {"prefect", "mlflow", "tasks", "flows"}, f"{path} imports the orchestration"
    for path in (ROOT / "tasks").rglob("*.py"):
        assert "flows" not in _imports(path), f"{path} imports flows"
    for path in (ROOT / "flows").rglob("*.py"):
        assert "task" not in _decorators(path), f"{path} defines a @task: tasks/ owns every task"


def test_no_module_is_a_house_of_its_own():
    """Each file does one job: none of the library, tasks, flows or infra modules is over ~400 lines."""
    for folder in ("rapidin", "tasks", "flows", "infra"):
        for path in (ROOT / folder).rglob("*.py"):
            assert len(path.read_text().splitlines()) <= 420, f"{path} has grown into several rooms"


def test_one_name_for_the_store_and_the_data():
    """The store root and the data are `store_url` / `data_url` in the library, the CLI (`--store-url`, `--data-url`;
    `--store` and `--data` stay as short aliases), the flows' forms and Settings (RAPIDIN_STORE_URL, RAPIDIN_DATA_URL)."""
    import inspect

    from rapidin import attribute, plan_cache

    for job, name in (("cache", "store_url"), ("cache", "data_url"), ("attribute", "store_url")):
        schema = flow_schema(job)
        fields = set(schema["properties"]) | set(schema["definitions"].get("ScanPlacement", {}).get("properties", {}))
        assert flag(name) in cli_options(job) and name in fields  # attribute's sits in its `advanced` group
    assert {"store_url", "data_url"} <= set(Settings.model_fields)
    assert {"store_url", "data_url"} <= set(inspect.signature(plan_cache).parameters)
    assert "store_url" in inspect.signature(attribute).parameters


def test_attribute_form_fields_all_described_and_never_null():
    """The attribute run form: every field, nested ones included, has help text, and none is nullable (Prefect's
    form shows a nullable field as a str/None switch reading 'Property is type None'); the user's inputs come
    first and the deployment plumbing last, in its `advanced` group."""
    schema = flow_schema("attribute")
    defs = schema["definitions"]
    seen = []

    def walk(props: dict, path: str) -> None:
        for name, prop in props.items():
            seen.append(path + name)
            assert prop.get("description"), f"{path}{name} has no help text"
            assert not any(alt.get("type") == "null" for alt in prop.get("anyOf", [])), f"{path}{name} is nullable"
            refs = [prop.get("$ref"), prop.get("items", {}).get("$ref")] + [a.get("$ref") for a in prop.get("allOf", [])]
            for ref in filter(None, refs):
                walk(defs[ref.split("/")[-1]]["properties"], f"{path}{name}.")

    walk(schema["properties"], "")
    assert list(schema["properties"]) == ["model", "generations", "config", "checkpoints", "checkpoint_weights",
                                          "advanced"]
    assert {"model.uri", "generations.prompt", "generations.response", "config.paper_scoring", "advanced.executor",
            "advanced.cache_url"} <= set(seen)
