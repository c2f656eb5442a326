"""Smoke test of the example scripts with a tiny budget, asserting on what they write."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _run_pipeline(out: Path, *budget: str) -> dict:
    """examples/rlhf_pipeline.py in a subprocess (1 thread); its summary.json."""
    import json

    subprocess.run(
        [sys.executable, str(EXAMPLES / "rlhf_pipeline.py"), "--out", str(out), "--threads", "1", *budget],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    )
    return json.loads((out / "summary.json").read_text())


def test_rlhf_pipeline_example_smoke(tmp_path):
    """Every step of the pipeline runs and hands the next one a loadable folder (tiny budgets)."""
    s = _run_pipeline(
        tmp_path, "--demos", "64", "--sft-steps", "4", "--openings", "96", "--rl-tokens", "300", "--eval-prompts", "4"
    )
    for folder in ("sft", "reward_model"):
        assert (tmp_path / folder / "model.safetensors").is_file() and (tmp_path / folder / "tokenizer.json").is_file()
    assert s["pairs"]["train"] > 0 and s["rl_tokens"] >= 300
    assert {"base", "sft", "rl"} <= set(s) and s["sft"]["learned_reward"] is not None
    assert any((tmp_path / "runs").glob("TextGen__ppo__0__*/events.out.tfevents.*"))
    assert (tmp_path / "ppo" / "policy" / "model.safetensors").is_file()


@pytest.mark.slow
def test_rlhf_pipeline_example_learns(tmp_path):
    """SFT teaches the model to end its line; RL on the learned reward raises it, and the labeller's own score
    (the preference the reward model was trained on) rises with it, on held-out openings."""
    s = _run_pipeline(
        tmp_path,
        "--demos",
        "800",
        "--sft-steps",
        "60",
        "--openings",
        "1200",
        "--rl-tokens",
        "20000",
        "--kl-coef",
        "0.05",
    )
    assert s["sft"]["ended"] > s["base"]["ended"] + 0.3, s
    assert s["rm_heldout_accuracy"][1] > 0.55, s
    assert s["rl"]["learned_reward"] > s["sft"]["learned_reward"] + 0.3, s
    assert s["rl"]["labeller"] > s["sft"]["labeller"] + 0.05, s
