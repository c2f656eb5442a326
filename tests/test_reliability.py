"""Reliability: kill -9 and exact resume, corrupt checkpoints, non-finite guards, determinism, hostile input,
flat memory over long runs, and no pickle loading. The README's "Reliability" section lists what each proves."""

from __future__ import annotations

import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import agents.base
from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
from agents.base import BaseAgent
from agents.cli import main
from agents.guards import NonFiniteError
from agents.runner import resolve_resume
from envs import TextGenEnv, TextGenVectorEnv
from textrl import checkpoint as ckpt
from textrl.checkpoint import CheckpointError
from textrl.pretrain import train_tokenizer
from textrl.rewards import RewardError, immediate

PROMPTS = ["The old king", "The young queen", "The brave knight", "The quiet river"]
ROOT = Path(__file__).resolve().parent.parent


@immediate
def low_ids(new_token_ids):
    """A per-token reward that varies with the sampled tokens (so seeds give different rewards)."""
    return (new_token_ids < 100).astype(float)


@pytest.fixture
def env(gpt2_dir):
    return TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=low_ids, max_new_tokens=4)


def _config(cls, **kw):
    if cls is PPO:
        return PPOConfig(**{"batch_size": 4, "minibatch_size": 2, "n_epochs": 1, "learning_rate": 1e-3} | kw)
    return REINFORCEConfig(**{"batch_size": 4, "group_size": 2, "learning_rate": 1e-3} | kw)


def _params(agent) -> list[torch.Tensor]:
    return [p.detach().clone() for p in agent.policy.trainable_parameters()]


def _optimizer_tensors(agent) -> list[torch.Tensor]:
    return [t.clone() for s in agent.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _rewrite_manifest(folder: Path) -> None:
    """Make the manifest match the files again (to test what lies beyond the checksum)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST)
    manifest = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": ckpt._sha256(p)} for p in files}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


# --- crash safety: kill -9 a real training process, resume, compare with an uninterrupted run -----------------

CHILD = r'''
"""`textrl train` (the agents.cli entry point) with two test hooks set by environment variables:
TEXTRL_TEST_STATS: append every iteration's stats as a JSON line to this file;
TEXTRL_TEST_KILL_IN_CHECKPOINT=k: SIGKILL this process inside the k-th checkpoint write, right after the policy
weights and the first of textrl's own tensor files were written (the checkpoint has no manifest yet);
TEXTRL_TEST_SIGINT_AT=k: send this process SIGINT while it logs iteration k (TEXTRL_TEST_SIGINT_TWICE=1: twice;
TEXTRL_TEST_SIGNAL=SIGTERM: SIGTERM instead)."""
import json, os, signal, sys

from agents import base as agent, cli
from textrl import checkpoint

stats_file = os.environ["TEXTRL_TEST_STATS"]
kill_at = int(os.environ.get("TEXTRL_TEST_KILL_IN_CHECKPOINT", "0"))
sigint_at = int(os.environ.get("TEXTRL_TEST_SIGINT_AT", "0"))
sigint_twice = os.environ.get("TEXTRL_TEST_SIGINT_TWICE") == "1"
stop_signal = getattr(signal, os.environ.get("TEXTRL_TEST_SIGNAL", "SIGINT"))
log, write_atomic, save_module = agent.BaseAgent._log, checkpoint.write_atomic, checkpoint.save_module
writes = 0


def logged(self, rollout, stats):
    with open(stats_file, "a") as fh:
        fh.write(json.dumps({"iteration": self.iteration, "num_timesteps": self.num_timesteps, **stats}) + "\n")
    if self.iteration == sigint_at:
        os.kill(os.getpid(), stop_signal)
        if sigint_twice:
            os.kill(os.getpid(), stop_signal)
    log(self, rollout, stats)


def counting_write(folder, write):
    global writes
    writes += 1
    return write_atomic(folder, write)


def killing_save_module(path, module):
    save_module(path, module)
    if writes == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


agent.BaseAgent._log = logged
checkpoint.write_atomic, checkpoint.save_module = counting_write, killing_save_module
sys.exit(cli.main(sys.argv[1:]))
'''

KILL_ARGS = [
    "train", "--env", "textrl/TextGen-v0", "--agent", "ppo", "--seed", "3", "--progress", "0",
    "--env-kwargs", json.dumps({"reward": ["keyword_reward", "repetition_penalty"], "max_new_tokens": 8}),
    "--batch-size", "4", "--minibatch-size", "2", "--n-epochs", "1", "--kl-target", "1.0",
    "--checkpoint-interval", "1", "--total-timesteps", "224",
]  # fmt: skip
"""The embedded `tiny` LM, 4 episodes of 8 tokens per iteration, adaptive KL, a checkpoint every iteration."""

ONLY_FINAL_CHECKPOINT_ARGS = [*KILL_ARGS, "--checkpoint-interval", "0"]
"""KILL_ARGS with checkpoints only at the end, or on a signal (the last of a repeated flag wins)."""

COMPARED = (
    "num_timesteps",
    "rollout/reward_mean",
    "rollout/reward_std",
    "rollout/episode_length",
    "rollout/kl_ref",
    "charts/kl_coef",
    "losses/policy_loss",
    "losses/value_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/grad_norm",
)


def _read_stats(path: Path) -> dict[int, dict]:
    """Iteration -> stats from a stats file (a line cut by the kill is dropped)."""
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[row["iteration"]] = row
    return out


def _child_env(tmp_path: Path, stats: str, **extra: str) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TEXTRL_TEST_STATS": str(tmp_path / stats),
        **extra,
    }


def _run_child(tmp_path: Path, argv: list[str], stats: str, **env: str) -> subprocess.CompletedProcess:
    """Run `textrl` (CHILD, with its test hooks) on ``argv`` to completion; stats go to ``tmp_path/stats``."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = _child_env(tmp_path, stats, **env)
    return subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=300)


