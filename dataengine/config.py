"""Typed dataclass configs that generate the command line, its ``--help`` and YAML overrides.

Every command's settings are one dataclass whose fields carry attribute docstrings::

    @dataclass
    class BuildConfig:
        frames: int = 50
        \"\"\"Frames sampled uniformly per video.\"\"\"

``build_parser(BuildConfig)`` turns the fields into ``--frames`` options (help text from the
docstring, choices from ``Literal``, ``nargs`` from lists, ``--x/--no-x`` for booleans), and
``parse_config`` applies, in order: field defaults, then ``--config FILE.yaml``, then the
command-line flags. Unknown YAML keys are an error naming the file and key. Range checks live
in each dataclass's ``__post_init__`` and collect every problem before raising once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is invalid; the message lists every problem found."""


def check(problems: list[str], ok: bool, message: str) -> None:
    """Collect ``message`` unless ``ok``; call :func:`raise_problems` once at the end."""
    if not ok:
        problems.append(message)


def raise_problems(problems: list[str], what: str) -> None:
    if problems:
        raise ConfigError(f"invalid {what}:\n  - " + "\n  - ".join(problems))


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar_parser(tp: Any):
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return Path
    if get_origin(tp) is Literal:
        values = get_args(tp)
        return type(values[0])
    return str


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls: type, prog: str | None = None, description: str | None = None,
                 positional: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser whose options are the dataclass's fields.

    Options default to ``argparse.SUPPRESS`` so that only flags the user typed override the
    YAML file; the help text shows the dataclass default.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (inspect.getdoc(cls) or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, metavar="YAML",
                        help="YAML file of overrides (flags given here override it in turn)")
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = docs.get(f.name, "") + (f" (default: {default!r})" if f.name not in positional else "")
        help_text = help_text.replace("%", "%%")
        if f.name in positional:
            origin = get_origin(tp)
            nargs = "+" if origin in (list, tuple) else None
            inner = get_args(tp)[0] if nargs else tp
            parser.add_argument(f.name, type=_scalar_parser(inner), nargs=nargs, help=help_text)
            continue
        kwargs: dict[str, Any] = {"help": help_text, "dest": f.name}
        origin = get_origin(tp)
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if origin in (list, tuple):
            inner = get_args(tp)[0]
            kwargs["nargs"] = "*"
            kwargs["type"] = _scalar_parser(inner)
            if get_origin(inner) is Literal:
                kwargs["choices"] = get_args(inner)
        elif origin is dict or dataclasses.is_dataclass(tp):
            kwargs["type"] = yaml.safe_load
            kwargs["metavar"] = "YAML"
        else:
            kwargs["type"] = _scalar_parser(tp)
            if get_origin(tp) is Literal:
                kwargs["choices"] = get_args(tp)
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def from_dict(cls: type[T], data: dict[str, Any], origin: str = "config") -> T:
    """Build ``cls`` from a plain dict, recursing into nested dataclass fields."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{origin}: unknown key(s) {', '.join(unknown)} for {cls.__name__} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp, _ = _unwrap_optional(hints[name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, origin=f"{origin}.{name}")
        elif tp is Path and value is not None:
            value = Path(value)
        elif get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a config (paths as strings), saved beside every output."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(config))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None, positional: tuple[str, ...] = ()) -> T:
    """Defaults, then ``--config YAML``, then flags; returns a validated ``cls``."""
    parser = build_parser(cls, prog=prog, description=description, positional=positional)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    yaml_path = args.pop("config", None)
    origin = "command line"
    if yaml_path is not None:
        values = load_yaml(yaml_path)
        origin = str(yaml_path)
    values = merge(values, args)
    try:
        return from_dict(cls, values, origin=origin)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
