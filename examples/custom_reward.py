"""Train PPO on the embedded LM with your own reward functions: the whole script is the README's example."""

import sys

from agents import PPO, PPOConfig
from envs import TextGenEnv
from textrl.rewards import immediate


def mentions_love(completions, **kwargs):  # sequence reward: one float per finished completion
    return [float("love" in c.lower()) for c in completions]


def ends_a_sentence(completions, **kwargs):  # a reward on how completions end
    return [0.5 if c.rstrip().endswith((".", "!", "?")) else 0.0 for c in completions]


@immediate
def no_newlines(new_tokens, **kwargs):  # immediate reward: one float per generated token
    return [-0.05 if "\n" in t else 0.0 for t in new_tokens]


# stop: the embedded model rarely ends a completion by itself (eos), so without stop strings every episode runs
# to max_new_tokens and a reward on how completions end would have nothing to learn from
rewards = {mentions_love: 1.0, ends_a_sentence: 1.0, no_newlines: 1.0}
env = TextGenEnv(lm="tiny", reward=rewards, max_new_tokens=24, stop=[".", "!", "?"])
agent = PPO(env, config=PPOConfig(batch_size=16, learning_rate=1e-4), tensorboard_log="runs", seed=0)
agent.learn(total_timesteps=int(sys.argv[1]) if len(sys.argv) > 1 else 40_000, progress_bar=True)
print(agent.generate(["ROMEO:\n", "My lord,"], max_new_tokens=24))
agent.save("runs/love-ppo")
