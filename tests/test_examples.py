"""Smoke test of the example scripts with a tiny budget, asserting on what they write."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_custom_reward_example_trains_saves_and_generates(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_reward.py"), "64"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    completions = ast.literal_eval(out.strip().splitlines()[-1])  # the printed list of two completions
    assert isinstance(completions, list) and len(completions) == 2 and all(isinstance(c, str) for c in completions)
    saved = tmp_path / "runs" / "love-ppo"
    assert (saved / "manifest.json").is_file() and (saved / "policy" / "model.safetensors").is_file()
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("TextGen__ppo__0__")]
    assert any(run.glob("events.out.tfevents.*"))


def test_the_guides_example_is_the_example_file():
    """The user guide (docs/guide/training.md) shows examples/custom_reward.py; keep the two in step (budget
    line aside)."""
    readme = (EXAMPLES.parent / "docs" / "guide" / "training.md").read_text()
    body = [
        line
        for line in (EXAMPLES / "custom_reward.py").read_text().splitlines()
        if line and not line.startswith(('"""', "import sys")) and "sys.argv" not in line
    ]
    for line in body:
        assert line in readme, line
