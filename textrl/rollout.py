"""Rollout collection and storage: the policy steps a :class:`envs.TextGenVectorEnv` with a KV cache.

Shape legend: B rows (= the vector env's sub-envs), P prompt length (left-padded), T generated steps,
S = P + T, V vocabulary.

Synchronous rollouts: all rows are reset at the start (each on the prompt the agent chose, so groups of
samples of one prompt sit in consecutive rows), the policy prefills the prompts once and then feeds one
token per step through its KV cache, and the rollout stops when every row's episode has ended. A row that
ends early is autoreset by the env (Gymnasium's NEXT_STEP mode); its later steps are discarded
(``valid`` is False), exactly as batched ``generate()`` pads finished rows. Everything the update needs
from the rollout — actions, their log-probs, the values — is stored here, so no rollout forward is
repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from textrl.policy import ActorCritic, sample, shape_logits


@dataclass
class Sampling:
    """How actions are drawn during rollouts."""

    temperature: float = 1.0
    """Softmax temperature of the sampling distribution."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling probability mass (1.0 = off)."""
    suppress_tokens: tuple[int, ...] = ()
    """Token ids that are never sampled (e.g. eos, for completions of exactly ``max_new_tokens``)."""


class Rollout(NamedTuple):
    """One synchronous rollout of B episodes."""

    ids: torch.Tensor  # (B, S) prompt (left-padded to P) + completion; pad after each episode's end
    mask: torch.Tensor  # (B, S) 1 on prompt tokens and on the completion tokens actually taken
    prompt_len: int  # P
    actions: torch.Tensor  # (B, T)
    logprobs: torch.Tensor  # (B, T) under the sampling distribution
    values: torch.Tensor  # (B, T)
    rewards: torch.Tensor  # (B, T) env rewards: immediate ones each step, plus sequence ones at the end
    valid: torch.Tensor  # (B, T) bool: the step belongs to the row's episode
    prompt_index: np.ndarray  # (B,)
    prompts: list[str]
    completions: list[str]
    components: dict[str, np.ndarray]  # reward name -> (B,) episode sum, unweighted
    terminated: np.ndarray  # (B,) ended by eos / stop string (else truncated)

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(1)  # (B,)

    @property
    def episode_returns(self) -> torch.Tensor:
        return (self.rewards * self.valid).sum(1)  # (B,)


def left_pad(ids: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn right-padded rows (the env's layout) into left-padded ones of width ``max(length)``.

    >>> ids, mask = left_pad(np.array([[5, 6, 0], [7, 0, 0]]), np.array([[1, 1, 0], [1, 0, 0]]), 0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
    lengths = mask_t.sum(1)  # (B,)
    P = int(lengths.max())
    src = torch.arange(P)[None, :] - (P - lengths)[:, None]  # (B, P): source column, < 0 for padding
    pad = src < 0
    out = ids_t.gather(1, src.clamp_min(0)).masked_fill(pad, pad_id)
    return out, (~pad).long()


@torch.no_grad()
def decode(
    policy: ActorCritic,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    choose: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None],
    record: bool = False,
) -> None:
    """The decode loop of every generation in textrl: training rollouts, evaluation and ``agent.generate``.

    Prefills the left-padded prompts ``ids``/``mask`` (B, P), then for t = 0, 1, ... calls
    ``choose(t, logits (B, V), values (B,))``, which returns the tokens (B,) taken at step t, or None once
    every row has ended; the tokens are fed back through the KV cache unless that was the last step
    (``max_new_tokens``). ``record``: a training rollout (the policy keeps its activations for the update).
    The decode session is closed however the loop ends (an error in ``choose`` included).
    """
    with policy.start(ids, mask, ids.shape[1] + max_new_tokens, record=record) as session:
        logits, values = session.logits, session.values
        for t in range(max_new_tokens):
            tokens = choose(t, logits, values)
            if tokens is None or t + 1 == max_new_tokens:
                return
            logits, values = session.step(tokens)


def collect_rollout(
    policy: ActorCritic,
    env,
    prompt_index: np.ndarray,
    sampling: Sampling,
    generator: torch.Generator,
    device: torch.device,
    record: bool = False,
    greedy: bool = False,
) -> Rollout:
    """Run one synchronous rollout of ``env.num_envs`` episodes, starting row ``i`` on prompt ``prompt_index[i]``.

    ``record``: a training rollout; the policy keeps its activations for the update (rollout replay).
    ``greedy``: take the most likely token that may be sampled at all (evaluation) instead of sampling.
    """
    engine = env.engine
    obs, _ = env.reset(options={"prompt_index": prompt_index})
    ids, mask = left_pad(obs["input_ids"], obs["attention_mask"], engine.pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, P = ids.shape
    T = engine.max_new_tokens
    n_actions = engine.vocab_size

    actions = torch.empty(B, T, dtype=torch.long, device=device)
    logprobs = torch.empty(B, T, device=device)
    values = torch.empty(B, T, device=device)
    rewards = np.zeros((B, T))  # host-side until the end: the only per-step copy is the action ids
    valid = np.zeros((B, T), dtype=bool)
    alive = np.ones(B, dtype=bool)
    components = {name: np.zeros(B) for name in engine.rewards.names}
    prompts = [engine.row_text[i] for i in range(B)]
    completions = [""] * B
    terminated_rows = np.zeros(B, dtype=bool)

    # the suppressed ids as one index tensor for the whole rollout, not a new one at every step
    suppressed = torch.as_tensor(sampling.suppress_tokens, dtype=torch.long, device=device)
    shaping = {**vars(sampling), "suppress_tokens": suppressed}
    steps = 0

    def choose(t: int, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor | None:
        nonlocal steps
        probs = F.softmax(shape_logits(logits[:, :n_actions].float(), **shaping), dim=-1)  # (B, V)
        action = probs.argmax(-1) if greedy else sample(probs, generator)  # (B,)
        actions[:, t] = action
        # log of the drawn token's probability: one (B, V) pass fewer than log_softmax + exp; a drawn token's
        # probability is never below float resolution of the CDF it was drawn from, so the log is exact to ~1e-7
        torch.log(probs.gather(1, action[:, None]).squeeze(1), out=logprobs[:, t])
        values[:, t] = value
        valid[:, t] = alive

        _, reward, term, trunc, info = env.step(action.cpu().numpy())
        rewards[:, t] = reward * alive
        parts = info.get("reward_components", {})
        for name in components:
            if name in parts:
                components[name] += parts[name] * alive
        ended = (term | trunc) & alive
        for i in np.flatnonzero(ended):
            completions[i] = info["completion"][i]
            terminated_rows[i] = term[i]
        alive[ended] = False
        steps = t + 1
        return action if alive.any() else None

    decode(policy, ids, mask, T, choose, record=record)

    valid_t = torch.from_numpy(valid[:, :steps]).to(device)  # (B, T)
    actions = actions[:, :steps].masked_fill(~valid_t, engine.pad_id)
    logprobs, values = logprobs[:, :steps] * valid_t, values[:, :steps] * valid_t
    rewards_t = torch.from_numpy(rewards[:, :steps]).to(device, torch.float32)
    return Rollout(
        ids=torch.cat([ids, actions], dim=1),
        mask=torch.cat([mask, valid_t.long()], dim=1),
        prompt_len=P,
        actions=actions,
        logprobs=logprobs,
        values=values,
        rewards=rewards_t,
        valid=valid_t,
        prompt_index=np.asarray(prompt_index),
        prompts=prompts,
        completions=completions,
        components=components,
        terminated=terminated_rows,
    )