def _state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def _complete(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").glob("step-*") if (p / ckpt.MANIFEST).exists())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[int, dict], Path]:
    """The run of KILL_ARGS without interruption, in this process (the same code path: agents.cli.main):
    iteration -> stats, and its run folder."""
    stats: dict[int, dict] = {}
    log = BaseAgent._log

    def record(self, rollout, values):
        stats[self.iteration] = {"num_timesteps": self.num_timesteps, **values}
        log(self, rollout, values)

    runs = tmp_path_factory.mktemp("runs_u")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BaseAgent, "_log", record)
        assert main([*KILL_ARGS, "--tensorboard-log", str(runs)]) == 0
    (run,) = runs.iterdir()
    return stats, run


def _assert_same_end(run_u: Path, run: Path) -> None:
    """The final checkpoints are identical: weights, value head, reference, optimizer, RNG states, counters, KL."""
    final_u, final = _complete(run_u)[-1], _complete(run)[-1]
    assert final.name == final_u.name
    for name in ("policy/model.safetensors", "value_head.safetensors", "reference.safetensors"):
        a, b = load_file(final_u / name), load_file(final / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (final_u / "optimizer.safetensors").read_bytes() == (final / "optimizer.safetensors").read_bytes()
    # the sampling generator; torch's global RNG is saved too, but no part of a run draws from it
    assert torch.equal(
        load_file(final_u / "rng.safetensors")["generator"], load_file(final / "rng.safetensors")["generator"]
    )
    state_u, state = _state(final_u), _state(final)
    for key in ("iteration", "num_timesteps", "kl_controller", "np_rng", "optimizer", "skipped_batches", "extra"):
        assert state_u[key] == state[key], key


def _curve(folder: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars("rollout/kl_ref")]


def test_kill_9_during_training_and_checkpoint_writes_then_resume_equals_uninterrupted(uninterrupted, tmp_path, capsys):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    uninterrupted, run_u = uninterrupted
    n_iterations = max(uninterrupted)
    assert n_iterations >= 7
    step = {i: s["num_timesteps"] for i, s in uninterrupted.items()}

    # 1. killed inside the 3rd checkpoint write: iterations 1 and 2 are complete, the 3rd is a hidden partial folder
    runs = tmp_path / "runs"
    args = [sys.executable, str(script), *KILL_ARGS, "--tensorboard-log", str(runs)]
    child = subprocess.run(
        args, env=_child_env(tmp_path, "a.jsonl", TEXTRL_TEST_KILL_IN_CHECKPOINT="3"), capture_output=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    (run,) = runs.iterdir()
    assert [p.name for p in _complete(run)] == [f"step-{step[1]:012d}", f"step-{step[2]:012d}"]
    (partial,) = (run / "checkpoints").glob(".step-*.tmp-*")
    assert partial.name.startswith(f".step-{step[3]:012d}.tmp-")
    assert (partial / "policy" / "model.safetensors").is_file() and (partial / "value_head.safetensors").is_file()
    assert not (partial / ckpt.MANIFEST).exists()
    assert _state(resolve_resume(run))["iteration"] == 2  # the half-written one is never considered

    # 2. resume, and kill -9 from outside once the checkpoint of iteration 5 exists (somewhere in iteration 6)
    proc = subprocess.Popen(
        [*args, "--resume", str(run)],
        env=_child_env(tmp_path, "b.jsonl"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / f"step-{step[5]:012d}").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the resumed run made no progress"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert f"resuming from {run / 'checkpoints' / f'step-{step[2]:012d}'} at {step[2]} tokens" in out.decode()
    assert not partial.exists()  # the dead writer's leftovers were cleaned up by the next checkpoint write

    # 3. corrupt the newest complete checkpoint: a clear error naming the file, and resume falls back with a warning
    *_, previous, newest = _complete(run)
    bad_file = newest / "optimizer.safetensors"
    bad_file.write_bytes(bad_file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"checkpoint file {re.escape(str(bad_file))} is truncated or corrupt"):
        ckpt.verify(newest)
    capsys.readouterr()
    assert resolve_resume(run) == previous
    assert f"warning: skipping checkpoint {newest}: checkpoint file {bad_file}" in capsys.readouterr().err
    resumed_from = _state(previous)["iteration"]

    # 4. resume to the end (the same command); it replaces the corrupt checkpoint with a good one
    child = subprocess.run(
        [*args, "--resume", str(run)], env=_child_env(tmp_path, "c.jsonl"), capture_output=True, timeout=300
    )
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    assert f"warning: skipping checkpoint {newest}" in child.stderr.decode()
    assert f"resuming from {previous} at {step[resumed_from]} tokens" in child.stdout.decode()

    # every iteration any of the three processes ran equals the uninterrupted run's, exactly
    runs_stats = [_read_stats(tmp_path / f) for f in ("a.jsonl", "b.jsonl", "c.jsonl")]
    assert min(runs_stats[1]) == 3 and min(runs_stats[2]) == resumed_from + 1
    assert max(runs_stats[2]) == n_iterations
    for stats in runs_stats:
        for i, row in stats.items():
            for key in COMPARED:
                assert row[key] == uninterrupted[i][key], (i, key)

    _assert_same_end(run_u, run)
    # TensorBoard shows one curve equal to the uninterrupted one (what the killed runs logged after their last
    # checkpoint is purged on resume; what they logged before it was flushed with the checkpoint)
    assert _curve(run) == _curve(run_u)
    assert len(_curve(run)) == n_iterations


def test_sigint_finishes_the_iteration_checkpoints_and_a_bare_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """Ctrl-C (a real SIGINT, sent by the process to itself in the middle of iteration 3) lets the iteration
    finish, writes a checkpoint although the run checkpoints only at its end, prints the resume command and exits
    with 130; `textrl train --resume RUN` with no other flag rebuilds the env, reward, agent and budget from the
    checkpoint and ends exactly where the uninterrupted run ended."""
    uninterrupted, run_u = uninterrupted
    runs = tmp_path / "runs"
    args = [*ONLY_FINAL_CHECKPOINT_ARGS, "--tensorboard-log", str(runs)]
    child = _run_child(tmp_path, args, "a.jsonl", TEXTRL_TEST_SIGINT_AT="3")
    assert child.returncode == 130, child.stderr[-2000:]
    (run,) = runs.iterdir()
    (checkpoint,) = _complete(run)
    step3 = uninterrupted[3]["num_timesteps"]
    assert checkpoint.name == f"step-{step3:012d}" and _state(checkpoint)["iteration"] == 3
    assert "SIGINT received: finishing this iteration, then writing a checkpoint" in child.stderr
    assert f"textrl train: stopped by SIGINT at {step3} tokens; checkpoint {checkpoint}" in child.stderr
    assert f"resume with: textrl train --resume {run}" in child.stderr
    assert "Traceback" not in child.stderr
    assert max(_read_stats(tmp_path / "a.jsonl")) == 3

    child = _run_child(tmp_path, ["train", "--resume", str(run)], "b.jsonl")
    assert child.returncode == 0, child.stderr[-2000:]
    assert f"resuming from {checkpoint} at {step3} tokens (env textrl/TextGen-v0, agent ppo)" in child.stdout
    stats = [_read_stats(tmp_path / f) for f in ("a.jsonl", "b.jsonl")]
    assert sorted(stats[0]) == [1, 2, 3] and sorted(stats[1]) == list(range(4, max(uninterrupted) + 1))
    for rows in stats:
        for i, row in rows.items():
            for key in COMPARED:
                assert row[key] == uninterrupted[i][key], (i, key)
    _assert_same_end(run_u, run)
    assert _curve(run) == _curve(run_u)


def test_sigterm_finishes_the_iteration_and_checkpoints_too(tmp_path):
    runs = tmp_path / "runs"
    args = [*ONLY_FINAL_CHECKPOINT_ARGS, "--tensorboard-log", str(runs)]
    child = _run_child(tmp_path, args, "a.jsonl", TEXTRL_TEST_SIGINT_AT="2", TEXTRL_TEST_SIGNAL="SIGTERM")
    assert child.returncode == 128 + signal.SIGTERM, child.stderr[-2000:]
    (run,) = runs.iterdir()
    (checkpoint,) = _complete(run)
    assert _state(checkpoint)["iteration"] == 2
    assert f"textrl train: stopped by SIGTERM at {_state(checkpoint)['num_timesteps']} tokens" in child.stderr
    assert f"resume with: textrl train --resume {run}" in child.stderr


def test_a_second_sigint_abandons_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    args = [*KILL_ARGS, "--tensorboard-log", str(runs)]
    child = _run_child(tmp_path, args, "a.jsonl", TEXTRL_TEST_SIGINT_AT="3", TEXTRL_TEST_SIGINT_TWICE="1")
    assert child.returncode == 130, child.stderr[-2000:]
    (run,) = runs.iterdir()
    last = _complete(run)[-1]
    assert _state(last)["iteration"] == 2  # iteration 3 was abandoned before its checkpoint
    assert f"the iteration in progress was abandoned; last checkpoint {last}" in child.stderr
    assert f"resume with: textrl train --resume {run}" in child.stderr and "Traceback" not in child.stderr


# --- checkpoints: corrupt, malformed, foreign ----------------------------------------------------------------


@pytest.fixture
def two_checkpoints(env, tmp_path):
    agent = PPO(env, config=_config(PPO, checkpoint_interval=1), seed=0, verbose=0)
    folder = tmp_path / "run" / "checkpoints"
    agent.learn(1, checkpoint_dir=folder)
    agent.learn(1, reset_num_timesteps=False, checkpoint_dir=folder)  # two iterations, a checkpoint each
    return sorted(folder.glob("step-*"))


def test_truncated_checkpoint_is_named_and_resume_falls_back(two_checkpoints, env, capsys):
    older, newest = two_checkpoints
    weights = newest / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))} is truncated or corrupt"):
        PPO.load(newest, env=env)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))} is truncated"):
        resolve_resume(newest)  # a checkpoint asked for by name must be good: no silent substitute
    assert resolve_resume(newest.parent.parent) == older  # a run folder: the newest good one
    assert f"warning: skipping checkpoint {newest}: checkpoint file {weights}" in capsys.readouterr().err
    assert PPO.load(older, env=env).iteration == 1


