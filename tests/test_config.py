"""textrl.config: one dataclass gives the field docs, the command-line flags and the run record."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from textrl.cli import GenerateConfig
from textrl.config import add_dataclass_args, config_markdown, field_docs, from_args, save_config
from textrl.pretrain import PretrainConfig


@dataclass
class Base:
    """A base config."""

    seed: int = 0
    """Random seed."""


@dataclass
class Toy(Base):
    """A config with one field of each supported kind."""

    lr: float = 3e-4
    """Learning rate
    of the optimiser."""
    steps: int = 10
    """Optimisation steps."""
    greedy: bool = False
    """Decode greedily."""
    name: str = "toy"
    """Run name."""
    tags: list[str] = field(default_factory=lambda: ["a", "b"])
    """Free-form tags."""
    sizes: list[int] = field(default_factory=list)
    """Layer sizes."""
    limit: int | None = None
    """Optional step limit."""
    out: Path = Path("runs")
    """Output folder."""
    mode: Literal["fast", "slow"] = "fast"
    """Speed mode."""
    undocumented: int = 1


def _parse(argv: list[str], cls: type = Toy):
    parser = argparse.ArgumentParser(prog="toy")
    add_dataclass_args(parser, cls)
    return from_args(cls, parser.parse_args(argv)), parser


def test_field_docs_reads_docstrings_including_inherited():
    docs = field_docs(Toy)
    assert docs["seed"] == "Random seed."
    assert docs["lr"] == "Learning rate of the optimiser."  # whitespace collapsed
    assert docs["mode"] == "Speed mode."
    assert "undocumented" not in docs


def test_every_shipped_config_field_is_documented():
    for cls in (PretrainConfig, GenerateConfig):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if not docs.get(f)]
        assert not missing, (cls.__name__, missing)


def test_help_contains_docstrings_and_defaults():
    _, parser = _parse([])
    text = " ".join(parser.format_help().split())
    assert "--lr FLOAT Learning rate of the optimiser. (default: 0.0003)" in text
    assert "--seed INT Random seed. (default: 0)" in text
    assert "--tags [STR ...] Free-form tags. (default: ['a', 'b'])" in text
    assert "--mode {fast,slow} Speed mode." in text


def test_absent_flags_keep_defaults():
    cfg, _ = _parse([])
    assert cfg == Toy()
    cfg, _ = _parse(["--steps", "5"])
    assert cfg == Toy(steps=5)


def test_parse_each_kind():
    cfg, _ = _parse(
        [
            "--lr", "1e-3",
            "--steps", "7",
            "--greedy", "yes",
            "--tags", "x", "y", "z",
            "--sizes", "64", "32",
            "--limit", "100",
            "--out", "elsewhere/run",
            "--mode", "slow",
            "--seed", "3",
        ]
    )  # fmt: skip
    assert cfg == Toy(
        lr=1e-3, steps=7, greedy=True, tags=["x", "y", "z"], sizes=[64, 32], limit=100,
        out=Path("elsewhere/run"), mode="slow", seed=3,
    )  # fmt: skip
    assert isinstance(cfg.lr, float) and isinstance(cfg.steps, int) and isinstance(cfg.out, Path)


@pytest.mark.parametrize(("text", "value"), [("true", True), ("1", True), ("on", True), ("False", False), ("0", False)])
def test_parse_bool(text, value):
    assert _parse(["--greedy", text])[0].greedy is value


def test_parse_optional_and_empty_list():
    assert _parse(["--limit", "none"])[0].limit is None
    assert _parse(["--limit", "5"])[0].limit == 5
    assert _parse(["--tags"])[0].tags == []


@pytest.mark.parametrize(
    "argv", [["--steps", "1.5"], ["--greedy", "maybe"], ["--mode", "medium"], ["--sizes", "a"], ["--nope", "1"]]
)
def test_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_overrides_win():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Toy)
    assert from_args(Toy, parser.parse_args(["--steps", "5"]), steps=9, name="x") == Toy(steps=9, name="x")


def test_skip_leaves_out_fields():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Toy, skip=("seed",))
    with pytest.raises(SystemExit):
        parser.parse_args(["--seed", "1"])


def test_config_markdown():
    table = config_markdown(Toy(steps=3, out=Path("a/b")))
    lines = table.splitlines()
    assert lines[:2] == ["|param|value|", "|-|-|"]
    assert "|steps|3|" in lines and "|out|a/b|" in lines and "|tags|['a', 'b']|" in lines
    assert len(lines) == 2 + len(Toy.__dataclass_fields__)


def test_save_config_round_trips(tmp_path):
    cfg = Toy(steps=3, tags=["q"], limit=None, out=Path("x/y"))
    path = save_config(cfg, tmp_path / "new" / "run")
    assert path == tmp_path / "new" / "run" / "config.json"
    data = json.loads(path.read_text())
    assert data == {
        "seed": 0, "lr": 3e-4, "steps": 3, "greedy": False, "name": "toy", "tags": ["q"], "sizes": [],
        "limit": None, "out": "x/y", "mode": "fast", "undocumented": 1,
    }  # fmt: skip
    assert Toy(**{**data, "out": Path(data["out"])}) == cfg  # a run is reproducible from its folder
