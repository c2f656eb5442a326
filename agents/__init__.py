"""Reinforcement-learning agents for textrl envs: REINFORCE and PPO on a Transformer policy, and the
stable-baselines3 bridge (:class:`TransformerActorCriticPolicy`, :class:`SampleLoggingCallback`).

``AGENTS`` maps the names used by the CLI to the agent classes (SB3's ``policy_aliases`` style).
"""

from agents.ppo import PPO, PPOConfig
from agents.reinforce import REINFORCE, REINFORCEConfig
from agents.sb3 import SampleLoggingCallback, TransformerActorCriticPolicy

AGENTS = {"ppo": PPO, "reinforce": REINFORCE}
"""Agent name -> class."""

__all__ = [
    "AGENTS",
    "PPO",
    "REINFORCE",
    "PPOConfig",
    "REINFORCEConfig",
    "SampleLoggingCallback",
    "TransformerActorCriticPolicy",
]
