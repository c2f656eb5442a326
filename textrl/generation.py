"""The decode loop: every token textrl generates goes through :func:`decode` on a model's core.

Training rollouts (:func:`textrl.rollout.collect_rollout`), evaluation, ``agent.generate`` and
``textrl.generate`` (the ``textrl generate`` command) all run it, on the engine when the model's
architecture is one it describes (:func:`textrl.core.make_core`). :func:`continue_texts` is the text-level
loop on top: prompts in, completions out, ending at eos, a stop string or a token budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch


class DecodeSession(Protocol):
    """An open decode session (:class:`textrl.session.Session`, :class:`textrl.core.HFSession` or
    :class:`textrl.policy.PolicySession`): ``logits`` (B, V) of the latest step, ``step``, ``close``."""

    logits: torch.Tensor

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def close(self) -> None: ...


def decode(
    source,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    choose: Callable[[int, DecodeSession], torch.Tensor | None],
    record: bool = False,
) -> None:
    """The decode loop of every generation in textrl.

    ``source`` is anything with ``start(ids, mask, max_len, record=)`` returning a decode session: a policy
    (:class:`textrl.policy.ActorCritic`, whose sessions also carry ``values``) or a core. The left-padded
    prompts ``ids``/``mask`` (B, P) are prefilled, then for t = 0, 1, ... ``choose(t, session)`` returns the
    tokens (B,) taken at step t, or None once every row has ended; the tokens are fed back through the KV
    cache unless that was the last step (``max_new_tokens``). ``record``: a training rollout (the policy
    keeps its activations for the update). The session is closed however the loop ends (an error in
    ``choose`` included).
    """
    session = source.start(ids, mask, ids.shape[1] + max_new_tokens, record=record)
    try:
        for t in range(max_new_tokens):
            tokens = choose(t, session)
            if tokens is None or t + 1 == max_new_tokens:
                return
            session.step(tokens)
    finally:
        session.close()


def left_padded(tokenizer, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (B, P) of the prompts, left-padded; an empty prompt is the bos token (the
    eos token when there is none)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] or [start] for p in prompts]
    P = max(map(len, encoded))
    ids = torch.full((len(prompts), P), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, P - len(e) :], mask[i, P - len(e) :] = torch.tensor(e), 1
    return ids.to(device), mask.to(device)


def continue_texts(
    source,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    stops: Sequence[str] = (),
    device: torch.device | str = "cpu",
) -> list[str]:
    """Continue each prompt through :func:`decode`; the new text of each (special tokens skipped).

    ``pick(logits (B, V)) -> tokens (B,)`` chooses each step's tokens (sampling or greedy). A continuation
    ends at eos, once its text contains one of ``stops`` (the token that completed it kept), or after
    ``max_new_tokens`` tokens: exactly the rule that ends an env's episode.
    """
    ids, mask = left_padded(tokenizer, prompts, torch.device(device))
    out: list[torch.Tensor] = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)

    def choose(t: int, session: DecodeSession) -> torch.Tensor | None:
        token = torch.where(done, tokenizer.pad_token_id, pick(session.logits))
        out.append(token)
        done.logical_or_(token == tokenizer.eos_token_id)
        if stops:
            so_far = torch.stack(out, 1).tolist()
            for i in torch.nonzero(~done).flatten().tolist():
                text = tokenizer.decode(so_far[i], skip_special_tokens=True)
                done[i] = any(s in text for s in stops)
        return None if done.all() else token

    decode(source, ids, mask, max_new_tokens, choose)
    return tokenizer.batch_decode(torch.stack(out, 1), skip_special_tokens=True)
