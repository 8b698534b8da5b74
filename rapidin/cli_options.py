"""Command-line options generated from the frozen config models: each option's name, type, choices, default
and help come from its model field, and its bounds are checked by the model, so nothing is restated here."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any, Literal, NoReturn

from pydantic import BaseModel, ValidationError

from .errors import RapidInError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`rapidin cache: error: ...`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the problem, and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag(name: str) -> str:
    """The command-line flag of a field: `shard_rows` -> `--shard-rows`."""
    return "--" + name.replace("_", "-")


def _plain(annotation: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_model_options(group: Any, model: type[BaseModel], skip: tuple[str, ...] = (),
                      rename: dict[str, str] | None = None) -> None:
    """One option per field of `model` (except `skip`); unset options are absent from the namespace, so the
    model's own default applies. `rename` maps a field to another flag name (`data_format` -> `format`)."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        annotation = _plain(field.annotation)
        default = field.default
        help_text = (field.description or "").replace("%", "%%")
        option = (rename or {}).get(name, name)
        kwargs: dict[str, Any] = {"dest": option, "default": argparse.SUPPRESS}  # unique across models
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif typing.get_origin(annotation) is tuple:
            kwargs.update(nargs="*", metavar=name.upper().rstrip("S"))
        elif annotation in (int, float, str):
            kwargs.update(type=annotation, metavar=name.upper())
        else:
            raise TypeError(f"{model.__name__}.{name}: no command-line form for {annotation}")
        shown = list(default) if isinstance(default, tuple) else default
        kwargs["help"] = help_text if default is None else f"{help_text} (default: {shown})"
        group.add_argument(flag(option), **kwargs)


def given(args: argparse.Namespace, model: type[BaseModel], skip: tuple[str, ...] = (),
          rename: dict[str, str] | None = None) -> dict[str, Any]:
    """The options of `model` that the user gave, by field name (tuples for list options)."""
    out = {}
    for name, field in model.model_fields.items():
        option = (rename or {}).get(name, name)
        if name in skip or not hasattr(args, option):
            continue
        value = getattr(args, option)
        out[name] = tuple(value) if typing.get_origin(_plain(field.annotation)) is tuple else value
    return out


def build(model: type[BaseModel], values: dict[str, Any], rename: dict[str, str] | None = None) -> Any:
    """`model(**values)`, with a validation failure as a one-line RapidInError naming the option."""
    try:
        return model(**values)
    except ValidationError as exc:
        raise RapidInError(describe(exc, rename)) from None


def describe(exc: ValidationError, rename: dict[str, str] | None = None) -> str:
    """A pydantic error as one line: `--shard-rows -3: Input should be greater than or equal to 1`."""
    parts = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:
            parts.append(msg)
            continue
        name = str(err["loc"][0])
        where = (f"RAPIDIN_{name.upper()}" if exc.title == "Settings"
                 else flag((rename or {}).get(name, name)))
        shown = err.get("input")
        parts.append(f"{where} {shown!r}: {msg}" if not isinstance(shown, dict) else f"{where}: {msg}")
    return "; ".join(parts)


def fail(prog: str, message: str) -> int:
    """Print `prog: error: message` as one line on stderr; return exit status 2."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2
