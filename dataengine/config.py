"""Typed dataclass configs that generate the command line, its ``--help`` and YAML overrides.

Every command's settings are one dataclass whose fields carry attribute docstrings::

    @dataclass
    class BuildConfig:
        frames: int = 50
        \"\"\"Frames sampled uniformly per video.\"\"\"

``build_parser(BuildConfig)`` turns the fields into ``--frames`` options (help text from the
docstring, choices from ``Literal``, ``nargs`` from lists, ``--x/--no-x`` for booleans), and
``parse_config`` applies, in order: field defaults, then ``--config FILE.yaml``, then the
command-line flags.

**Values are checked against the field's type** before the dataclass is built, wherever they
come from (YAML file, flags, :func:`from_dict`), by :func:`coerce`:

- ``int``: an int, or text/float that is a whole number (``"8"``, ``1e3`` → 1000); ``2.5``
  and ``true`` are refused.
- ``float``: a number, or text that is one (PyYAML reads ``1e-4`` without a dot as the
  string ``"1e-4"``: it becomes 0.0001); booleans are refused.
- ``bool``: a boolean, or ``true/false/yes/no/on/off/1/0`` as text.
- ``str``: text only (a YAML number or boolean is refused: quote it); ``Path``: text.
- ``Literal[...]``: one of the listed values (text from a flag is converted to the values'
  type first); ``X | None``: ``null`` or an ``X``; ``list[X]``/``tuple[X, ...]``: a list whose
  every item is an ``X``; ``dict[K, V]``: a mapping.
- a nested dataclass: a mapping, checked the same way, field by field.

Every problem of a file (unknown keys included) is collected and raised once as a
:class:`ConfigError` that names the file (or the flags) and each field; the range checks of
each dataclass's ``__post_init__`` (which collect their own problems with :func:`check` and
:func:`raise_problems`) run afterwards, and their error is prefixed with the same origin.

**Composition.** A config may be built from others in two ways, both supported:

- inheritance — ``class SFTConfig(TrainerBase)``: the base's fields (and their docstrings)
  are ordinary fields of the subclass: flags ``--lr``, YAML ``lr:``;
- a nested dataclass field — ``optim: OptimConfig = field(default_factory=OptimConfig)``:
  YAML gives a mapping (``optim: {lr: 1e-4}``, merged key by key over the file's other
  levels), and each nested field is also a dotted flag, ``--optim.lr 1e-4`` (help from the
  nested class's docstrings), or the whole mapping as YAML text, ``--optim '{lr: 1e-4}'``.
  Problems inside it are named by their path (``optim.lr``). :func:`to_dict` writes nested
  mappings back.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
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


def _init_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a user sets (``init`` fields not starting with ``_``)."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


# ------------------------------------------------------------------------------ coercion

class _Bad(Exception):
    """One value does not fit its field's type (the message says what was expected)."""


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _Bad(f"expected true or false, got {_shown(value)}")


def _to_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _Bad(f"expected a number, got {_shown(value)}")


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number: float | None = None
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                pass
    if number is not None and math.isfinite(number) and number.is_integer():
        return int(number)
    raise _Bad(f"expected a whole number, got {_shown(value)}")


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Bad(f"expected text, got {_shown(value)} (quote it in YAML)")


def _to_path(value: Any) -> Path:
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise _Bad(f"expected a path, got {_shown(value)} (quote it in YAML)")


def _to_literal(value: Any, choices: tuple[Any, ...]) -> Any:
    if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
        return value
    if isinstance(value, str):  # a flag's text: convert to the type of the choices
        for choice in choices:
            try:
                converted = _coerce_scalar(value, type(choice))
            except _Bad:
                continue
            if converted == choice:
                return choice
    raise _Bad(f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, Path: _to_path}


def _coerce_scalar(value: Any, tp: type) -> Any:
    return _SCALARS[tp](value)


