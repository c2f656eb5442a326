"""textrl.config: one dataclass gives the field docs, the command-line flags and the run record."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from agents.cli import ExportConfig, GenerateConfig
from textrl.config import (
    ConfigFileError,
    add_dataclass_args,
    config_markdown,
    field_docs,
    from_args,
    load_config_file,
    save_config,
)
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
    for cls in (PretrainConfig, GenerateConfig, ExportConfig):
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


# --- config files -------------------------------------------------------------------------------------------


def test_load_yaml_and_toml_config_files(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("kl-coef: 0.05\nlearning_rate: 1e-4\ntags: [a, b]\nenv_kwargs:\n  reward: keyword_reward\n")
    toml_file = tmp_path / "run.toml"
    toml_file.write_text(
        'kl-coef = 0.05\nlearning_rate = 1e-4\ntags = ["a", "b"]\n[env_kwargs]\nreward = "keyword_reward"\n'
    )
    expected = {"kl_coef": 0.05, "tags": ["a", "b"], "env_kwargs": {"reward": "keyword_reward"}}
    from_yaml, from_toml = load_config_file(yaml_file), load_config_file(toml_file)
    assert from_yaml == {**expected, "learning_rate": "1e-4"}  # YAML 1.1 reads 1e-4 as text; the flag parses it
    assert from_toml == {**expected, "learning_rate": 1e-4}
    (tmp_path / "empty.yml").write_text("# nothing set\n")
    assert load_config_file(tmp_path / "empty.yml") == {}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "seed: 1\nsteps: [1, 2\nlr: 3\n", r"cannot parse config file .*bad\.yaml \(YAML\): line 3, col"),
        ("bad.yml", "seed: 1\n  steps: 2\n", r"cannot parse config file .*bad\.yml \(YAML\): line 2, column 8"),
        ("bad.toml", "seed = 1\nsteps = \n", r"cannot parse config file .*bad\.toml \(TOML\): .*line 2"),
        ("list.yaml", "- seed\n- steps\n", r"list\.yaml must be a table of settings \(key: value\), not a list"),
        ("twice.toml", "kl_coef = 1\nkl-coef = 2\n", r"twice\.toml sets 'kl_coef' twice"),
        ("run.json", "{}", r"run\.json must end in \.yaml, \.yml, \.toml"),
    ],
)
def test_bad_config_files_are_named_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigFileError, match=message):
        load_config_file(tmp_path / name)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigFileError, match=r"config file not found: .*nope\.yaml"):
        load_config_file(tmp_path / "nope.yaml")
    assert issubclass(ConfigFileError, ValueError)  # the CLI prints it as a one-line error


def test_argparse_names_the_expected_type():
    parser = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    add_dataclass_args(parser, Toy)
    with pytest.raises(argparse.ArgumentError, match=r"invalid int value: '1\.5'"):
        parser.parse_args(["--steps", "1.5"])
