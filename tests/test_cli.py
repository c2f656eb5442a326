"""The `textrl` command: `generate` and `pretrain` in-process, and the installed console script once each way."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import textrl
from textrl import generate, load_lm
from textrl.cli import main

SAMPLE_HEADER = re.compile(r"^--- sample (\d+) ---\n", re.MULTILINE)


def _samples(stdout: str) -> list[str]:
    """Split `textrl generate` output into its samples (which may themselves contain newlines)."""
    parts = SAMPLE_HEADER.split(stdout)
    assert parts[0] == "", stdout
    numbers, texts = parts[1::2], parts[2::2]
    assert numbers == [str(i) for i in range(1, len(numbers) + 1)]
    return [t.removesuffix("\n") for t in texts]


def _textrl_command() -> str:
    here = Path(sys.executable).parent / ("textrl.exe" if os.name == "nt" else "textrl")
    found = str(here) if here.exists() else shutil.which("textrl")
    assert found, "the `textrl` console script is not installed (pip install -e '.[test]')"
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([_textrl_command(), *args], capture_output=True, text=True, env=env, timeout=120)


# --- textrl generate --------------------------------------------------------------------------------------


def test_generate_prints_samples(gpt2_dir, capsys):
    argv = ["generate", "--lm", str(gpt2_dir), "--prompt", "Hello", "--num-samples", "3", "--max-new-tokens", "6"]
    assert main([*argv, "--temperature", "2.0"]) == 0
    first = _samples(capsys.readouterr().out)
    assert len(first) == 3 and all(s.startswith("Hello") for s in first)
    assert len(set(first)) > 1
    assert main([*argv, "--temperature", "2.0"]) == 0
    assert _samples(capsys.readouterr().out) == first  # --seed defaults to 0: reproducible
    assert main([*argv, "--temperature", "2.0", "--seed", "7"]) == 0
    assert _samples(capsys.readouterr().out) != first


def test_generate_matches_the_library(gpt2_dir, gpt2_lm, capsys):
    argv = ["generate", "--lm", str(gpt2_dir), "--prompt", "The old king", "--max-new-tokens", "5"]
    assert main([*argv, "--num-samples", "2", "--temperature", "0"]) == 0
    model, tokenizer = gpt2_lm
    greedy = generate(model, tokenizer, ["The old king"], max_new_tokens=5, temperature=0)[0]
    assert _samples(capsys.readouterr().out) == ["The old king" + greedy] * 2
    assert main([*argv, "--num-samples", "1", "--top-k", "5", "--top-p", "0.9", "--seed", "3"]) == 0
    sampled = generate(model, tokenizer, ["The old king"], max_new_tokens=5, top_k=5, top_p=0.9, seed=3)[0]
    assert _samples(capsys.readouterr().out) == ["The old king" + sampled]


def test_generate_bad_lm_is_a_clean_error(tmp_path, capsys):
    assert main(["generate", "--lm", str(tmp_path / "nope"), "--prompt", "Hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("textrl generate: error: model folder not found")
    assert str(tmp_path / "nope") in captured.err
    assert "Traceback" not in captured.err


def test_generate_hub_id_offline(offline_hub, capsys):
    assert main(["generate", "--lm", "some-org/definitely-not-cached-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textrl generate: error: 'some-org/definitely-not-cached-model' is not an embedded model")
    assert "local folder" in err and "Traceback" not in err


def test_generate_encoder_only_and_context_errors(bert_dir, gpt2_dir, capsys):
    assert main(["generate", "--lm", str(bert_dir)]) == 2
    assert "not a causal language model" in capsys.readouterr().err
    assert main(["generate", "--lm", str(gpt2_dir), "--max-new-tokens", "500"]) == 2
    assert "exceeds the model's context of 64 tokens" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    for argv in (["generate", "--max-new-tokens", "many"], ["pretrain", "--progress", "maybe"], [], ["fly"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "usage: textrl" in capsys.readouterr().err


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--vocab-size INT Size of the byte-level BPE vocabulary, special tokens included. (default: 4096)" in text
    assert "--corpus [STR ...]" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "Sampling temperature (0 = greedy)." in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"textrl {textrl.__version__}"


# --- textrl pretrain --------------------------------------------------------------------------------------

TINY_BUDGET = [
    "--vocab-size", "280", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--context-length", "16",
    "--batch-size", "4", "--steps", "4", "--warmup-steps", "2", "--eval-interval", "2", "--save-interval", "0",
    "--heldout-fraction", "0.1", "--threads", "1", "--progress", "false",
]  # fmt: skip


def test_pretrain_writes_a_model_and_a_run(corpus_file, tmp_path, capsys):
    out, runs = tmp_path / "model", tmp_path / "runs"
    argv = ["pretrain", "--corpus", str(corpus_file), "--out", str(out), "--run-dir", str(runs), *TINY_BUDGET]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    summary = json.loads((out / "training_summary.json").read_text())
    assert f"held-out loss {summary['heldout_loss']:.3f}" in stdout
    assert f"unigram baseline {summary['unigram_loss']:.3f}" in stdout
    assert f"model saved to {out}" in stdout
    (run,) = runs.iterdir()
    assert f"TensorBoard logs in {run}" in stdout
    assert list(run.glob("events.out.tfevents.*"))
    config = json.loads((run / "config.json").read_text())
    assert config["corpus"] == [str(corpus_file)] and config["steps"] == 4 and config["n_embd"] == 16
    assert config["lr"] == 1e-3  # an absent flag keeps its default
    assert [step for step, _ in summary["eval_history"]] == [0, 2, 4]
    model, tokenizer = load_lm(out)
    assert model.config.n_embd == 16 and model.config.n_positions == 16 and len(tokenizer) == 280
    assert "| held-out loss |" in (out / "README.md").read_text()


def test_pretrain_missing_corpus_is_a_clean_error(tmp_path, capsys):
    argv = ["pretrain", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m"), *TINY_BUDGET]
    assert main([*argv, "--run-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textrl pretrain: error: corpus file not found") and "missing.txt" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "runs").exists()


# --- the installed console script ---------------------------------------------------------------------------


def test_installed_command_generates(gpt2_dir):
    result = _run("generate", "--lm", str(gpt2_dir), "--prompt", "Hello", "--num-samples", "2", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    samples = _samples(result.stdout)
    assert len(samples) == 2 and all(s.startswith("Hello") for s in samples)


def test_installed_command_bad_lm_exits_2(tmp_path):
    result = _run("generate", "--lm", str(tmp_path / "no-such-model"), "--prompt", "Hello")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "textrl generate: error: model folder not found" in result.stderr
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr
