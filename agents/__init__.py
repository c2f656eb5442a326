"""Reinforcement-learning agents (REINFORCE, PPO, the stable-baselines3 bridge) for textrl envs."""