def test_checkpoint_with_bad_state_json_is_a_clear_error(two_checkpoints, env):
    _, folder = two_checkpoints
    state = folder / "state.json"
    good = state.read_text()
    state.write_text(good[:-20])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(state))} is truncated or corrupt"):
        PPO.load(folder, env=env)
    _rewrite_manifest(folder)  # consistent checksums: the JSON itself must still be refused
    with pytest.raises(CheckpointError, match=rf"cannot read {re.escape(str(state))}: .*"):
        PPO.load(folder, env=env)
    for broken, match in [
        ("[1, 2]", "is not a JSON object"),
        (json.dumps({**json.loads(good), "np_rng": None}), r"holds a bad value"),
        (json.dumps({k: v for k, v in json.loads(good).items() if k != "optimizer"}), r"missing \['optimizer'\]"),
    ]:
        state.write_text(broken)
        _rewrite_manifest(folder)
        with pytest.raises(CheckpointError, match=match):
            PPO.load(folder, env=env)
    (folder / ckpt.MANIFEST).write_text('{"state.json": 3}')
    with pytest.raises(CheckpointError, match=r"manifest\.json is corrupt"):
        PPO.load(folder, env=env)


def test_a_file_outside_the_manifest_is_refused(two_checkpoints, env):
    _, folder = two_checkpoints
    (folder / "policy" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match=r"holds policy/pytorch_model\.bin, which is not in its manifest"):
        PPO.load(folder, env=env)


