"""Dataclass configs: field docs, command-line flags and run records from one definition.

Every config is a ``@dataclass`` with a one-line docstring under each field (CleanRL's ``Args``).
:func:`field_docs` reads those docstrings from the source, :func:`add_dataclass_args` turns the fields
into ``argparse`` flags (so no field is documented twice), and :func:`config_markdown` renders a config as
the markdown table each run writes next to its logs. :func:`load_config_file` reads the same settings from
a YAML or TOML file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Return ``{field: docstring}`` for the string literals written under a dataclass's fields."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # defined in a REPL: no source to read
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``X | None`` to ``(X, True)``; other types come back as ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parser_for(tp: Any, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            if text not in choices:
                raise argparse.ArgumentTypeError(f"expected one of {choices}, got {text!r}")
            return text
        return tp(text)

    parse.__name__ = _metavar(tp).lower()  # argparse says "invalid int value: '1.5'"
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` flag per dataclass field, with its docstring as help."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{docs.get(f.name, '')} (default: {default})",
            "type": _parser_for(tp, optional),
            "metavar": _metavar(tp),
        }
        if typing.get_origin(tp) in (list, tuple):
            item = typing.get_args(tp)[0]
            kwargs.update(nargs="*", type=_parser_for(item, False), metavar=_metavar(item))
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _metavar(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    return getattr(tp, "__name__", str(tp)).upper()


def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from the flags given on the command line (absent flags keep the defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)


def to_jsonable(config: Any) -> dict[str, Any]:
    """A dataclass as a dict of JSON-serialisable values (paths become strings)."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        out[key] = str(value) if isinstance(value, Path) else value
    return out


def config_markdown(config: Any) -> str:
    """Render a config as a two-column markdown table (for TensorBoard's text tab)."""
    rows = "\n".join(f"|{k}|{v}|" for k, v in to_jsonable(config).items())
    return "|param|value|\n|-|-|\n" + rows


class ConfigFileError(ValueError):
    """A config file is missing, unreadable, not YAML/TOML, or not a table of settings."""


CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")
"""File name endings :func:`load_config_file` reads."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of settings into ``{field_name: value}``.

    Keys may be written as field names or as flags without the dashes (``kl_coef`` or ``kl-coef``); values
    come back as the parser read them (checking them against a config is the caller's job).

    Raises:
        ConfigFileError: the file is missing or unreadable, has another ending, does not parse (the message
            names the file and the parser's complaint, with its line), or is not a table of settings.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigFileError(f"config file {path} must end in {', '.join(CONFIG_SUFFIXES)} (YAML or TOML)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"cannot read config file {path}: {e}") from None
    data = _parse_toml(path, text) if suffix == ".toml" else _parse_yaml(path, text)
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"config file {path} must be a table of settings (key: value), not a {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in out:
            raise ConfigFileError(f"config file {path} sets {name!r} twice")
        out[name] = value
    return out


def _parse_yaml(path: Path, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(filter(None, (e.context, e.problem)))
        raise ConfigFileError(f"cannot parse config file {path} (YAML): {where}{problem}") from None
    except yaml.YAMLError as e:
        raise ConfigFileError(f"cannot parse config file {path} (YAML): {e}") from None


def _parse_toml(path: Path, text: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"cannot parse config file {path} (TOML): {e}") from None


def save_config(config: Any, folder: str | Path, name: str = "config.json") -> Path:
    """Write ``config`` as JSON into ``folder`` and return the file's path."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(config), indent=2) + "\n")
    return path
