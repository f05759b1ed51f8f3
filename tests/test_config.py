"""Typed configs: CLI from fields, help from docstrings, YAML overrides, collected errors."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from dataengine import config as cfg


@dataclass
class Inner:
    lr: float = 1e-4
    """Peak learning rate."""


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
    optim: Inner = field(default_factory=Inner)
    """Optimiser settings."""

    def __post_init__(self):
        problems = []
        cfg.check(problems, self.count >= 0, "count must be >= 0")
        cfg.check(problems, self.name != "bad", "name must not be 'bad'")
        cfg.raise_problems(problems, "demo config")


def test_help_comes_from_docstrings(capsys):
    with pytest.raises(SystemExit):
        cfg.parse_config(Demo, ["--help"], prog="demo")
    out = capsys.readouterr().out
    assert "How many." in out and "--no-flag" in out and "{a,b}" in out and "Stages in order." in out


def test_flags_override_yaml_override_defaults(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("count: 7\nmode: b\noptim: {lr: 0.5}\nstages: [hard]\n")
    c = cfg.parse_config(Demo, ["--config", str(yaml_file), "--count", "9", "--flag"])
    assert (c.count, c.mode, c.optim.lr, c.stages, c.flag, c.name) == (9, "b", 0.5, ["hard"], True, "x")
    assert cfg.to_dict(c)["optim"] == {"lr": 0.5}


def test_unknown_yaml_key_names_file(tmp_path, capsys):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("cuont: 7\n")
    with pytest.raises(SystemExit):
        cfg.parse_config(Demo, ["--config", str(yaml_file)])
    assert "c.yaml: unknown key(s) cuont" in capsys.readouterr().err


def test_all_problems_reported_at_once():
    with pytest.raises(cfg.ConfigError) as info:
        Demo(count=-1, name="bad")
    assert "count must be" in str(info.value) and "name must not" in str(info.value)


def test_bad_choice_rejected(capsys):
    with pytest.raises(SystemExit):
        cfg.parse_config(Demo, ["--mode", "z"])
    assert "invalid choice" in capsys.readouterr().err


def test_optional_int_and_lists():
    c = cfg.parse_config(Demo, ["--limit", "4", "--stages", "easy"])
    assert c.limit == 4 and c.stages == ["easy"]
