"""Typed configs: CLI from fields, help from docstrings, YAML overrides, values checked by
type, every problem reported at once, nested and inherited configs, every shipped YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from dataengine import config as cfg

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Inner:
    lr: float = 1e-4
    """Peak learning rate."""
    warmup: int = 0
    """Warm-up steps."""


@dataclass
class Demo:
    """A demo command."""

    name: str = "x"
    """What to call it."""
    count: int = 3
    """How many."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    stages: list[str] = field(default_factory=lambda: ["easy", "hard"])
    """Stages in order."""
    flag: bool = False
    """Turn it on."""
    limit: int | None = None
    """Optional limit."""
    ratio: float = 0.5
    """A fraction."""
    out: Path = Path("runs/x")
    """Where to write."""
    zero: Literal[0, 2, 3] = 2
    """An int choice."""
    optim: Inner = field(default_factory=Inner)
    """Optimiser settings."""

    def __post_init__(self):
        problems = []
        cfg.check(problems, self.count >= 0, "count must be >= 0")
        cfg.check(problems, self.name != "bad", "name must not be 'bad'")
        cfg.raise_problems(problems, "demo config")


@dataclass
class Base:
    seed: int = 0
    """Seed of everything."""


@dataclass
class Derived(Base):
    """A config composed from a base by inheritance."""

    steps: int = 10
    """Steps to run."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def parse_error(capsys, argv: list[str], cls: type = Demo) -> str:
    with pytest.raises(SystemExit) as info:
        cfg.parse_config(cls, argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_help_comes_from_docstrings(capsys):
    with pytest.raises(SystemExit):
        cfg.parse_config(Demo, ["--help"], prog="demo")
    out = capsys.readouterr().out
    assert "How many." in out and "--no-flag" in out and "{a,b}" in out and "Stages in order." in out
    assert "--optim.lr" in out and "Peak learning rate." in out


def test_flags_override_yaml_override_defaults(tmp_path):
    yaml_file = write(tmp_path, "count: 7\nmode: b\noptim: {lr: 0.5}\nstages: [hard]\n")
    c = cfg.parse_config(Demo, ["--config", str(yaml_file), "--count", "9", "--flag"])
    assert (c.count, c.mode, c.optim.lr, c.stages, c.flag, c.name) == (9, "b", 0.5, ["hard"], True, "x")
    assert cfg.to_dict(c)["optim"] == {"lr": 0.5, "warmup": 0}


def test_yaml_values_are_converted_by_field_type(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; "8" quoted is text; 1e3 is a whole number
    yaml_file = write(tmp_path, "ratio: 1e-4\ncount: '8'\nlimit: 1.0e+3\nflag: 'yes'\nout: some/where\n"
                                "zero: 3\noptim: {lr: 2e-5, warmup: 5}\n")
    c = cfg.parse_config(Demo, ["--config", str(yaml_file)])
    assert c.ratio == pytest.approx(1e-4) and isinstance(c.ratio, float)
    assert c.count == 8 and c.limit == 1000 and isinstance(c.limit, int)
    assert c.flag is True and c.out == Path("some/where") and c.zero == 3
    assert c.optim == Inner(lr=2e-5, warmup=5)
    assert cfg.from_dict(Demo, {"limit": None}).limit is None
    assert cfg.from_dict(Demo, {"ratio": 1}).ratio == 1.0 and isinstance(cfg.from_dict(Demo, {"ratio": 1}).ratio, float)


def test_flags_obey_the_same_rules(capsys):
    c = cfg.parse_config(Demo, ["--ratio", "1e-4", "--zero", "3", "--limit", "4", "--stages", "easy",
                                "--optim.lr", "0.25", "--out", "o"])
    assert (c.ratio, c.zero, c.limit, c.stages, c.optim.lr, c.out) == (1e-4, 3, 4, ["easy"], 0.25, Path("o"))
    err = parse_error(capsys, ["--count", "2.5", "--zero", "1", "--optim.lr", "fast"])
    assert "3 problems" in err
    assert "command line: --count: expected a whole number, got str '2.5'" in err
    assert "--zero: expected one of 0, 2, 3, got '1'" in err
    assert "--optim.lr: expected a number, got str 'fast'" in err


def test_every_problem_of_a_file_is_named_at_once(tmp_path, capsys):
    yaml_file = write(tmp_path, "count: 2.5\nflag: maybe\nmode: c\nstages: easy\nname: 12\n"
                                "limit: [1]\ncuont: 1\noptim: {lr: x, wramup: 1}\nout: 5\n")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_dict(Demo, cfg.load_yaml(yaml_file), origin=str(yaml_file))
    text = str(info.value)
    assert text.startswith(f"{yaml_file}: 10 problems in the Demo settings")
    for expected in ("count: expected a whole number, got float 2.5",
                     "flag: expected true or false, got str 'maybe'",
                     "mode: expected one of 'a', 'b', got 'c'",
                     "stages: expected a list, got str 'easy'",
                     "name: expected text, got int 12 (quote it in YAML)",
                     "limit: expected a whole number, got list [1]",
                     "unknown key(s) cuont for Demo",
                     "optim.lr: expected a number, got str 'x'",
                     "unknown key(s) optim.wramup for Inner",
                     "out: expected a path, got int 5"):
        assert expected in text, expected
    # the same through the command line: exit 2, the file named
    err = parse_error(capsys, ["--config", str(yaml_file)])
    assert f"{yaml_file}: count: expected a whole number" in err


def test_booleans_are_not_numbers():
    with pytest.raises(cfg.ConfigError, match="count: expected a whole number, got bool True"):
        cfg.from_dict(Demo, {"count": True})
    with pytest.raises(cfg.ConfigError, match="ratio: expected a number, got bool False"):
        cfg.from_dict(Demo, {"ratio": False})
    with pytest.raises(cfg.ConfigError, match=r"stages\[1\]: expected text, got int 3"):
        cfg.from_dict(Demo, {"stages": ["easy", 3]})


def test_unknown_yaml_key_names_file(tmp_path, capsys):
    yaml_file = write(tmp_path, "cuont: 7\n")
    assert "c.yaml: unknown key(s) cuont" in parse_error(capsys, ["--config", str(yaml_file)])


def test_range_checks_run_after_types_and_name_the_origin(tmp_path, capsys):
    with pytest.raises(cfg.ConfigError) as info:
        Demo(count=-1, name="bad")
    assert "count must be" in str(info.value) and "name must not" in str(info.value)
    yaml_file = write(tmp_path, "count: -1\n")
    err = parse_error(capsys, ["--config", str(yaml_file)])
    assert f"{yaml_file}: invalid demo config" in err and "count must be >= 0" in err


def test_bad_choice_rejected(capsys):
    assert "--mode: expected one of 'a', 'b', got 'z'" in parse_error(capsys, ["--mode", "z"])


def test_nested_config_flags_and_yaml_merge(tmp_path):
    yaml_file = write(tmp_path, "optim: {lr: 0.5, warmup: 3}\n")
    c = cfg.parse_config(Demo, ["--config", str(yaml_file), "--optim.warmup", "7"])
    assert c.optim == Inner(lr=0.5, warmup=7)  # the flag overrides one nested key, the file keeps the other
    c = cfg.parse_config(Demo, ["--optim", "{lr: 0.1}"])
    assert c.optim == Inner(lr=0.1)


def test_inherited_fields_are_ordinary_fields(tmp_path, capsys):
    yaml_file = write(tmp_path, "seed: '3'\nsteps: 4\n")
    c = cfg.parse_config(Derived, ["--config", str(yaml_file), "--steps", "5"])
    assert (c.seed, c.steps) == (3, 5)
    with pytest.raises(SystemExit):
        cfg.parse_config(Derived, ["--help"])
    assert "Seed of everything." in capsys.readouterr().out


def test_coerce_and_load_config(tmp_path):
    assert cfg.coerce("3", int | None, "x") == 3 and cfg.coerce(None, int | None) is None
    assert cfg.coerce(["1", 2], tuple[int, ...]) == (1, 2)
    assert cfg.coerce({"a": "1"}, dict[str, float]) == {"a": 1.0}
    with pytest.raises(cfg.ConfigError, match=r"x\[0\]: expected a whole number"):
        cfg.coerce(["a"], list[int], "x")
    yaml_file = write(tmp_path, "count: 4\n")
    assert cfg.load_config(Demo, yaml_file).count == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("count: [\n")
    with pytest.raises(cfg.ConfigError, match="bad.yaml: not valid YAML"):
        cfg.load_yaml(bad)


# ----------------------------------------------------------------- every shipped YAML

def _command_for(stem: str) -> list[str]:
    """The ``vlmr`` command that reads ``train/configs/STEM.yaml``, from its name:
    ``sft_tiny`` -> ``train sft``, ``eval_synthetic_tiny`` -> ``eval synthetic``,
    ``narrate_tiny`` -> ``narrate``."""
    from tools.cli import COMMANDS, GROUPS

    words = stem.split("_")
    for k in (2, 1):
        if "-".join(words[:k]) in COMMANDS:
            return ["-".join(words[:k])]
    if words[0] in GROUPS and len(words) > 1 and words[1] in GROUPS[words[0]]:
        return [words[0], words[1]]
    for group, subs in GROUPS.items():
        if words[0] in subs:
            return [group, words[0]]
    raise AssertionError(f"train/configs/{stem}.yaml: no vlmr command matches its name; name it "
                         "COMMAND_anything.yaml (e.g. sft_big.yaml, eval_qa_msvd.yaml)")


class _Parsed(Exception):
    def __init__(self, config):
        self.config = config


@pytest.mark.parametrize("path", sorted((ROOT / "train" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads_into_its_command_config(path, monkeypatch):
    """Each YAML goes through its command's real entry point (``vlmr ... --config FILE``),
    stopped right after parsing: the file loads into that command's config class."""
    from tools import cli

    real = cfg.parse_config

    def parse_then_stop(cls, argv=None, *args, **kwargs):
        raise _Parsed(real(cls, argv, *args, **kwargs))

    monkeypatch.setattr(cfg, "parse_config", parse_then_stop)
    with pytest.raises(_Parsed) as parsed:
        cli.main([*_command_for(path.stem), "--config", str(path)])
    config = parsed.value.config
    assert set(cfg.load_yaml(path)) <= set(cfg.to_dict(config))