def test_checkpoint_of_a_different_model_is_a_clear_error(two_checkpoints, tmp_path):
    _, folder = two_checkpoints
    corpus = ["ab ab ab abc", "hello world", "the quick brown fox jumps over the lazy dog"] * 5
    same_size = train_tokenizer(corpus, vocab_size=300)  # 300 tokens like the checkpoint's, other tokens
    other = TextGenEnv(tokenizer=same_size, prompts=["ab"], max_new_tokens=4)
    with pytest.raises(CheckpointError, match="trained with a different tokenizer than this env's"):
        PPO.load(folder, env=other)
    smaller = TextGenEnv(tokenizer=train_tokenizer(corpus, vocab_size=280), prompts=["ab"], max_new_tokens=4)
    with pytest.raises(CheckpointError, match=r"vocabulary of 300 tokens .* but this env has 280"):
        PPO.load(folder, env=smaller)


# --- guarded training: NaN/inf stops the run (or skips the batch) before anything is applied or saved ----------


def _inject_env_rewards(agent, monkeypatch, on):
    collect = agents.base.collect_rollout

    def patched(*args, **kwargs):
        rollout = collect(*args, **kwargs)
        if on["on"]:
            rewards = rollout.rewards.clone()
            rewards[1, 0] = math.nan
            rollout = rollout._replace(rewards=rewards)
        return rollout

    monkeypatch.setattr(agents.base, "collect_rollout", patched)


