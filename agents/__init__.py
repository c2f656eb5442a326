"""Reinforcement-learning agents for textrl envs: REINFORCE, PPO and GRPO on a Transformer policy, and the
stable-baselines3 bridge (:class:`TransformerActorCriticPolicy`, :class:`SampleLoggingCallback`).

``AGENTS`` maps the names used by the CLI to the agent classes (SB3's ``policy_aliases`` style).
"""

from agents.grpo import GRPO, GRPOConfig
from agents.ppo import PPO, PPOConfig
from agents.reinforce import REINFORCE, REINFORCEConfig
from agents.sb3 import SampleLoggingCallback, TransformerActorCriticPolicy

AGENTS = {"ppo": PPO, "reinforce": REINFORCE, "grpo": GRPO}
"""Agent name -> class."""

__all__ = [
    "AGENTS",
    "GRPO",
    "PPO",
    "REINFORCE",
    "GRPOConfig",
    "PPOConfig",
    "REINFORCEConfig",
    "SampleLoggingCallback",
    "TransformerActorCriticPolicy",
]
