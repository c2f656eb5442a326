"""The import contract: layers point one way, ``agents`` -> ``envs`` -> ``textrl`` (the core).

``textrl`` imports neither ``envs`` nor ``agents``; ``envs`` never imports ``agents``; the command line,
which wires all three, lives in the top layer (``agents.cli``). The contract is import-linter's, configured
in pyproject.toml; imports inside functions count as much as module-level ones.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120)


def test_the_layers_point_one_way():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("where", "line"),
    [
        ("textrl/core.py", "import envs"),
        ("textrl/rollout.py", "from agents import PPO"),
        ("envs/task.py", "import agents"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, where, line):
    """The same contract on a copy of the packages with one upward import planted inside a function."""
    for package in ("textrl", "envs", "agents"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("models", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / where, "a") as f:
        f.write(f"\n\ndef _planted():\n    {line}  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr
    assert where.replace("/", ".").removesuffix(".py") in result.stdout
