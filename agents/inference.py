"""Using a trained policy: the next token for an observation (:meth:`InferenceMixin.predict`, as SB3's) and
free text continuation (:meth:`InferenceMixin.generate`).

Separate from the training loop in :mod:`agents.base`: nothing here changes the policy, and it runs the same
KV-cached decode loop (:func:`textrl.generation.decode`) as the training rollouts.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from textrl.generation import continue_texts
from textrl.policy import sample, shape_logits
from textrl.rollout import Sampling, left_pad


class InferenceMixin:
    """Inference; expects ``policy``, ``tokenizer``, ``env``, ``sampling``, ``generator``, ``device``."""

    def _choose(
        self,
        logits: torch.Tensor,
        deterministic: bool,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Next token per row from logits (B, V): greedy, or sampled (default: the rollout distribution)."""
        sampling = sampling or self.sampling
        logits = logits[:, : self.env.single_action_space.n].float()
        if deterministic:  # the most likely token that may be sampled at all
            return shape_logits(logits, suppress_tokens=sampling.suppress_tokens).argmax(-1)
        return sample(F.softmax(shape_logits(logits, **vars(sampling)), -1), generator or self.generator)

    @torch.no_grad()
    def predict(self, observation: dict[str, np.ndarray], deterministic: bool = False):
        """Next token for an env observation (single or batched), as SB3's ``predict``: ``(actions, None)``."""
        ids, mask = np.asarray(observation["input_ids"]), np.asarray(observation["attention_mask"])
        single = ids.ndim == 1
        if single:
            ids, mask = ids[None], mask[None]
        left_ids, left_mask = left_pad(ids, mask, self.tokenizer.pad_token_id)
        last = left_ids.shape[1] - 1
        logits, _ = self.policy.core.forward(left_ids.to(self.device), left_mask.to(self.device), last)  # (B, 1, V)
        actions = self._choose(logits[:, -1], deterministic).cpu().numpy()
        return (actions[0] if single else actions), None

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int | None = None,
        deterministic: bool = False,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Continue each prompt with the current policy (KV-cached); returns the new text of each.

        A continuation ends at eos, once its text contains a stop string, or after ``max_new_tokens`` tokens,
        exactly as an episode of the env does, and its text is what the env would report as the completion
        (special tokens skipped, the token that completed a stop string kept).

        Args:
            prompts: texts to continue (an empty one starts from the bos/eos token).
            max_new_tokens: most tokens per continuation (default: the env's ``max_new_tokens``).
            deterministic: take the most likely token at each step instead of sampling.
            temperature, top_k, top_p: sampling settings for this call (default: the agent's rollout settings);
                ``suppress_tokens`` always apply.
            stop: stop string(s) for this call (default: the env's ``stop``; ``[]`` for none).
            seed: sample from a generator seeded with it (reproducible, and the agent's own generator, which
                training draws from, is left untouched); default: the agent's generator.
        """
        tok = self.tokenizer
        max_new_tokens = max_new_tokens or self.env.max_new_tokens
        stops = self.env.stop if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
        sampling = dataclasses.replace(
            self.sampling,
            **{k: v for k, v in {"temperature": temperature, "top_k": top_k, "top_p": top_p}.items() if v is not None},
        )
        if sampling.temperature <= 0 or sampling.top_k < 0 or not 0.0 < sampling.top_p <= 1.0:
            raise ValueError(
                f"bad sampling settings: temperature={sampling.temperature} (> 0; use deterministic=True for "
                f"greedy), top_k={sampling.top_k} (>= 0), top_p={sampling.top_p} (in (0, 1])"
            )
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        return continue_texts(
            self.policy,
            tok,
            prompts,
            max_new_tokens,
            lambda logits: self._choose(logits, deterministic, sampling, generator),
            stops,
            self.device,
        )
