"""Rollout collection and storage: the policy steps a text env (:class:`textrl.protocol.TextVectorEnv`,
e.g. :class:`envs.TextGenVectorEnv`) with a KV cache.

Shape legend: B rows (= the vector env's sub-envs), P prompt length (left-padded), T generated steps,
S = P + T, V vocabulary.

Synchronous rollouts: all rows are reset at the start (each on the prompt the agent chose, so groups of
samples of one prompt sit in consecutive rows), the policy prefills the prompts once and then feeds one
token per step through its KV cache, and the rollout stops when every row's episode has ended. A row that
ends early is autoreset by the env (Gymnasium's NEXT_STEP mode); its later steps are discarded
(``action_mask`` is False), exactly as batched ``generate()`` pads finished rows. Everything the update needs
from the rollout — actions, their log-probs, the values — is stored here, so no rollout forward is
repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from textrl import kernels
from textrl.generation import decode
from textrl.policy import ActorCritic, sample, shape_logits
from textrl.protocol import TextVectorEnv


@dataclass
class Sampling:
    """How tokens are drawn from the policy's logits: the one set of sampling settings.

    Agents' configs extend it (their rollouts, evaluation and ``generate`` sample with it), and so does the
    ``textrl generate`` command's; a rollout takes a plain instance (:meth:`of`).
    """

    temperature: float = 1.0
    """Softmax temperature of the sampling distribution (> 0; `textrl generate` takes 0 for greedy)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling probability mass (1.0 = off)."""
    suppress_tokens: list[int] = field(default_factory=list)
    """Token ids never sampled (e.g. eos: every completion runs to max_new_tokens); agents also remove them
    from the distribution trained on and from the reference's."""

    @classmethod
    def of(cls, settings: Sampling) -> Sampling:
        """The sampling settings alone, from any config that extends this class."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def sampling_errors(self) -> list[str]:
        """What is wrong with these settings (empty: nothing)."""
        checks = [
            (self.temperature > 0, "temperature must be > 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (all(isinstance(t, int) and t >= 0 for t in self.suppress_tokens), "suppress_tokens must be ids >= 0"),
        ]
        return [message for ok, message in checks if not ok]


class Rollout(NamedTuple):
    """One synchronous rollout of B episodes.

    Two masks, kept apart: ``attention_mask`` says which tokens the model sees (the update's forward runs
    under it), ``action_mask`` which positions after the prompt are the policy's own actions (where
    log-probs, values, KL, advantages and losses live). In a single-turn env every token the episode
    appended is an action, so ``action_mask == attention_mask[:, P:]``; an env that answers back inserts
    tokens that are seen but were never acted.
    """

    ids: torch.Tensor  # (B, S) prompt (left-padded to P) + completion; pad after each episode's end
    attention_mask: torch.Tensor  # (B, S) 1 on every token the model sees: the prompt and the episode's tokens
    prompt_len: int  # P
    actions: torch.Tensor  # (B, T) the tokens at positions P..S-1 (pad where action_mask is False)
    logprobs: torch.Tensor  # (B, T) under the sampling distribution
    values: torch.Tensor  # (B, T)
    rewards: torch.Tensor  # (B, T) env rewards: immediate ones each step, plus sequence ones at the end
    action_mask: torch.Tensor  # (B, T) bool: position P + t is an action of the row's episode
    prompt_index: np.ndarray  # (B,)
    prompts: list[str]
    completions: list[str]
    components: dict[str, np.ndarray]  # reward name -> (B,) episode sum, unweighted
    terminated: np.ndarray  # (B,) ended by eos / stop string (else truncated)

    @property
    def lengths(self) -> torch.Tensor:
        """Actions per row (B,)."""
        return self.action_mask.sum(1)

    @property
    def episode_returns(self) -> torch.Tensor:
        return (self.rewards * self.action_mask).sum(1)  # (B,)


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
def collect_rollout(
    policy: ActorCritic,
    env: TextVectorEnv,
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
    obs, _ = env.reset(options={"prompt_index": prompt_index})
    ids, mask = left_pad(obs["input_ids"], obs["attention_mask"], env.pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, P = ids.shape
    T = env.max_new_tokens
    n_actions = env.single_action_space.n

    tokens = torch.empty(B, T, dtype=torch.long, device=device)  # what each row read at each step
    logprobs = torch.empty(B, T, device=device)
    values = torch.empty(B, T, device=device)
    rewards = np.zeros((B, T))  # host-side until the end: the only per-step copy is the action ids
    valid = np.zeros((B, T), dtype=bool)  # the row's own action (log-probs, values, rewards, losses live here)
    seen = np.zeros((B, T), dtype=bool)  # in the row's episode: its actions and the env's reply tokens
    alive = np.ones(B, dtype=bool)
    # a multi-turn env's reply (info["env_tokens"] > 0): the row reads those tokens one per step, as the
    # episode's next tokens, instead of sampling; the env waits (it is not stepped for that row meanwhile)
    pending: list[list[int]] = [[] for _ in range(B)]
    feeding = np.zeros(B, dtype=bool)
    components = {name: np.zeros(B) for name in env.reward_names}
    prompts = [env.prompt_text(i) for i in range(B)]
    completions = [""] * B
    terminated_rows = np.zeros(B, dtype=bool)

    # the suppressed ids as one index tensor for the whole rollout, not a new one at every step
    suppressed = torch.as_tensor(sampling.suppress_tokens, dtype=torch.long, device=device)
    shaping = {**vars(sampling), "suppress_tokens": suppressed}
    # plain sampling (no top-k, no top-p, not greedy) can take the one-call sampler (textrl.kernels.sample_into);
    # whether it does depends on the logits' dtype and device, the same at every step: decided at the first one
    plain = not greedy and not (0 < sampling.top_k < n_actions) and sampling.top_p >= 1.0
    one_call: bool | None = None if plain else False
    steps = 0

    def choose(t: int, session) -> torch.Tensor | None:
        nonlocal steps, one_call
        logits, value = session.logits, session.values
        feeding[:] = [bool(queue) for queue in pending]
        if one_call is None:
            one_call = kernels.wants_sampler(logits)
        if one_call and not feeding.any():  # the same draw in one C++ call
            kernels.sample_into(
                logits, n_actions, suppressed, sampling.temperature, generator, tokens[:, t], logprobs[:, t]
            )
            action = tokens[:, t]
        else:
            probs = F.softmax(shape_logits(logits[:, :n_actions].float(), **shaping), dim=-1)  # (B, V)
            action = probs.argmax(-1) if greedy else sample(probs, generator)  # (B,)
            if feeding.any():
                rows = np.flatnonzero(feeding)
                fed = torch.tensor([pending[i].pop(0) for i in rows], device=device)
                action[torch.from_numpy(rows).to(device)] = fed
            tokens[:, t] = action
            # log of the drawn token's probability: one (B, V) pass fewer than log_softmax + exp; a drawn token's
            # probability is never below float resolution of the CDF it was drawn from, so the log is exact to ~1e-7
            torch.log(probs.gather(1, action[:, None]).squeeze(1), out=logprobs[:, t])
        values[:, t] = value
        acting = alive & ~feeding
        valid[:, t], seen[:, t] = acting, alive

        if feeding.any():
            obs, reward, term, trunc, info = env.step(action.cpu().numpy(), active=~feeding)
        else:
            obs, reward, term, trunc, info = env.step(action.cpu().numpy())
        rewards[:, t] = reward * acting
        parts = info.get("reward_components", {})
        for name in components:
            if name in parts:
                components[name] += parts[name] * acting
        ended = (term | trunc) & acting
        for i in np.flatnonzero(ended):
            completions[i] = info["completion"][i]
            terminated_rows[i] = term[i]
        if "env_tokens" in info:
            for i in np.flatnonzero(info["env_tokens"] * (acting & ~ended)):
                end = int(obs["attention_mask"][i].sum())
                pending[i] = obs["input_ids"][i, end - int(info["env_tokens"][i]) : end].tolist()
        alive[ended] = False
        steps = t + 1
        return action if alive.any() else None

    decode(policy, ids, mask, T, choose, record=record)

    valid_t = torch.from_numpy(valid[:, :steps]).to(device)  # (B, T)
    seen_t = torch.from_numpy(seen[:, :steps]).to(device)
    actions = tokens[:, :steps].masked_fill(~valid_t, env.pad_id)
    logprobs, values = logprobs[:, :steps] * valid_t, values[:, :steps] * valid_t
    rewards_t = torch.from_numpy(rewards[:, :steps]).to(device, torch.float32)
    return Rollout(
        ids=torch.cat([ids, tokens[:, :steps].masked_fill(~seen_t, env.pad_id)], dim=1),
        attention_mask=torch.cat([mask, seen_t.long()], dim=1),
        prompt_len=P,
        actions=actions,
        logprobs=logprobs,
        values=values,
        rewards=rewards_t,
        action_mask=valid_t,
        prompt_index=np.asarray(prompt_index),
        prompts=prompts,
        completions=completions,
        components=components,
        terminated=terminated_rows,
    )