def _inject_kl(agent, monkeypatch, on):
    reference = agent.policy.reference_logprobs
    monkeypatch.setattr(agent.policy, "reference_logprobs", lambda *a: reference(*a) + (math.inf if on["on"] else 0.0))


def _inject_penalised_rewards(agent, monkeypatch, on):
    reference = agent.policy.reference_logprobs

    def patched(*args):
        if on["on"]:
            agent.kl_ctl.coef = 1e38  # finite coefficient x large KL: the penalised rewards overflow
            return reference(*args) - 1e3
        return reference(*args)

    monkeypatch.setattr(agent.policy, "reference_logprobs", patched)


def _inject_values(agent, monkeypatch, on):
    head = agent.policy.value_head

    def hook(module, args, output):
        return output * math.nan if on["on"] else output

    head.register_forward_hook(hook)


def _inject_advantages(agent, monkeypatch, on):
    import agents.ppo
    import agents.reinforce

    if isinstance(agent, PPO):
        whiten = agents.ppo.masked_whiten
        monkeypatch.setattr(
            agents.ppo, "masked_whiten", lambda x, m, **kw: whiten(x, m, **kw) / (0.0 if on["on"] else 1.0)
        )
    else:
        baseline = agents.reinforce.group_baseline
        monkeypatch.setattr(
            agents.reinforce,
            "group_baseline",
            lambda *a: (lambda b, s: (b, s * 0.0 if on["on"] else s))(*baseline(*a)),
        )


def _inject_returns(agent, monkeypatch, on):
    import agents.ppo
    import agents.reinforce

    if isinstance(agent, PPO):
        gae = agents.ppo.gae
        monkeypatch.setattr(
            agents.ppo, "gae", lambda *a: (lambda adv, ret: (adv, ret * (math.inf if on["on"] else 1)))(*gae(*a))
        )
    else:
        returns = agents.reinforce.discounted_returns
        monkeypatch.setattr(
            agents.reinforce, "discounted_returns", lambda *a: returns(*a) * (math.inf if on["on"] else 1)
        )


