"""Command-line options generated from a config dataclass, so that each option is declared once: the field gives
the flag's name, type and default, its docstring the help, its metadata the choices.

A field's docstring may end with "(--flag)" to name its flag when that is not the field's name with dashes (e.g.
`out_dir` is `--out`); that suffix is not shown in the help. Validation stays in the dataclass's `__post_init__`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing

import click

_FLAG_SUFFIX = re.compile(r"\s*\((--[a-z0-9-]+)\)(\.?)\s*$")


def choice(default: str | None, choices: typing.Sequence[str]):
    """A dataclass field whose value must be one of `choices` (the command line offers them); None, where it is
    the default, means "derived from the other options"."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def check_choices(config) -> None:
    """Raises the BertError of the first field whose value is not one of its choices."""
    from prep.errors import BertError

    for field in dataclasses.fields(config):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        if choices is not None and value is not None and value not in choices:
            raise BertError(f"{flag_of(type(config), field.name)} must be one of {', '.join(choices)}, "
                            f"got {value!r}")


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls`, by field name (read from its source once)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_of(cls, name: str) -> str:
    """The command-line flag of field `name`: the "(--flag)" its docstring ends with, else --name-with-dashes."""
    match = _FLAG_SUFFIX.search(field_docs(cls).get(name, ""))
    return match.group(1) if match else "--" + name.replace("_", "-")


def _base_type(hint):
    """int for `int | None`, and so on."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def click_options(cls, exclude: typing.Collection[str] = (), required: typing.Collection[str] = ()):
    """A decorator adding one Click option per field of dataclass `cls` (in field order), each passing its value
    under the field's name. Fields in `exclude` are left out; those in `required` must be given."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)

    def decorate(command):
        for field in reversed(dataclasses.fields(cls)):
            if field.name in exclude:
                continue
            kind = _base_type(hints[field.name])
            default = None if field.default is dataclasses.MISSING else field.default
            help_text = _FLAG_SUFFIX.sub(r"\2", docs.get(field.name, ""))
            declared = [flag_of(cls, field.name), field.name]
            if kind is bool:
                option = click.option(*declared, is_flag=True, default=bool(default), help=help_text)
            else:
                choices = field.metadata.get("choices")
                option = click.option(*declared, type=click.Choice(choices) if choices else kind, default=default,
                                      required=field.name in required, show_default=default is not None,
                                      help=help_text)
            command = option(command)
        return command

    return decorate
