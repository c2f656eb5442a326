"""The LM trunk over whole right-padded observations, with a KV cache keyed on each row's token prefix.

Shape legend: N rows (sub-envs), C observation width, S columns actually run, L valid tokens of a row,
E width, H heads, D head size.

Policies that are handed only observations (stable-baselines3 calls its policy on the full token
sequence of every sub-env at every step) would rerun the whole prefix per token. The env's observations
are right-padded, so token ``t`` of a row always sits at column ``t``; :class:`PrefixCache` keeps, per
row, the tokens already run and their keys/values in the same columns (each row continues in place, so
rows of different lengths never need re-packing), and on each call compares every row with what it holds:

- the same tokens: reuse the stored final hidden state (SB3 asks for the values of the observation it
  will act on next, then acts on it);
- a few more tokens (the action, and in a multi-turn env the env's reply after it; up to
  :attr:`PrefixCache.max_extend`): run only those, each at its own position, against the row's cached keys;
- anything else (a reset, a new prompt, another env's rows): rerun that row from scratch.

It is correct by construction: it compares token ids rather than trusting reset flags, and it drops
everything when any model parameter changed (tensor version counters move on every in-place update:
optimizer steps, ``load_state_dict``), so it can never return states of stale weights. Caches are kept
per batch shape ``(N, C)`` (the two most recent), so a one-row call in between (an evaluation env) neither
breaks nor evicts the training batch's cache; a one-row call that extends a row of another shape's cache
(SB3's bootstrap value of a truncated episode: the row's last observation plus the final token) is served
from that row.

Limits: the cache covers the architectures the engine runs (:class:`textrl.engine.Engine`, on the HF
parameters: GPT-2, Llama, Mistral, Qwen2/3, Mixtral, Qwen2-MoE); any other model always runs its full
forward. It gives no gradients: the caller uses it only for inference and runs :func:`last_hidden` for
training.

:func:`last_hidden` is the full forward (with gradients, any architecture). It shares work too: a row
that is a prefix of another row in the batch is read off that row instead of being run (an SB3 minibatch
holds many steps of each episode, all prefixes of the episode's last observation).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from textrl.core import positions_from_mask
from textrl.engine import Engine


def _run_trunk(model: PreTrainedModel, core: Engine | None, ids: torch.Tensor, mask: torch.Tensor):
    if core is not None:
        return core.trunk(ids, mask)[0]
    # any HF causal LM: its base model ends with the final norm; the caller applies the LM head
    positions = positions_from_mask(mask)
    return model.base_model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).last_hidden_state


def right_padded_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """Valid tokens per row (N,) when every row is right-padded and non-empty (the env's layout), else None."""
    length = mask.sum(1)
    cols = torch.arange(mask.shape[1], device=mask.device)
    if torch.equal(mask.bool(), cols < length[:, None]) and bool((length > 0).all()):
        return length
    return None


def longest_extension(ids: torch.Tensor, length: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """For each right-padded row, the index (N,) of the longest row that starts with all of its tokens.

    >>> ids = torch.tensor([[5, 6, 7], [5, 6, 0], [5, 8, 0], [5, 6, 7]])
    >>> longest_extension(ids, torch.tensor([3, 2, 2, 3])).tolist()
    [0, 0, 2, 0]
    """
    N, C = ids.shape
    cols = torch.arange(C, device=ids.device)
    out = torch.empty(N, dtype=torch.long, device=ids.device)
    for start in range(0, N, chunk):  # (n, N, C) compares at a time
        i = slice(start, start + chunk)
        starts_with = ((ids[None, :, :] == ids[i, None, :]) | (cols >= length[i, None, None])).all(-1)  # (n, N)
        starts_with &= length[None, :] >= length[i, None]
        out[i] = torch.where(starts_with, length[None, :], -1).argmax(1)  # the first of the longest
    return out


def last_hidden(model: PreTrainedModel, core: Engine | None, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden state (N, E) at each row's last valid token: the full forward, with gradients.

    Right-padded rows (the env's layout) that are prefixes of other rows are not run on their own: each
    row's state is read at its last position from the longest row that starts with it (a causal LM's state
    at a position depends only on the tokens up to it). An SB3 minibatch holds many steps of each episode,
    so this runs about one row per episode instead of one per step; gradients are the same. Only the
    columns up to the longest row are run. Any other padding runs every row.
    """
    length = right_padded_lengths(mask)
    if length is None:
        S = ids.shape[1]
        last = (mask.long() * torch.arange(1, S + 1, device=mask.device)).argmax(1)  # (N,) last column with mask 1
        S = int(last.max()) + 1
        hidden = _run_trunk(model, core, ids[:, :S], mask[:, :S])  # (N, S, E)
        return hidden[torch.arange(len(ids), device=ids.device), last]  # (N, E)
    keep, row = torch.unique(longest_extension(ids, length), return_inverse=True)  # (K,), (N,)
    S = int(length[keep].max())
    hidden = _run_trunk(model, core, ids[keep, :S], mask[keep, :S])  # (K, S, E)
    return hidden[row, length - 1]  # (N, E)


@dataclass
class _Rows:
    """The cache of one batch shape."""

    ids: torch.Tensor  # (N, C) tokens already run (columns >= length are stale)
    length: torch.Tensor  # (N,) tokens already run
    hidden: torch.Tensor  # (N, E) final hidden state at column length - 1
    k: torch.Tensor  # (layers, N, H, C, D)
    v: torch.Tensor  # (layers, N, H, C, D)
    version: int  # parameter version it was filled with


class PrefixCache:
    """Per-row KV cache over right-padded observations for an :class:`textrl.engine.Engine` (see the module
    docstring).

    Args:
        core: the engine whose model's parameters are run.
        max_shapes: how many batch shapes ``(N, C)`` keep a cache at once (least recently used is dropped).
        max_extend: the most new tokens a row is extended by, one step each; a row that grew by more is
            recomputed in one forward, which is then the cheaper way.
    """

    def __init__(self, core: Engine, max_shapes: int = 2, max_extend: int = 64):
        self.core = core
        self.max_shapes = max_shapes
        self.max_extend = max_extend
        self._shapes: OrderedDict[tuple[int, int], _Rows] = OrderedDict()
        self.params = list(core.model.parameters())
        self.stats: Counter[str] = Counter()
        """Rows served per kind: ``reused``, ``extended`` (new tokens run), ``recomputed``, ``uncached``."""

    def clear(self) -> None:
        """Drop every cached row (frees the memory; the next call recomputes)."""
        self._shapes.clear()

    def _version(self) -> int:
        return sum(p._version for p in self.params)  # moves on every in-place update of a parameter

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final hidden state (N, E) at each row's last token, running only what the cache lacks."""
        N, C = ids.shape
        length = right_padded_lengths(mask)  # (N,)
        if length is None:
            self.stats["uncached"] += N  # not the right-padded layout the cache relies on
            return last_hidden(self.core.model, self.core, ids, mask)
        cols = torch.arange(C, device=ids.device)
        version = self._version()
        if N == 1:
            hidden = self._borrow(ids, length, version)
            if hidden is not None:
                return hidden
        rows = self._shapes.pop((N, C), None)
        if rows is None or rows.version != version:
            if rows is not None:  # the weights changed: every shape is stale
                self._shapes.clear()
            rows = self._empty(N, C, ids.device, version)
        self._shapes[N, C] = rows
        while len(self._shapes) > self.max_shapes:
            self._shapes.popitem(last=False)

        prev = rows.length.clone()  # _extend moves rows.length on
        agree = ((ids == rows.ids) | (cols >= prev[:, None])).all(1)  # (N,) the cached tokens are a prefix
        grow = length - prev
        same = agree & (grow == 0)
        step = agree & (prev > 0) & (grow >= 1) & (grow <= self.max_extend)  # an empty row: one forward
        redo = ~(same | step)
        n_step, n_redo = int(step.sum()), int(redo.sum())
        self.stats.update(reused=N - n_step - n_redo, extended=n_step, recomputed=n_redo)
        if n_redo:
            self._recompute(rows, redo.nonzero().squeeze(1), ids, mask, length)
        if n_step:
            idx = step.nonzero().squeeze(1)
            for s in range(int(grow[idx].max())):  # one token per row and pass: a reply's tokens in turn
                live = idx[grow[idx] > s]
                self._extend(rows, live, ids[live, prev[live] + s], all_rows=len(live) == N)
        return rows.hidden.clone()

    def _borrow(self, ids: torch.Tensor, length: torch.Tensor, version: int) -> torch.Tensor | None:
        """Serve one row (1, C) from a row of another shape's cache that it equals or extends by one token."""
        for (N, C), rows in reversed(self._shapes.items()):
            if N == 1 or ids.shape[1] != C or rows.version != version:
                continue
            prev = rows.length
            agree = ((ids == rows.ids) | (torch.arange(C, device=ids.device) >= prev[:, None])).all(1)  # (N,)
            for kind, hit in (("reused", agree & (length == prev)), ("extended", agree & (length == prev + 1))):
                if bool(hit.any()):
                    j = hit.nonzero()[:1, 0]  # (1,) the first such row
                    if kind == "extended":
                        self._extend(rows, j, ids[0, prev[j]], all_rows=False)
                    self.stats[kind] += 1
                    return rows.hidden[j].clone()
        return None

    def _empty(self, N: int, C: int, device: torch.device, version: int) -> _Rows:
        spec = self.core.spec
        E, dtype = spec.embed.embedding_dim, spec.embed.weight.dtype
        kv = torch.zeros(len(spec.layers), N, spec.n_kv_head, C, spec.head_dim, dtype=dtype, device=device)  # never NaN
        return _Rows(
            ids=torch.full((N, C), -1, dtype=torch.long, device=device),
            length=torch.zeros(N, dtype=torch.long, device=device),
            hidden=torch.zeros(N, E, dtype=dtype, device=device),
            k=kv,
            v=kv.clone(),
            version=version,
        )

    def _recompute(self, rows: _Rows, idx: torch.Tensor, ids, mask, length) -> None:
        """Run rows ``idx`` from scratch and store their keys/values in columns ``0..S-1``."""
        S = int(length[idx].max())
        hidden, kv = self.core.trunk(ids[idx, :S], mask[idx, :S], keep_kv=True)  # (n, S, E)
        for i, (k, v) in enumerate(kv):
            rows.k[i, idx, :, :S] = k
            rows.v[i, idx, :, :S] = v
        rows.hidden[idx] = hidden[torch.arange(len(idx), device=idx.device), length[idx] - 1]
        rows.ids[idx] = ids[idx]
        rows.length[idx] = length[idx]

    def _extend(self, rows: _Rows, idx: torch.Tensor, token: torch.Tensor, all_rows: bool) -> None:
        """Run the new ``token`` (n,) of rows ``idx`` (n,), each at its own position, against its cached keys."""
        pos = rows.length[idx]  # (n,) column (= position) of the new token
        W = int(pos.max()) + 1  # columns any of these rows attends to
        cols = torch.arange(W, device=pos.device)
        seen = (cols <= pos[:, None])[:, None, None, :]  # (n, 1, 1, W): made once, not per layer

        def attend_cached(i, layer, q, k, v):  # q (n, H, 1, D), k/v (n, G, 1, D)
            rows.k[i][idx, :, pos] = k[:, :, 0]
            rows.v[i][idx, :, pos] = v[:, :, 0]
            if all_rows:  # the common case: a view, no copy
                keys, values = rows.k[i, :, :, :W], rows.v[i, :, :, :W]
            else:
                keys, values = rows.k[i, idx, :, :W], rows.v[i, idx, :, :W]  # (n, G, W, D)
            if layer.window is None:
                return self.core._attend_one(q, keys, values, seen)
            return self.core._attend_one(q, keys, values, seen & (pos[:, None] - cols < layer.window)[:, None, None, :])

        rows.hidden[idx] = self.core.step_rows(token, pos, attend_cached)
        rows.ids[idx, pos] = token
        rows.length[idx] = pos + 1
