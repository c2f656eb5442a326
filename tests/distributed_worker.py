"""One process of a data-parallel test run (tests/test_distributed.py starts N of them with torchrun's
environment variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

``python distributed_worker.py MODEL OUT updates``: for each agent kind in :data:`KINDS`, build the agent (which
joins the process group from the environment), save its starting weights, collect one rollout and save it,
apply one update and save the weights, then train a few more iterations with checkpoints and TensorBoard
logs and save the weights again. The test compares ranks with each other and with one process on the
combined batch.

``python distributed_worker.py MODEL OUT faults``: a non-finite number on rank 1 alone, which both ranks skip;
then rank 1 exits abruptly at iteration 2 and rank 0 writes the error it gets to ``OUT/error-0.txt``.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
from envs import TextGenEnv
from textrl.rewards import immediate

PROMPTS = ["The old king", "The young queen", "The brave knight", "The quiet river", "The golden crown sees"]

KINDS = {
    "reinforce": (REINFORCE, REINFORCEConfig, {"group_size": 2}),
    "ppo": (PPO, PPOConfig, {"group_size": 2, "minibatch_size": 8, "n_epochs": 2}),
    "reinforce-lora": (REINFORCE, REINFORCEConfig, {"group_size": 2, "lora_rank": 4, "learning_rate": 1e-3}),
    "ppo-lora-minibatches": (PPO, PPOConfig, {"minibatch_size": 4, "n_epochs": 2, "lora_rank": 4}),
}
"""Agent, config class and settings of each run; the batch is 8 rows (4 per process with 2)."""


@immediate
def low_ids(new_token_ids):
    """A per-token reward that depends on the sampled tokens."""
    return (new_token_ids < 100).astype(float)


def make(kind: str, model: str):
    cls, config_cls, settings = KINDS[kind]
    env = TextGenEnv(lm=model, prompts=PROMPTS, reward=low_ids, max_new_tokens=6)
    config = config_cls(batch_size=8, kl_coef=0.1, checkpoint_interval=1, **settings)
    torch.manual_seed(0)  # the value head's starting weights (rank 0's are broadcast to all in any case)
    return cls(env, lm=model, config=config, seed=7)


def weights(agent) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().clone() for name, p in agent.policy.named_parameters() if p.requires_grad}


@contextmanager
def captured_gradients(agent):
    """The gradients each optimizer step applies (after the all-reduce), as ``step<i>.<name>`` tensors."""
    grads: dict[str, torch.Tensor] = {}
    step, names = agent.optimizer.step, {p: n for n, p in agent.policy.named_parameters()}

    def capturing(*args, **kwargs):
        i = len(grads) and 1 + max(int(k.split(".")[0][4:]) for k in grads)
        for p in (p for group in agent.optimizer.param_groups for p in group["params"]):
            grad = torch.zeros_like(p) if p.grad is None else p.grad  # a parameter no loss reached
            grads[f"step{i}.{names[p]}"] = grad.detach().contiguous().clone()
        return step(*args, **kwargs)

    agent.optimizer.step = capturing
    try:
        yield grads
    finally:
        agent.optimizer.step = step


def updates(model: str, out: Path, rank: int) -> None:
    for kind in KINDS:
        agent = make(kind, model)
        save_file(weights(agent), out / f"{kind}-init-{rank}.safetensors")
        rollout, rewards, kl = agent.collect()
        tensors = {
            name: getattr(rollout, name).contiguous()
            for name in ("ids", "attention_mask", "actions", "logprobs", "values", "rewards", "action_mask")
        }
        tensors |= {"penalised": rewards, "kl": kl, "prompt_len": torch.tensor(rollout.prompt_len)}
        save_file(tensors, out / f"{kind}-rollout-{rank}.safetensors")
        with captured_gradients(agent) as grads:
            agent._guarded_train(rollout, rewards, kl)
        save_file(weights(agent), out / f"{kind}-after-{rank}.safetensors")
        save_file(grads, out / f"{kind}-grads-{rank}.safetensors")
        agent.tensorboard_log = out / f"{kind}-runs"
        agent.learn(3 * 8 * 6, reset_num_timesteps=True, tb_log_name="run")
        save_file(weights(agent), out / f"{kind}-final-{rank}.safetensors")
        (out / f"{kind}-iterations-{rank}.txt").write_text(f"{agent.iteration} {agent.num_timesteps}")


def faults(model: str, out: Path, rank: int) -> None:
    """A non-finite KL penalty on rank 1 alone at iteration 2 (``nonfinite="skip"``): both ranks skip that batch.
    Then rank 1 exits abruptly at iteration 2 of a new run, and rank 0 writes the error it gets."""
    import dataclasses
    import math

    from textrl.runtime import DistributedError

    agent = make("ppo", model)
    agent.config = dataclasses.replace(agent.config, nonfinite="skip")
    reference = agent.policy.reference_logprobs

    def poisoned(*args):
        bad = rank == 1 and agent.iteration == 1  # during the second iteration
        return reference(*args) + (math.inf if bad else 0.0)

    agent.policy.reference_logprobs = poisoned
    agent.learn(4 * 8 * 6)
    save_file(weights(agent), out / f"skip-final-{rank}.safetensors")
    (out / f"skip-{rank}.txt").write_text(f"{agent.iteration} {agent.skipped_batches}")

    agent = make("reinforce", model)

    def callback(agent, stats):
        if rank == 1 and agent.iteration == 2:
            os._exit(3)  # no goodbye to the process group: what a crash or kill -9 looks like to the others

    try:
        agent.learn(10 * 8 * 6, callback=callback)
    except DistributedError as e:
        (out / f"error-{rank}.txt").write_text(str(e))
        sys.exit(1)


if __name__ == "__main__":
    model, out, what = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    {"updates": updates, "faults": faults}[what](model, out, int(os.environ["RANK"]))