def _inject_loss(agent, monkeypatch, on):
    original = agent.logprobs_and_entropy

    def patched(logits, actions):
        logp, entropy = original(logits, actions)
        return logp, entropy * (math.nan if on["on"] else 1.0)

    monkeypatch.setattr(agent, "logprobs_and_entropy", patched)


def _inject_gradient(agent, monkeypatch, on):
    weight = agent.policy.model.transformer.h[0].mlp.c_fc.weight
    weight.register_hook(lambda grad: grad * math.nan if on["on"] else grad)


GUARDS = [
    (_inject_env_rewards, r"non-finite env rewards at iteration 2 \(1 of \d+ values\)"),
    (_inject_kl, r"non-finite KL penalty \(policy vs reference log-probs\) at iteration 2 \(\d+ of \d+ values\)"),
    (_inject_penalised_rewards, r"non-finite KL-penalised rewards at iteration 2"),
    (_inject_values, r"non-finite values \(critic\) at iteration 2"),
    (_inject_advantages, r"non-finite advantages at iteration 2 \(\d+ of \d+ values\)"),
    (_inject_returns, r"non-finite returns at iteration 2"),
    (_inject_loss, r"non-finite (PPO|REINFORCE) loss at iteration 2.*entropy nan"),
    (_inject_gradient, r"non-finite gradient norm \(nan\) at iteration 2 \(first in model\.transformer\.h\.0\.mlp"),
]


GUARD_CASES = [
    pytest.param(cls, inject, match, id=f"{inject.__name__.removeprefix('_inject_')}-{cls.__name__}")
    for inject, match in GUARDS
    for cls in (PPO, REINFORCE)
    if not (inject is _inject_values and cls is REINFORCE)  # REINFORCE has no critic
]


@pytest.mark.parametrize(("cls", "inject", "match"), GUARD_CASES)
def test_nonfinite_raises_and_leaves_the_last_checkpoint(cls, inject, match, env, tmp_path, monkeypatch):
    agent = cls(env, config=_config(cls, checkpoint_interval=1), seed=0, verbose=0)
    folder = tmp_path / "checkpoints"
    agent.learn(1, checkpoint_dir=folder)
    (good,) = folder.iterdir()
    manifest = (good / ckpt.MANIFEST).read_bytes()
    params, optim = _params(agent), _optimizer_tensors(agent)
    on = {"on": True}
    inject(agent, monkeypatch, on)
    with pytest.raises(NonFiniteError, match=match):
        agent.learn(10_000, reset_num_timesteps=False, checkpoint_dir=folder)
    assert _equal(params, _params(agent)) and _equal(optim, _optimizer_tensors(agent)), "an update was applied"
    assert all(p.grad is None for p in agent.policy.trainable_parameters())
    assert list(folder.iterdir()) == [good] and ckpt.verify(good) and (good / ckpt.MANIFEST).read_bytes() == manifest


@pytest.mark.parametrize("cls", [PPO, REINFORCE])
@pytest.mark.parametrize("inject", [_inject_kl, _inject_advantages, _inject_loss, _inject_gradient])
def test_nonfinite_skip_discards_the_batch_and_counts_it(cls, inject, env, tmp_path, monkeypatch):
    agent = cls(env, config=_config(cls, nonfinite="skip"), seed=0, verbose=0, tensorboard_log=tmp_path)
    agent.learn(1)
    params, optim = _params(agent), _optimizer_tensors(agent)
    on = {"on": True}
    inject(agent, monkeypatch, on)
    history = []
    agent.learn(1, reset_num_timesteps=False, callback=lambda a, s: history.append(s))
    assert _equal(params, _params(agent)) and _equal(optim, _optimizer_tensors(agent)), "a skipped batch was applied"
    assert agent.iteration == 2 and agent.skipped_batches == 1
    assert history[-1]["charts/skipped_batches"] == 1 and "losses/policy_loss" not in history[-1]
    on["on"] = False
    agent.learn(1, reset_num_timesteps=False, callback=lambda a, s: history.append(s))
    assert not _equal(params, _params(agent)) and history[-1]["charts/skipped_batches"] == 1
    last = sorted((agent.run_dir / "checkpoints").glob("step-*"))[-1]
    assert cls.load(last, env=env).skipped_batches == 1  # the count survives a resume
    events = EventAccumulator(str(agent.run_dir), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("charts/skipped_batches")] == [0, 1, 1]


