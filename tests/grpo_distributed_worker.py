"""One process of tests/test_grpo.py's data-parallel check (started twice with torchrun's variables).

``python grpo_distributed_worker.py MODEL OUT``: for each GRPO setting in :data:`KINDS`, collect one rollout,
save it (with the reference log-probs the loss uses), apply one update (its passes) and save the gradients each
step applied; then train a few iterations with dynamic sampling on a reward that ties on some prompts and save
the weights, counters and the last iteration's dynamic-sampling figures.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from agents import GRPO, GRPOConfig
from envs import TextGenEnv

PROMPTS = ["The old king", "The young queen", "A brave knight sees", "A quiet river"]

KINDS = {
    "dapo": {"loss_type": "dapo", "num_iterations": 2},
    "grpo-sequence": {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon_high": 0.28},
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "none"},
}
"""Settings of each run; the batch is 8 rows (4 per process with 2), one minibatch per pass."""


def reward(prompts, completions, **_):
    """Ties on the prompts that start with "The", a hash of the completion otherwise."""
    scores = [zlib.crc32(c.encode()) % 997 / 997 for c in completions]
    return [0.0 if p.startswith("The") else s for p, s in zip(prompts, scores, strict=True)]


def make(kind: str, model: str, **extra) -> GRPO:
    env = TextGenEnv(lm=model, prompts=PROMPTS, reward=reward, max_new_tokens=5, stop=["e"])
    config = GRPOConfig(batch_size=8, group_size=2, kl_coef=0.1, learning_rate=1e-3, **KINDS[kind], **extra)
    torch.manual_seed(0)
    return GRPO(env, lm=model, config=config, seed=7)


def main(model: str, out: Path, rank: int) -> None:
    for kind in KINDS:
        agent = make(kind, model)
        rollout, rewards, kl = agent.collect()
        tensors = {
            name: getattr(rollout, name).contiguous()
            for name in ("ids", "attention_mask", "actions", "logprobs", "values", "rewards", "action_mask")
        }
        tensors |= {"penalised": rewards, "kl": kl, "ref_logprobs": agent.round_extras["ref_logprobs"]}
        tensors["prompt_len"] = torch.tensor(rollout.prompt_len)
        save_file(tensors, out / f"{kind}-rollout-{rank}.safetensors")
        grads: dict[str, torch.Tensor] = {}
        step = agent.optimizer.step

        def capturing(*args, agent=agent, step=step, grads=grads, **kwargs):
            i = len(grads) // len(agent.policy.trainable_parameters())
            for name, p in agent.policy.named_parameters():
                if p.requires_grad:
                    g = torch.zeros_like(p) if p.grad is None else p.grad
                    grads[f"step{i}.{name}"] = g.detach().contiguous().clone()
            return step(*args, **kwargs)

        agent.optimizer.step = capturing
        agent._guarded_train(rollout, rewards, kl)
        agent.optimizer.step = step
        save_file(grads, out / f"{kind}-grads-{rank}.safetensors")

    agent = make("dapo", model, dynamic_sampling=True, max_resample=3)
    stats: list[dict] = []
    agent.learn(3 * 8 * 5, callback=lambda a, s: stats.append(s))
    weights = {n: p.detach().contiguous().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}
    save_file(weights, out / f"dynamic-final-{rank}.safetensors")
    keys = ("charts/effective_batch", "charts/groups_dropped", "charts/resample_rounds", "rollout/reward_mean")
    summary = {"iterations": agent.iteration, "tokens": agent.num_timesteps, "last": {k: stats[-1][k] for k in keys}}
    (out / f"dynamic-{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(os.environ["RANK"]))
