"""``textrl train``: build the env and the agent from flags, train, log, checkpoint, and resume.

``--env`` is a registered id (``textrl/TextGen-v0``) with optional ``--env-kwargs`` JSON, or
``path/to/file.py:factory`` where ``factory()`` returns a ``TextGenEnv`` or ``TextGenVectorEnv`` (a plain
Python file: custom rewards in a few lines, no registration needed).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym


@dataclass
class TrainConfig:
    """Settings of `textrl train` (the agent's own settings are flags too; see --agent)."""

    env: str = "textrl/TextGen-v0"
    """Registered env id, or path/to/file.py:factory returning a TextGenEnv / TextGenVectorEnv."""
    env_kwargs: str = "{}"
    """JSON object of keywords for a registered env, e.g. '{"reward": "keyword_reward"}'."""
    agent: str = "ppo"
    """Agent: ppo or reinforce."""
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


def train(cfg: TrainConfig, agent_overrides: dict) -> dict:
    """Run ``textrl train``; returns a summary (first/last reward, run folder, checkpoint)."""
    from agents import AGENTS

    if cfg.agent not in AGENTS:
        raise ValueError(f"unknown agent {cfg.agent!r}; choose from {sorted(AGENTS)}")
    cls = AGENTS[cfg.agent]
    cfg.validate()
    if not cfg.resume:  # fail on a bad flag before loading anything (a resume validates the merged config)
        cls.config_class(**agent_overrides).validate()
    try:
        env_kwargs = json.loads(cfg.env_kwargs)
    except json.JSONDecodeError as e:
        raise ValueError(f"--env-kwargs is not valid JSON: {e}") from None
    if not isinstance(env_kwargs, dict):
        raise ValueError("--env-kwargs must be a JSON object")
    checkpoint = resolve_resume(cfg.resume) if cfg.resume else None
    env = load_env(cfg.env, env_kwargs)
    history: dict[str, float | int | None] = {"first": None, "last": None, "iterations": 0}  # O(1) over a long run

    def record(agent, stats):
        history["first"] = stats["rollout/reward_mean"] if history["first"] is None else history["first"]
        history["last"] = stats["rollout/reward_mean"]
        history["iterations"] += 1

    if checkpoint is not None:
        agent = cls.load(checkpoint, env=env, tensorboard_log=cfg.tensorboard_log, **agent_overrides)
        print(f"resuming from {checkpoint} at {agent.num_timesteps} tokens")
    else:
        config = cls.config_class(**agent_overrides)
        agent = cls(env, lm=cfg.lm, config=config, tensorboard_log=cfg.tensorboard_log, seed=cfg.seed)
        # the env id names the run folder; for file factories use the file name
        if ".py:" in cfg.env:
            agent.env_id = Path(cfg.env.rpartition(":")[0]).stem
    agent.learn(cfg.total_timesteps, callback=record, progress_bar=cfg.progress)
    if cfg.save:
        agent.save(cfg.save)
    summary = {
        "first_reward": history["first"],
        "last_reward": history["last"],
        "iterations": history["iterations"],
        "num_timesteps": agent.num_timesteps,
        "run_dir": str(agent.run_dir) if agent.run_dir else None,
    }
    if agent.run_dir:
        from textrl.checkpoint import latest_checkpoint

        summary["checkpoint"] = str(latest_checkpoint(agent.run_dir / "checkpoints"))
    return summary