def test_reinforce_skip_leaves_the_moving_average_baseline(env, monkeypatch):
    agent = REINFORCE(env, config=_config(REINFORCE, baseline="moving_average", nonfinite="skip"), seed=0, verbose=0)
    agent.learn(1)
    before = agent.moving_average
    _inject_loss(agent, monkeypatch, {"on": True})
    agent.learn(1, reset_num_timesteps=False)
    assert agent.skipped_batches == 1 and agent.moving_average == before


def test_a_raising_user_reward_names_itself_and_saves_nothing(gpt2_dir, tmp_path):
    broken = {"now": False}

    def flaky(prompts, completions, **_):
        if broken["now"]:
            raise ValueError("remote scorer unavailable")
        return [float(len(c)) for c in completions]

    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=flaky, max_new_tokens=4)
    agent = REINFORCE(env, config=_config(REINFORCE, checkpoint_interval=1), seed=0, verbose=0)
    folder = tmp_path / "checkpoints"

    def break_after_two(a, stats):
        broken["now"] = a.iteration >= 2

    with pytest.raises(
        RewardError,
        match=r"sequence reward 'flaky' raised ValueError: remote scorer unavailable on sample 0 \(prompt='",
    ):
        agent.learn(10_000, checkpoint_dir=folder, callback=break_after_two)
    assert agent.iteration == 2
    checkpoints = sorted(folder.iterdir())
    assert len(checkpoints) == 2 and all(ckpt.verify(p) for p in checkpoints)  # no partial or new checkpoint
    assert _state(checkpoints[-1])["iteration"] == 2


# --- determinism ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PPO, REINFORCE])
@pytest.mark.parametrize("vector", [False, True], ids=["TextGenEnv", "TextGenVectorEnv"])
def test_same_seed_same_rewards_and_weights(cls, vector, gpt2_dir):
    kwargs = {"lm": str(gpt2_dir), "prompts": PROMPTS, "reward": low_ids, "max_new_tokens": 4}

    def run(seed):
        env = TextGenVectorEnv(4, **kwargs) if vector else TextGenEnv(**kwargs)
        agent = cls(env, config=_config(cls, kl_target=1.0), seed=seed, verbose=0)
        history = []
        agent.learn(48, callback=lambda a, s: history.append([s.get(k) for k in COMPARED[1:]]))  # 3+ iterations
        return history, _params(agent)

    (h1, p1), (h2, p2), (h3, p3) = run(5), run(5), run(6)
    assert len(h1) >= 3 and h1 == h2 and _equal(p1, p2)
    assert h1 != h3 and not _equal(p1, p3)


# --- hostile input at the command line -----------------------------------------------------------------------


