"""The training loop as users drive it: SB3's learn() conventions, evaluation during training, generate() with
the env's stop strings and sampling settings, the no-reward warning, and `textrl train --resume` rebuilding a run
from its checkpoint alone."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
from agents.cli import main
from envs import TextGenEnv
from textrl.rewards import keyword_reward

PROMPTS = ["The old king", "The young queen", "The brave knight", "The quiet river"]
HELD_OUT = ["The golden crown", "The dark castle", "The gentle horse"]


@pytest.fixture
def env(gpt2_dir):
    return TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward=keyword_reward(include=["the"]), max_new_tokens=6)


def _small(cls, **kw):
    kw = {"learning_rate": 1e-3} | kw
    if cls is PPO:
        return PPOConfig(batch_size=4, minibatch_size=2, n_epochs=1, **kw)
    return REINFORCEConfig(batch_size=4, group_size=2, **kw)


def _params(agent) -> list[torch.Tensor]:
    return [p.detach().clone() for p in agent.policy.trainable_parameters()]


def _scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


# --- learn(): stable-baselines3's conventions ------------------------------------------------------------------


def test_two_learn_calls_train_twice_the_budget_each_a_run_of_its_own(env, tmp_path):
    """As in SB3, learn(n) trains n more tokens each call; by default (reset_num_timesteps=True) each call is
    a new run: counters from 0, a run folder of its own."""
    agent = REINFORCE(env, config=_small(REINFORCE), seed=0, tensorboard_log=tmp_path)
    trained: list[int] = []
    count = lambda a, s: trained.append(int(s["rollout/episode_length"] * a.config.batch_size))  # noqa: E731
    agent.learn(40, callback=count)
    first_run, first_total = agent.run_dir, sum(trained)
    assert 40 <= first_total < 40 + 4 * 6 and agent.num_timesteps == first_total
    agent.learn(40, callback=count)
    assert 40 <= sum(trained) - first_total < 40 + 4 * 6  # 40 more, not "already past 40: nothing to do"
    assert sum(trained) >= 2 * 40
    assert agent.num_timesteps == sum(trained) - first_total  # the second run's own count
    assert agent.run_dir != first_run and {p.name for p in tmp_path.iterdir()} == {first_run.name, agent.run_dir.name}
    for run in (first_run, agent.run_dir):
        steps = [s for s, _ in _scalars(run, "rollout/reward_mean")]
        assert steps == sorted(steps) and steps[0] < 40 + 4 * 6  # each run's curve starts at its own 0
        assert len(list((run / "checkpoints").glob("step-*"))) == 1


def test_reset_num_timesteps_false_continues_the_count_and_the_run(env, tmp_path):
    agent = REINFORCE(env, config=_small(REINFORCE), seed=0, tensorboard_log=tmp_path)
    agent.learn(30)
    run, first = agent.run_dir, agent.num_timesteps
    agent.learn(30, reset_num_timesteps=False)
    assert agent.run_dir == run and [p.name for p in tmp_path.iterdir()] == [run.name]
    assert first + 30 <= agent.num_timesteps < first + 30 + 4 * 6
    steps = [s for s, _ in _scalars(run, "rollout/reward_mean")]
    assert steps == sorted(set(steps)) and steps[-1] == agent.num_timesteps  # one curve across both calls


def test_two_learn_calls_without_reset_equal_one_call(env):
    a = PPO(env, config=_small(PPO), seed=3)
    a.learn(30)
    a.learn(30, reset_num_timesteps=False)
    b = PPO(env, config=_small(PPO), seed=3)
    b.learn(a.num_timesteps)
    assert a.num_timesteps == b.num_timesteps and a.iteration == b.iteration
    for x, y in zip(_params(a), _params(b), strict=True):
        assert torch.equal(x, y)


def test_tb_log_name_is_numbered_as_in_sb3_and_log_interval_applies(env, tmp_path):
    agent = REINFORCE(env, config=_small(REINFORCE), seed=0, tensorboard_log=tmp_path)
    agent.learn(60, tb_log_name="exp", log_interval=2)
    assert agent.run_dir == tmp_path / "exp_1"
    logged = _scalars(agent.run_dir, "rollout/reward_mean")
    assert agent.iteration >= 3 and len(logged) == agent.iteration // 2  # every second iteration
    agent.learn(10, tb_log_name="exp", reset_num_timesteps=False)
    assert agent.run_dir == tmp_path / "exp_1"  # continued in the latest
    agent.learn(10, tb_log_name="exp")
    assert agent.run_dir == tmp_path / "exp_2"  # a new run: the next number
    with pytest.raises(ValueError, match="log_interval must be >= 1"):
        agent.learn(10, log_interval=0)


def test_a_new_run_refuses_a_checkpoint_folder_that_holds_another_runs_checkpoints(env, tmp_path):
    agent = REINFORCE(env, config=_small(REINFORCE), seed=0)
    agent.learn(1, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ValueError, match=r"already holds checkpoints.*reset_num_timesteps=False"):
        agent.learn(1, checkpoint_dir=tmp_path / "ck")
    agent.learn(1, reset_num_timesteps=False, checkpoint_dir=tmp_path / "ck")
    assert len(list((tmp_path / "ck").glob("step-*"))) == 2


# --- evaluation during training ---------------------------------------------------------------------------------


def test_evaluation_on_held_out_prompts_is_logged_and_leaves_training_unchanged(env, tmp_path):
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("\n".join(HELD_OUT) + "\n")
    config = _small(PPO, eval_interval=2, eval_prompts=str(prompts), eval_episodes=3)
    agent = PPO(env, config=config, seed=0, tensorboard_log=tmp_path / "runs")
    seen: list[tuple[int, dict]] = []
    agent.learn(90, callback=lambda a, s: seen.append((a.num_timesteps, s)))
    plain = PPO(env, config=_small(PPO), seed=0)
    plain.learn(90)
    assert all(torch.equal(x, y) for x, y in zip(_params(agent), _params(plain), strict=True))

    assert agent.iteration >= 4
    evaluated = [(step, s) for step, s in seen if "eval/greedy/reward_mean" in s]
    assert len(evaluated) == agent.iteration // 2  # every second iteration
    events = EventAccumulator(str(agent.run_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for tag in ("eval/greedy/reward_mean", "eval/sampled/reward_mean", "eval/sampled/reward_stderr"):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (step, pytest.approx(s[tag])) for step, s in evaluated
        ]
    assert "eval/greedy/reward/keyword_reward" in events.Tags()["scalars"]
    (text,) = [t for t in events.Tags()["tensors"] if t.startswith("eval/samples")]
    table = events.Tensors(text)[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("|prompt|greedy|reward|sampled|reward|")
    assert all(p in table for p in HELD_OUT) and not any(p in table for p in PROMPTS)  # the held-out prompts


def test_greedy_evaluation_is_deterministic_and_matches_greedy_generate(env):
    from textrl.evaluation import evaluate_agent

    agent = REINFORCE(env, config=_small(REINFORCE), seed=0)
    a = evaluate_agent(agent, episodes=4, greedy=True, seed=1)
    b = evaluate_agent(agent, episodes=4, greedy=True, seed=2)
    assert a.samples == b.samples  # the seed only matters for sampling
    assert [c for _, c, _ in a.samples] == agent.generate(PROMPTS, deterministic=True)
    sampled = [evaluate_agent(agent, episodes=4, seed=s).samples for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


# --- generate() ------------------------------------------------------------------------------------------------


def test_generate_stops_at_the_envs_stop_strings_like_an_episode(gpt2_dir):
    from textrl.evaluation import evaluate_agent

    env = TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS, reward="keyword_reward", max_new_tokens=24, stop="e")
    agent = REINFORCE(env, config=_small(REINFORCE, temperature=2.0), seed=0)
    # greedy: exactly the completions of greedy episodes of the env, which ends them at the stop string
    episodes = evaluate_agent(agent, episodes=4, greedy=True)
    assert agent.generate(PROMPTS, deterministic=True) == [c for _, c, _ in episodes.samples]
    texts = agent.generate(PROMPTS * 4, seed=5)
    stopped = [t for t in texts if "e" in t]
    assert len(stopped) >= 8 and all(len(t.split("e", 1)[1]) < 8 for t in stopped)  # no further than its token
    unstopped = agent.generate(PROMPTS * 4, seed=5, stop=[])
    assert sum(len(t.split("e", 1)[1]) >= 8 for t in unstopped if "e" in t) >= 4  # goes on past the stop string


def test_generate_takes_sampling_settings_and_a_seed_that_leaves_training_rng_alone(env):
    agent = PPO(env, config=_small(PPO), seed=0)
    state = agent.generator.get_state()
    a = agent.generate(PROMPTS, seed=11, temperature=0.7, top_k=5, top_p=0.9)
    assert torch.equal(agent.generator.get_state(), state)  # a seeded call draws from its own generator
    assert a == agent.generate(PROMPTS, seed=11, temperature=0.7, top_k=5, top_p=0.9)
    assert a != agent.generate(PROMPTS, seed=11, temperature=3.0)
    # top_k=1 is greedy, whatever the seed
    assert agent.generate(PROMPTS, seed=1, top_k=1) == agent.generate(PROMPTS, seed=2, top_k=1)
    assert agent.generate(PROMPTS, seed=1, top_k=1) == agent.generate(PROMPTS, deterministic=True)
    with pytest.raises(ValueError, match="temperature=0"):
        agent.generate(PROMPTS, temperature=0)


# --- no reward ------------------------------------------------------------------------------------------------


def test_an_env_without_a_reward_warns(gpt2_dir, env, tmp_path, capsys):
    with pytest.warns(UserWarning, match="the env has no reward: every episode scores 0"):
        REINFORCE(TextGenEnv(lm=str(gpt2_dir), prompts=PROMPTS), config=_small(REINFORCE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        REINFORCE(env, config=_small(REINFORCE))  # a reward: no warning
    argv = ["train", "--env-kwargs", json.dumps({"lm": str(gpt2_dir), "max_new_tokens": 2}), "--agent", "reinforce"]
    argv += ["--batch-size", "2", "--group-size", "2", "--total-timesteps", "4", "--progress", "0"]
    assert main([*argv, "--tensorboard-log", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert (
        err.startswith("textrl train: warning: the env has no reward: every episode scores 0") and err.count("\n") == 1
    )


# --- textrl train --resume: the checkpoint is the source of truth --------------------------------------------------


@pytest.fixture
def factory(gpt2_dir, tmp_path) -> Path:
    path = tmp_path / "my_task.py"
    path.write_text(
        "from envs import TextGenEnv\n"
        "def make(max_new_tokens=4):\n"
        f"    return TextGenEnv(lm={str(gpt2_dir)!r}, prompts=['The king', 'The queen'],\n"
        "                      reward='keyword_reward', max_new_tokens=max_new_tokens)\n"
    )
    return path


def test_resume_without_flags_rebuilds_the_run_and_contradictions_are_errors(factory, tmp_path, capsys):
    runs = tmp_path / "runs"
    start = ["train", "--env", f"{factory}:make", "--env-kwargs", '{"max_new_tokens": 3}', "--agent", "reinforce"]
    start += ["--batch-size", "4", "--group-size", "2", "--kl-coef", "0.1", "--total-timesteps", "24"]
    assert main([*start, "--seed", "4", "--tensorboard-log", str(runs), "--progress", "0"]) == 0
    (run,) = runs.iterdir()
    capsys.readouterr()

    # contradicting flags: one line naming the flag, the value given and the run's own
    for flags, saved in (
        (["--kl-coef", "0.2"], "kl_coef=0.1"),
        (["--env-kwargs", '{"max_new_tokens": 5}'], "env_kwargs='{\"max_new_tokens\": 3}'"),
        (["--seed", "5"], "seed=4"),
        (["--agent", "ppo"], "agent='reinforce'"),
        (["--baseline", "grpo"], "baseline='rloo'"),  # a REINFORCE flag: the run's agent decides the flags
    ):
        assert main(["train", "--resume", str(run), *flags, "--progress", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"textrl train: error: {flags[0]} {flags[1]} contradicts the run being resumed"), err
        assert saved in err and err.count("\n") == 1
    # the same value again is fine, and so are the settings a resume may change
    same = ["--kl-coef", "0.1", "--seed", "4", "--baseline", "rloo", "--log-interval", "2", "--total-timesteps", "40"]
    same += ["--progress", "0"]
    assert main(["train", "--resume", str(run), *same]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and f"(env {factory}:make, agent reinforce)" in out
    checkpoint = max((run / "checkpoints").glob("step-*"))
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["num_timesteps"] >= 40 and state["config"]["kl_coef"] == 0.1 and state["seed"] == 4
    assert state["train"]["total_timesteps"] == 40 and state["train"]["env_kwargs"] == '{"max_new_tokens": 3}'
    # a bare resume: the budget reached, nothing to do; then with more budget it trains on the same env
    assert main(["train", "--resume", str(run), "--progress", "0"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--total-timesteps", "60", "--progress", "0"]) == 0
    newest = max((run / "checkpoints").glob("step-*"))
    assert json.loads((newest / "state.json").read_text())["num_timesteps"] >= 60
    lengths = _scalars(run, "rollout/episode_length")
    assert lengths and all(v <= 3 for _, v in lengths)  # max_new_tokens=3 from the env keywords, all along


def test_cli_eval_flags_write_eval_curves(factory, tmp_path, capsys):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    runs = tmp_path / "runs"
    argv = ["train", "--env", f"{factory}:make", "--agent", "reinforce", "--batch-size", "4", "--group-size", "2"]
    argv += ["--total-timesteps", "40", "--eval-interval", "1", "--eval-prompts", str(held_out), "--eval-episodes", "2"]
    assert main([*argv, "--tensorboard-log", str(runs), "--progress", "0"]) == 0
    (run,) = runs.iterdir()
    iterations = len(_scalars(run, "rollout/reward_mean"))
    assert iterations >= 2
    assert len(_scalars(run, "eval/greedy/reward_mean")) == iterations
    assert len(_scalars(run, "eval/sampled/reward_mean")) == iterations
    assert json.loads((run / "config.json").read_text())["eval_prompts"] == str(held_out)
