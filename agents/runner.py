"""``textrl train``: build the env and the agent from flags, train, log, checkpoint, and resume.

``--env`` is a registered id (``textrl/TextGen-v0``) with optional ``--env-kwargs`` JSON, or
``path/to/file.py:factory`` where ``factory()`` returns a ``TextGenEnv`` or ``TextGenVectorEnv`` (a plain
Python file: custom rewards in a few lines, no registration needed).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym

from textrl.config import to_jsonable


@dataclass
class TrainConfig:
    """Settings of `textrl train` (the agent's own settings are flags too; see --agent)."""

    env: str = "textrl/TextGen-v0"
    """Registered env id, or path/to/file.py:factory returning a TextGenEnv / TextGenVectorEnv."""
    env_kwargs: str = "{}"
    """JSON object of keywords for a registered env, e.g. '{"reward": "keyword_reward"}'."""
    agent: str = "ppo"
    """Agent: ppo, reinforce or grpo."""
    lm: str | None = None
    """Policy LM (embedded name or HF folder); default: the env's own LM."""
    total_timesteps: int = 20000
    """Training budget in generated tokens."""
    seed: int = 0
    """Seed for prompts, sampling and minibatches."""
    tensorboard_log: str = "runs"
    """Parent folder of the run folder runs/{env}__{agent}__{seed}__{time}."""
    resume: str | None = None
    """Run folder or checkpoint to continue from (its latest complete checkpoint)."""
    save: str | None = None
    """Also save the final agent to this folder."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        if self.total_timesteps < 1:
            raise ValueError(f"total_timesteps must be >= 1, got {self.total_timesteps}")


def load_env(spec: str, env_kwargs: dict):
    """An env from a registered id (with keywords) or from ``file.py:factory``.

    An error in the user's file, at import or in the factory, is a ValueError saying which, raised from
    the original (whose traceback points at the user's line; ``textrl.errors`` names it).
    """
    import envs  # noqa: F401  (registers the ids)

    if ".py:" in spec:
        path, _, factory = spec.rpartition(":")
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"env file not found: {file}")
        module_spec = importlib.util.spec_from_file_location(f"textrl_user_env_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)  # the user's own file, run as they asked
        except Exception as e:
            raise ValueError(f"importing the env file {file} raised {type(e).__name__}: {e}") from e
        if not callable(getattr(module, factory, None)):
            raise ValueError(f"{file} has no function {factory!r}")
        try:
            return getattr(module, factory)(**env_kwargs)
        except Exception as e:
            raise ValueError(f"the env factory {file}:{factory}() raised {type(e).__name__}: {e}") from e
    if spec not in gym.registry:
        textrl_ids = sorted(k for k in gym.registry if k.startswith("textrl/"))
        raise ValueError(f"unknown env {spec!r}; registered textrl envs: {textrl_ids} (or use file.py:factory)")
    return gym.make(spec, **env_kwargs)


def resolve_resume(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the latest complete one in a run folder.

    A checkpoint given by name must verify (else a :class:`CheckpointError` naming the bad file). In a run
    folder, a newest checkpoint that is truncated or corrupt is skipped, with a warning on stderr naming
    it and why, for the previous good one; unfinished writes (hidden ``.step-*.tmp-*`` folders) are ignored.
    """
    from textrl.checkpoint import CheckpointError, latest_checkpoint, verify

    def warn(skipped: Path, error: CheckpointError) -> None:
        print(f"warning: skipping checkpoint {skipped}: {error}", file=sys.stderr)

    path = Path(path)
    if (path / "state.json").is_file() or (path / "manifest.json").is_file():
        return verify(path)
    for folder in (path / "checkpoints", path):
        found = latest_checkpoint(folder, on_skip=warn)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint under {path}")


RESUME_MAY_CHANGE = frozenset(
    {
        # textrl train's own
        "total_timesteps", "resume", "save", "progress", "tensorboard_log",
        # the agent's: where and how often it logs, evaluates and checkpoints, and what it does on NaN
        "log_interval", "sample_interval", "checkpoint_interval", "keep_checkpoints",
        "eval_interval", "eval_prompts", "eval_episodes", "device", "nonfinite",
    }
)  # fmt: skip
"""Settings a resumed run may change: they decide when it stops and what it writes, not what it learns."""


def _parse_env_kwargs(text: str) -> dict:
    try:
        env_kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--env-kwargs is not valid JSON: {e}") from None
    if not isinstance(env_kwargs, dict):
        raise ValueError("--env-kwargs must be a JSON object")
    return env_kwargs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_unchanged(given: dict[str, Any], saved: dict[str, Any], checkpoint: Path) -> None:
    """Raise ValueError when a flag given on resume contradicts the run's saved settings."""
    for key, value in given.items():
        if key in RESUME_MAY_CHANGE or key not in saved:
            continue
        same = saved[key]
        if key == "env_kwargs":
            value, same = _parse_env_kwargs(value), _parse_env_kwargs(same)
        if value != same and not (isinstance(value, list) and list(value) == list(same or [])):
            shown = json.dumps(value) if not isinstance(value, str) else value
            may = ", ".join(_flag(k) for k in sorted(RESUME_MAY_CHANGE - {"resume"}))
            raise ValueError(
                f"{_flag(key)} {shown} contradicts the run being resumed, which has {key}={saved[key]!r} "
                f"({checkpoint}); a resumed run keeps the settings it started with and may change only {may}; "
                f"drop {_flag(key)} to continue the run, or start a new run to train with other settings"
            )


def resume_settings(checkpoint: Path) -> dict[str, Any]:
    """The ``state.json`` of a verified checkpoint (agent name, config, the train settings it started with)."""
    from textrl.checkpoint import CheckpointError, load_json

    state = load_json(checkpoint / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{checkpoint / 'state.json'} is not a textrl checkpoint state")
    return state


def _quiet(*_args, **_kwargs) -> None:
    """``print`` on the processes that are not rank 0."""


def run_training(train_flags: dict[str, Any], agent_flags: dict[str, Any]) -> dict:
    """Run ``textrl train`` from the flags given on the command line (absent ones are not in the dicts).

    A new run takes the defaults for absent flags. A resumed run (``resume``) is rebuilt from its checkpoint:
    the env (spec and keywords), agent, LM, seed, budget and every agent setting are the ones the run
    started with; a flag given again must agree with them, except the few in :data:`RESUME_MAY_CHANGE`.
    ``total_timesteps`` is the whole run's budget, so a resumed run stops where the uninterrupted one would.

    Returns a summary: first/last iteration reward, iterations, tokens, run folder, checkpoint.
    """
    from agents import AGENTS

    cfg = TrainConfig(**train_flags)
    cfg.validate()
    checkpoint = resolve_resume(cfg.resume) if cfg.resume else None
    if checkpoint is not None:
        state = resume_settings(checkpoint)
        saved_train = state.get("train") or {}
        if not saved_train:  # saved from Python: the env comes from its registered id unless --env names one
            saved_train = {"agent": state.get("agent"), "seed": state.get("seed")}
            if "env" not in train_flags and state.get("env_id") in gym.registry:
                saved_train |= {"env": state["env_id"], "env_kwargs": json.dumps(state.get("env_kwargs") or {})}
        _check_unchanged(train_flags, saved_train, checkpoint)
        _check_unchanged(agent_flags, state["config"], checkpoint)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**({k: v for k, v in saved_train.items() if k in fields} | train_flags))
        cfg.validate()
    if cfg.agent not in AGENTS:
        raise ValueError(f"unknown agent {cfg.agent!r}; choose from {sorted(AGENTS)}")
    cls = AGENTS[cfg.agent]
    if checkpoint is None:  # fail on a bad flag before loading anything (a resume validates the merged config)
        cls.config_class(**agent_flags).validate()
    env = load_env(cfg.env, _parse_env_kwargs(cfg.env_kwargs))
    history: dict[str, float | int | None] = {"first": None, "last": None, "iterations": 0}  # O(1) over a long run

    def record(agent, stats):
        history["first"] = stats["rollout/reward_mean"] if history["first"] is None else history["first"]
        history["last"] = stats["rollout/reward_mean"]
        history["iterations"] += 1

    if checkpoint is not None:
        overrides = {k: v for k, v in agent_flags.items() if k in RESUME_MAY_CHANGE}
        agent = cls.load(checkpoint, env=env, tensorboard_log=cfg.tensorboard_log, **overrides)
        say = print if agent.runtime.is_main else _quiet  # under torchrun, rank 0 speaks for all
        say(f"resuming from {checkpoint} at {agent.num_timesteps} tokens (env {cfg.env}, agent {cfg.agent})")
    else:
        config = cls.config_class(**agent_flags)
        agent = cls(env, lm=cfg.lm, config=config, tensorboard_log=cfg.tensorboard_log, seed=cfg.seed)
        # the env id names the run folder; for file factories use the file name
        if ".py:" in cfg.env:
            agent.env_id = Path(cfg.env.rpartition(":")[0]).stem
        say = print if agent.runtime.is_main else _quiet
    say(f"policy {agent.lm} runs on the {agent.policy.runs_on}")
    agent.train_config = {k: v for k, v in to_jsonable(cfg).items() if k not in ("resume", "save", "progress")}
    remaining = cfg.total_timesteps - agent.num_timesteps
    if remaining > 0:
        agent.learn(remaining, callback=record, progress_bar=cfg.progress, reset_num_timesteps=False)
    else:
        say(f"the run has {agent.num_timesteps} tokens, its budget is {cfg.total_timesteps}: nothing to train")
    if cfg.save:
        agent.save(cfg.save)
    summary = {
        "first_reward": history["first"],
        "last_reward": history["last"],
        "iterations": history["iterations"],
        "num_timesteps": agent.num_timesteps,
        "run_dir": str(agent.run_dir) if agent.run_dir else None,
        "is_main": agent.runtime.is_main,
    }
    if agent.run_dir:
        from textrl.checkpoint import latest_checkpoint

        summary["checkpoint"] = str(latest_checkpoint(agent.run_dir / "checkpoints"))
    return summary
