"""The `textrl` command: `generate`, `export`, `pretrain` and `train`'s config files and errors in-process, and
the installed console script (its output free of library noise)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import agents.cli
import textrl
from agents.cli import _join_negative_values, main
from textrl import generate, load_lm
from textrl.device import resolve_device
from textrl.lm import cut_at_stop

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
    assert "`textrl generate` takes 0 for greedy" in " ".join(capsys.readouterr().out.split())
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


def test_installed_command_prints_no_library_noise(llama_dir, tmp_path):
    """No "Loading weights" bar, no deprecation warning and no progress bar with --progress 0 (Llama: the
    generic HF core and HF generate)."""
    factory = _env_file(tmp_path, llama_dir)
    argv = ["--env", f"{factory}:make", *TINY_TRAIN, "--tensorboard-log", str(tmp_path / "runs"), "--progress", "0"]
    for result in (_run("train", *argv), _run("generate", "--lm", str(llama_dir), "--max-new-tokens", "4")):
        assert result.returncode == 0, result.stderr
        assert "Loading weights" not in result.stderr, result.stderr
        assert "deprecat" not in result.stderr.lower(), result.stderr
        assert "it/s" not in result.stderr and "%|" not in result.stderr, result.stderr  # no tqdm bar
    assert "Loading weights" not in result.stdout and "--- sample 1 ---" in result.stdout


# --- textrl train: config files, negative numbers, one-line errors, --debug ---------------------------------

TINY_TRAIN = ["--agent", "reinforce", "--batch-size", "4", "--group-size", "2", "--total-timesteps", "8"]
"""One REINFORCE iteration of 4 episodes of at most 4 tokens."""


def _env_file(folder: Path, lm_dir: Path, name: str = "my_env.py", extra: str = "") -> Path:
    """A factory file `make(max_new_tokens=4)` for an env on the model in ``lm_dir``, plus ``extra`` source."""
    path = folder / name
    path.write_text(
        "from envs import TextGenEnv\n\n\n"
        "def make(max_new_tokens=4):\n"
        f"    return TextGenEnv(lm={str(lm_dir)!r}, prompts=['The king'], reward='keyword_reward',"
        " max_new_tokens=max_new_tokens)\n" + extra
    )
    return path


def _toml(settings: dict) -> str:
    """Settings as TOML (JSON scalars and lists are TOML too; a dict becomes a table)."""
    scalars = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items() if not isinstance(v, dict))
    tables = "".join(
        f"[{k}]\n" + "".join(f"{a} = {json.dumps(b)}\n" for a, b in v.items())
        for k, v in settings.items()
        if isinstance(v, dict)
    )
    return scalars + tables


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_train_config_file_reaches_the_run_and_flags_override_it(suffix, gpt2_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    settings = {
        "env": f"{_env_file(tmp_path, gpt2_dir)}:make",
        "env_kwargs": {"max_new_tokens": 3},  # a mapping: JSON for --env-kwargs
        "agent": "reinforce",  # the file's agent decides which keys are valid: baseline is REINFORCE's
        "baseline": "grpo",
        "batch-size": 4,
        "group_size": 2,
        "kl-coef": 0.05,
        "learning_rate": 0.001,
        "suppress_tokens": [0, 1],
        "total_timesteps": 8,
        "tensorboard_log": str(runs),
        "progress": False,
    }
    config = tmp_path / f"run{suffix}"
    config.write_text(yaml.safe_dump(settings) if suffix == ".yaml" else _toml(settings))
    assert main(["train", "--config", str(config), "--learning-rate", "2e-3"]) == 0
    assert "reward (mean per episode): first iteration" in capsys.readouterr().out
    (run,) = runs.iterdir()
    assert run.name.startswith("my_env__reinforce__0__")
    saved = json.loads((run / "config.json").read_text())
    assert saved["learning_rate"] == 2e-3  # the flag wins over the file
    assert saved["kl_coef"] == 0.05 and saved["batch_size"] == 4 and saved["group_size"] == 2
    assert saved["baseline"] == "grpo" and saved["suppress_tokens"] == [0, 1]
    (checkpoint,) = (run / "checkpoints").glob("step-*")
    assert json.loads((checkpoint / "state.json").read_text())["env_kwargs"]["max_new_tokens"] == 3


def test_config_file_works_for_generate_too(gpt2_dir, tmp_path, capsys):
    config = tmp_path / "gen.yml"
    config.write_text(f"lm: {gpt2_dir}\nprompt: Hello\nnum-samples: 3\nmax_new_tokens: 3\nstop: []\n")
    assert main(["generate", "--num-samples", "1", "--config", str(config)]) == 0
    samples = _samples(capsys.readouterr().out)
    assert len(samples) == 1 and samples[0].startswith("Hello")


def test_config_file_errors_are_one_line(tmp_path, capsys):
    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
        return captured.err

    config = tmp_path / "run.yaml"
    config.write_text("agent: reinforce\nkl-coeff: 0.1\n")
    err = error(["train", "--config", str(config)])
    assert err.startswith(f"textrl train: error: config file {config}: unknown key 'kl_coeff'")
    assert "(did you mean 'kl_coef'?)" in err and re.search(r"valid keys: (\w+, )*agent, ", err) and "baseline" in err
    config.write_text("clip_range: 0.1\n")  # PPO's, but --agent on the command line says REINFORCE
    assert "unknown key 'clip_range' for `textrl train --agent reinforce`" in error(
        ["train", "--agent", "reinforce", "--config", str(config)]
    )
    err = error(["train", "--config", str(tmp_path / "missing.toml")])
    assert err == f"textrl train: error: config file not found: {tmp_path / 'missing.toml'}\n"
    config.write_text("agent: ppo\n  seed: 1\n")
    assert f"cannot parse config file {config} (YAML): line 2, column" in error(["train", "--config", str(config)])
    bad_toml = tmp_path / "run.toml"
    bad_toml.write_text('agent = "ppo"\nseed = \n')
    assert f"cannot parse config file {bad_toml} (TOML): " in (err := error(["generate", "--config", str(bad_toml)]))
    assert "line 2" in err


def test_negative_numbers_are_values(tmp_path, capsys):
    assert _join_negative_values(
        ["train", "--top-p", "-.5", "--seed", "-3", "--kl-coef", "-inf", "--prompt", "-x", "--x=-1", "--", "--a", "-1"]
    ) == ["train", "--top-p=-.5", "--seed=-3", "--kl-coef=-inf", "--prompt", "-x", "--x=-1", "--", "--a", "-1"]
    for flag, value, message in [
        ("--learning-rate", "-1e-4", "learning_rate must be > 0"),
        ("--kl-coef", "-inf", "kl_coef must be a finite number, got -inf"),
        ("--total-timesteps", "-5", "total_timesteps must be >= 1, got -5"),
    ]:
        assert main(["train", "--agent", "reinforce", flag, value, "--tensorboard-log", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("textrl train: error: ") and message in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    factory = tmp_path / "broken_env.py"
    factory.write_text("def make():\n    return 1 / 0\n")
    argv = ["train", "--env", f"{factory}:make", "--tensorboard-log", str(tmp_path / "runs")]
    monkeypatch.delenv("TEXTRL_DEBUG", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("textrl train: error: the env factory") and "ZeroDivisionError: division by zero" in err
    for debug_argv in ([*argv, "--debug"], ["--debug", *argv]):
        assert main(debug_argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and 'broken_env.py", line 2, in make' in err
        assert err.splitlines()[-1].startswith("textrl train: error: the env factory")
    monkeypatch.setenv("TEXTRL_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_naming_its_type(monkeypatch, capsys):
    def lost(args):
        raise KeyError("lost")

    monkeypatch.setattr(agents.cli, "_generate", lost)
    monkeypatch.delenv("TEXTRL_DEBUG", raising=False)
    assert main(["generate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textrl generate: error: KeyError: 'lost' (") and err.count("\n") == 1
    assert err.endswith(" (--debug shows the traceback)\n")
    assert "test_cli.py, line" in err  # raised in a file outside textrl: named as the user's code


@pytest.mark.parametrize(
    ("source", "message", "line"),
    [
        ("import no_such_module_for_textrl\n", "importing the env file", 1),
        ("\n\ndef make(:\n    pass\n", "importing the env file", 3),  # SyntaxError
        ("def helper():\n    return {}['missing']\n\n\ndef make():\n    return helper()\n", "the env factory", 2),
    ],
)
def test_an_error_in_the_env_file_names_its_line(source, message, line, tmp_path, capsys):
    factory = tmp_path / "user_env.py"
    factory.write_text(source)
    assert main(["train", "--env", f"{factory}:make", "--tensorboard-log", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"textrl train: error: {message}") and err.count("\n") == 1, err
    assert f"user_env.py, line {line}" in err


def test_a_raising_reward_in_the_env_file_names_its_line(gpt2_dir, tmp_path, capsys):
    reward = "\n\ndef fussy(completions, **kwargs):\n    return [1 / (len(c) - len(c)) for c in completions]\n"
    factory = _env_file(tmp_path, gpt2_dir, extra=reward)
    factory.write_text(factory.read_text().replace("reward='keyword_reward'", "reward=fussy"))
    line = factory.read_text().splitlines().index("    return [1 / (len(c) - len(c)) for c in completions]") + 1
    argv = ["train", "--env", f"{factory}:make", *TINY_TRAIN, "--tensorboard-log", str(tmp_path), "--progress", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("textrl train: error: sequence reward 'fussy' raised ZeroDivisionError"), err
    assert err.count("\n") == 1 and f"my_env.py, line {line}" in err


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    for name in ("gpu", "cuda:x", "tpu", "", "mps:1"):
        with pytest.raises(ValueError, match=r"unknown device .*; use 'auto' .*'cpu', 'cuda', 'cuda:N' .* or 'mps'"):
            resolve_device(name)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not available on this machine \(this PyTorch "):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    with pytest.raises(
        ValueError, match=r"CUDA is not available on this machine \(no CUDA GPU found\); use --device cpu"
    ):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'mps': MPS is not available on this machine"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device 'cuda:2': this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"this machine has 1 CUDA GPU \(cuda:0\)"):
        resolve_device("cuda:1")


def test_a_bad_device_is_a_one_line_error(gpt2_dir, tmp_path, capsys):
    factory = _env_file(tmp_path, gpt2_dir)
    argv = ["train", "--env", f"{factory}:make", *TINY_TRAIN, "--device", "gpu", "--progress", "0"]
    assert main([*argv, "--tensorboard-log", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textrl train: error: ") and "gpu" in err and err.count("\n") == 1, err


# --- runs and checkpoints: textrl generate --lm RUN, textrl export ------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(gpt2_dir, tmp_path_factory) -> Path:
    """A run folder with one checkpoint, from `textrl train` with a tiny budget."""
    folder = tmp_path_factory.mktemp("tiny_run")
    factory = _env_file(folder, gpt2_dir)
    runs = folder / "runs"
    argv = ["train", "--env", f"{factory}:make", *TINY_TRAIN, "--tensorboard-log", str(runs), "--progress", "0"]
    assert main(argv) == 0
    (run,) = runs.iterdir()
    return run


def test_generate_from_a_run_or_a_checkpoint(tiny_run, capsys):
    (checkpoint,) = (tiny_run / "checkpoints").glob("step-*")
    argv = ["--prompt", "The king", "--num-samples", "2", "--max-new-tokens", "5", "--temperature", "2.0"]
    outputs = []
    for lm in (tiny_run, checkpoint, checkpoint / "policy"):
        assert main(["generate", "--lm", str(lm), *argv]) == 0
        outputs.append(_samples(capsys.readouterr().out))
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 2
    model, tokenizer = load_lm(checkpoint / "policy")
    texts = generate(model, tokenizer, ["The king"], max_new_tokens=5, temperature=2.0, num_return_sequences=2, seed=0)
    assert outputs[0] == ["The king" + t for t in texts]


def test_generate_stop(gpt2_dir, capsys):
    argv = ["generate", "--lm", str(gpt2_dir), "--prompt", "Hello", "--num-samples", "3", "--max-new-tokens", "12"]
    assert main([*argv, "--temperature", "2.0"]) == 0
    free = [s.removeprefix("Hello") for s in _samples(capsys.readouterr().out)]
    stop = next(c for c in free[0][1:] if c.isascii() and c.isalpha())
    assert main([*argv, "--temperature", "2.0", "--stop", stop, "zq"]) == 0
    stopped = [s.removeprefix("Hello") for s in _samples(capsys.readouterr().out)]
    assert stopped == [cut_at_stop(text, [stop, "zq"]) for text in free]
    assert stopped[0].endswith(stop) and stopped[0].count(stop) == 1 and len(stopped[0]) < len(free[0])


def test_export_round_trip(tiny_run, tmp_path, capsys):
    (checkpoint,) = (tiny_run / "checkpoints").glob("step-*")
    out = tmp_path / "hf-model"
    assert main(["export", str(tiny_run), str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"exported {checkpoint} to {out}:\n")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert f"  {name} (" in stdout and (out / name).is_file()
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers alone, no textrl code
    tokenizer = AutoTokenizer.from_pretrained(out)
    policy = AutoModelForCausalLM.from_pretrained(checkpoint / "policy")
    ids = tokenizer(["The king sees the queen"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, policy(ids).logits)
    assert str(checkpoint) in (out / "README.md").read_text()
    assert main(["export", str(checkpoint), str(out)]) == 2
    assert f"{out} is not empty; pass --force" in capsys.readouterr().err
    assert main(["export", str(checkpoint), str(out), "--force"]) == 0
    assert main(["export", str(tiny_run.parent / "nothing-here"), str(tmp_path / "x")]) == 2
    assert "model folder not found" in capsys.readouterr().err