def coerce(value: Any, tp: Any, where: str = "value") -> Any:
    """``value`` converted to type ``tp`` (see the module docstring); raises
    :class:`ConfigError` naming ``where``. Types it does not know pass values through."""
    problems: list[str] = []
    out = _coerce(value, tp, where, problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return out


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """``value`` as ``tp``; problems are appended as ``where: message``."""
    try:
        return _coerce_one(value, tp, where, problems)
    except _Bad as exc:
        problems.append(f"{where}: {exc}")
        return value


def _coerce_one(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    if tp is Any or isinstance(tp, (str, TypeVar)):
        return value
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:  # the first that fits
            trial: list[str] = []
            out = _coerce(value, option, where, trial)
            if not trial:
                return out
        if len(options) == 1:
            return _coerce_one(value, options[0], where, problems)
        raise _Bad(f"expected {' or '.join(_type_name(a) for a in args)}, got {_shown(value)}")
    if value is None:
        raise _Bad(f"expected {_type_name(tp)}, got null")
    if origin is Literal:
        return _to_literal(value, get_args(tp))
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Bad(f"expected a list, got {_shown(value)} (write [{value}])")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Bad(f"expected a list of {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return (origin or tp)(items) if (origin or tp) is not list else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Bad(f"expected a mapping, got {_shown(value)}")
        args = get_args(tp) or (Any, Any)
        return {_coerce(k, args[0], f"{where} key", problems): _coerce(v, args[1], f"{where}.{k}", problems)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Bad(f"expected a mapping of {tp.__name__} fields, got {_shown(value)}")
        kwargs, inner = _coerce_fields(tp, value, where + ".")
        problems.extend(inner)
        if inner:
            return value
        try:
            return tp(**kwargs)
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
            return value
    if tp in _SCALARS:
        return _coerce_scalar(value, tp)
    return value


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce_fields(cls: type, data: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """(field values converted to their types, problems) for the keys of ``data``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in _init_fields(cls)]
    problems: list[str] = []
    unknown = sorted((str(k) for k in data if k not in names), key=str)
    if unknown:
        problems.append(f"unknown key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__} "
                        f"(known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, hints[name], prefix + name, problems)
              for name, value in data.items() if name in names}
    return kwargs, problems


# ------------------------------------------------------------------------------ the command line

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(tp: Any) -> str | None:
    if get_origin(tp) is Literal:
        return "{" + ",".join(str(c) for c in get_args(tp)) + "}"
    return None


def _add_options(parser: argparse.ArgumentParser, cls: type, prefix: str, positional: tuple[str, ...]) -> None:
    """One option per field; a nested dataclass adds ``--name.field`` options (and ``--name YAML``).

    Every value is taken as text and converted by :func:`coerce` with the YAML's values, so a
    flag and a YAML key obey the same rules and report problems together."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in _init_fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        dest = prefix + f.name
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        is_positional = not prefix and f.name in positional
        help_text = docs.get(f.name, "") + ("" if is_positional else f" (default: {default!r})")
        help_text = help_text.replace("%", "%%")
        origin = get_origin(tp)
        sequence = origin in (list, tuple)
        inner = get_args(tp)[0] if sequence and get_args(tp) else tp
        if is_positional:
            parser.add_argument(f.name, type=str, nargs="+" if sequence else None, help=help_text,
                                metavar=_metavar(inner))
            continue
        kwargs: dict[str, Any] = {"help": help_text, "dest": dest}
        if tp is bool:
            flags = [_flag(dest)] if not prefix else ["--" + dest]
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if sequence:
            kwargs.update(nargs="*", type=str, metavar=_metavar(inner))
        elif origin is dict or dataclasses.is_dataclass(tp):
            kwargs.update(type=_yaml_text, metavar="YAML")
        else:
            kwargs.update(type=str, metavar=_metavar(tp))
        parser.add_argument(_flag(f.name) if not prefix else "--" + dest, **kwargs)
        if dataclasses.is_dataclass(tp):
            _add_options(parser, tp, dest + ".", positional)


def _yaml_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not YAML: {exc}") from None


def build_parser(cls: type, prog: str | None = None, description: str | None = None,
                 positional: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser whose options are the dataclass's fields.

    Options default to ``argparse.SUPPRESS`` so that only flags the user typed override the
    YAML file; the help text shows the dataclass default.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (inspect.getdoc(cls) or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, metavar="YAML",
                        help="YAML file of overrides (flags given here override it in turn)")
    _add_options(parser, cls, "", positional)
    return parser


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": x}`` -> ``{"optim": {"lr": x}}`` (dotted flags of nested fields)."""
    out: dict[str, Any] = {}
    for key in sorted(flat, key=lambda k: k.count(".")):  # `--optim YAML` first, its dotted flags over it
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        value = flat[key]
        node[leaf] = merge(node[leaf], value) if isinstance(value, dict) and isinstance(node.get(leaf), dict) \
            else value
    return out


def _flag_names(problem: str) -> str:
    """A problem about field ``a.b_c`` as the flag the user typed, ``--a.b-c``."""
    field_path, sep, rest = problem.partition(": ")
    if not sep or " " in field_path:
        return problem
    head, *tail = field_path.split(".")
    flag = _flag(head) + "".join("." + t for t in tail)
    return f"{flag}: {rest}"


# ------------------------------------------------------------------------------ building configs

def from_dict(cls: type[T], data: dict[str, Any] | None, origin: str = "config") -> T:
    """Build ``cls`` from a plain dict: every value converted to its field's type, nested
    dataclasses recursed into; all problems raised together as one :class:`ConfigError`
    whose message starts with ``origin`` (the file name) and names each field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping, got {type(data).__name__}")
    kwargs, problems = _coerce_fields(cls, data)
    _raise_at(origin, cls, problems)
    return _construct(cls, kwargs, origin)


def _raise_at(origin: str, cls: type, problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(f"{origin}: {problems[0]}")
    if problems:
        raise ConfigError(f"{origin}: {len(problems)} problems in the {cls.__name__} settings:\n  - "
                          + "\n  - ".join(problems))


def _construct(cls: type[T], kwargs: dict[str, Any], origin: str) -> T:
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # the dataclass's own range checks
        raise ConfigError(f"{origin}: {exc}") from None


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
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    """``cls`` from a YAML file alone (defaults for what it does not set); errors name the file."""
    return from_dict(cls, load_yaml(path), origin=str(path))


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None, positional: tuple[str, ...] = ()) -> T:
    """Defaults, then ``--config YAML``, then flags; returns a checked ``cls``.

    The YAML file's values and the flags are each converted to their fields' types; every
    problem of both is reported in one error (the file's named by the file, the flags' by
    the flag), through ``parser.error`` (exit status 2)."""
    parser = build_parser(cls, prog=prog, description=description, positional=positional)
    args = vars(parser.parse_args(argv))
    yaml_path = args.pop("config", None)
    flags = _nest(args)
    try:
        from_file = load_yaml(yaml_path) if yaml_path is not None else {}
        file_problems = _coerce_fields(cls, from_file)[1]
        flag_problems = _coerce_fields(cls, flags)[1]
        messages = [f"{yaml_path}: {p}" for p in file_problems] + \
                   [f"command line: {_flag_names(p)}" for p in flag_problems]
        if len(messages) == 1:
            raise ConfigError(messages[0])
        if messages:
            raise ConfigError(f"{len(messages)} problems in the {cls.__name__} settings:\n  - "
                              + "\n  - ".join(messages))
        origin = f"{yaml_path} and the command line" if yaml_path is not None and flags else \
            str(yaml_path) if yaml_path is not None else "command line"
        # each part is sound; merged raw (a flag inside a nested field keeps the file's others)
        return from_dict(cls, merge(from_file, flags), origin=origin)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
