"""Evaluate an agent's policy on its env's own prompts, the way SB3's ``evaluate_policy`` does for games."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from textrl.rollout import collect_rollout


@dataclass
class Evaluation:
    """Episode rewards of a policy on a fixed set of prompts."""

    mean: float
    """Mean episode reward."""
    stderr: float
    """Standard error of the mean."""
    components: dict[str, float]
    """Mean of each reward component (unweighted), by name."""
    samples: list[tuple[str, str, float]]
    """(prompt, completion, episode reward) of every episode, in prompt order."""
    length: float = 0.0
    """Mean completion length in tokens."""


def evaluate_agent(agent, episodes: int = 128, seed: int = 1234, greedy: bool = False, env=None) -> Evaluation:
    """Run ``episodes`` episodes on the env's first prompts (cycling if there are fewer).

    Actions are sampled from the policy's rollout distribution with a generator seeded by ``seed``, or with
    ``greedy`` the most likely token is taken; the agent's own RNGs are untouched, so evaluating does not
    change what training does next. ``env``: a vector env with the agent's ``batch_size`` sub-envs and its
    tokenizer, e.g. on held-out prompts (default: the agent's own env).
    """
    env, B = env if env is not None else agent.env, agent.config.batch_size
    n_prompts = len(env.prompts)
    generator = torch.Generator(device=agent.device).manual_seed(seed)
    returns: list[float] = []
    samples: list[tuple[str, str, float]] = []
    components: dict[str, list[float]] = {}
    lengths: list[int] = []
    for start in range(0, episodes, B):
        index = (np.arange(start, start + B) % n_prompts).astype(np.int64)
        with torch.no_grad():
            rollout = collect_rollout(agent.policy, env, index, agent.sampling, generator, agent.device, greedy=greedy)
        r = rollout.episode_returns.cpu().tolist()
        lengths.extend(rollout.lengths.cpu().tolist())
        returns.extend(r)
        samples.extend(zip(rollout.prompts, rollout.completions, r, strict=True))
        for name, values in rollout.components.items():
            components.setdefault(name, []).extend(values.tolist())
    r = np.asarray(returns[:episodes])
    stderr = float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0
    return Evaluation(
        mean=float(r.mean()),
        stderr=stderr,
        components={name: float(np.mean(v[:episodes])) for name, v in components.items()},
        samples=samples[:episodes],
        length=float(np.mean(lengths[:episodes])),
    )