@pytest.fixture
def env_file(gpt2_dir, tmp_path):
    factory = tmp_path / "my_env.py"
    factory.write_text(
        "from envs import TextGenEnv\n"
        f"def make():\n    return TextGenEnv(lm={str(gpt2_dir)!r}, prompts=['The king'], max_new_tokens=4)\n"
    )
    return f"{factory}:make"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--agent", "nope"], "unknown agent 'nope'; choose from ['grpo', 'ppo', 'reinforce']"),
        (["--agent", "ppo", "--clip-range", "0"], "PPOConfig: clip_range must be > 0"),
        (["--agent", "ppo", "--clip-range=-0.2"], "PPOConfig: clip_range must be > 0"),
        (["--agent", "ppo", "--learning-rate=-1e-4"], "PPOConfig: learning_rate must be > 0"),
        (["--agent", "ppo", "--learning-rate", "nan"], "PPOConfig: learning_rate must be a finite number, got nan"),
        (["--agent", "reinforce", "--kl-coef", "inf"], "REINFORCEConfig: kl_coef must be a finite number"),
        (["--agent", "ppo", "--minibatch-size", "0"], "minibatch_size must be in [1, batch_size]"),
        (["--agent", "ppo", "--kl-horizon", "0"], "kl_horizon must be >= 1"),
        (["--agent", "reinforce", "--batch-size", "0"], "batch_size must be >= 1"),
        (["--agent", "reinforce", "--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
        (["--agent", "ppo", "--total-timesteps", "0"], "total_timesteps must be >= 1, got 0"),
        (["--agent", "ppo", "--env-kwargs", "[1]"], "--env-kwargs must be a JSON object"),
        (["--agent", "ppo", "--resume", "/nonexistent/run"], "no complete checkpoint under /nonexistent/run"),
    ],
)
def test_cli_bad_values_exit_2_with_a_message(argv, message, env_file, capsys):
    assert main(["train", "--env", env_file, "--progress", "0", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("textrl train: error: ") and message in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_cli_unknown_names_and_non_causal_lm(env_file, bert_dir, tmp_path, capsys):
    assert main(["train", "--env", "textrl/NoSuch-v0", "--tensorboard-log", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown env 'textrl/NoSuch-v0'; registered textrl envs: [" in err and "'textrl/TextGen-v0'" in err
    assert main(["train", "--env", str(tmp_path / "nope.py:make"), "--tensorboard-log", str(tmp_path)]) == 2
    assert "env file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--env", env_file, "--nonfinite", "ignore"])
    assert info.value.code == 2 and "expected one of ('raise', 'skip')" in capsys.readouterr().err
    argv = ["train", "--env", env_file, "--lm", str(bert_dir), "--tensorboard-log", str(tmp_path / "runs")]
    assert main([*argv, "--progress", "0"]) == 2
    err = capsys.readouterr().err
    assert f"textrl train: error: {bert_dir} holds a 'bert' model" in err and "not a causal language model" in err
    assert not (tmp_path / "runs").exists()  # nothing written


# --- long runs: flat memory ----------------------------------------------------------------------------------


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
@pytest.mark.parametrize("cls", [PPO, pytest.param(REINFORCE, marks=pytest.mark.slow)])  # the same loop: one is enough
def test_memory_stays_flat_over_hundreds_of_iterations(cls, gpt2_dir, tmp_path):
    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=low_ids, max_new_tokens=4)
    config = _config(cls, batch_size=2, sample_interval=1, checkpoint_interval=50)
    agent = cls(env, config=config, seed=0, verbose=0, tensorboard_log=tmp_path)

    def snapshot():
        gc.collect()
        objects = gc.get_objects()
        with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
            warnings.simplefilter("ignore")
            tensors = sum(1 for o in objects if isinstance(o, torch.Tensor))
        return _rss_mb(), len(objects), tensors

    agent.learn(10**9, callback=lambda a, s: a.iteration < 50)  # warm-up: allocator pools, caches, first writes
    rss0, objects0, tensors0 = snapshot()
    agent.learn(
        10**9, reset_num_timesteps=False, callback=lambda a, s: a.iteration < 300
    )  # 250 more iterations, logged and checkpointed
    rss1, objects1, tensors1 = snapshot()
    assert agent.iteration == 300
    assert tensors1 <= tensors0, f"live tensors grew from {tensors0} to {tensors1}"
    assert objects1 - objects0 < 200, f"Python objects grew from {objects0} to {objects1}"
    print(f"RSS {rss0:.1f} -> {rss1:.1f} MB, objects {objects0} -> {objects1}, tensors {tensors0} -> {tensors1}")
    assert rss1 - rss0 < 8, f"RSS grew from {rss0:.1f} MB to {rss1:.1f} MB over 250 iterations"


# --- loading: no pickle ----------------------------------------------------------------------------------------


def test_no_pickle_loading_in_the_library():
    """Weights are read with safetensors only; no torch.load without weights_only=True, no pickle.load."""
    files = [p for package in ("textrl", "envs", "agents") for p in (ROOT / package).rglob("*.py")]
    assert len(files) > 10
    for path in files:
        source = path.read_text()
        assert not re.search(r"\bpickle\.loads?\(|\bcPickle\b|\bdill\b|\bjoblib\.load\(", source), path
        for match in re.finditer(r"\btorch\.load\(", source):
            call = source[match.end() : source.find(")", match.end()) + 1]
            assert re.search(r"weights_only\s*=\s*True", call), f"{path}: torch.load({call} without weights_only=True"
        assert not re.search(r"from torch import .*\bload\b", source), path
