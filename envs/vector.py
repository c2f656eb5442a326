"""The natively batched vector env, :class:`TextGenVectorEnv`: all sub-envs in one array engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envs.engine import ENV_KEYWORDS, TokenBatch, _observation_space, _prompt_choice, build_engine
from envs.prompts import PromptSource
from envs.render import text_frame
from textrl.rewards import RewardSpec


class TextGenVectorEnv(VectorEnv):
    """``num_envs`` text-generation episodes stepped together as arrays (natively batched).

    It implements :class:`textrl.protocol.TextVectorEnv`, the interface agents train through.

    Behaves exactly like ``gymnasium.vector.SyncVectorEnv`` over ``num_envs`` :class:`TextGenEnv` with
    the same keywords and seeds (same observations, rewards, episode boundaries and infos), but keeps all
    sub-envs in one :class:`TokenBatch` and calls each sequence reward once per batch of finished episodes.

    Autoreset: Gymnasium 1.x ``AutoresetMode.NEXT_STEP`` by default (the step after an episode ends
    resets that sub-env and ignores its action; reward 0); ``AutoresetMode.SAME_STEP`` and ``DISABLED``
    (or their values ``"SameStep"``, ``"Disabled"``) also work, as in ``SyncVectorEnv``. In every mode
    ``info["reset"]`` (with mask ``info["_reset"]``) marks the sub-envs whose observation now starts a new
    prompt, so a policy can drop their KV cache.

    Seeding: ``reset(seed=s)`` seeds sub-env ``i`` with ``s + i`` (as ``SyncVectorEnv`` does).

    Options: as :class:`TextGenEnv` (the same options for every sub-env, as in ``SyncVectorEnv``), plus a
    textrl extension: ``options={"prompt_index": array of num_envs ints}`` starts each sub-env on its own
    prompt (the agents use it to lay out groups of samples of one prompt).

    Rendering: ``render_mode="ansi"`` (or None): ``render()`` returns a list of each sub-env's text;
    ``"rgb_array"``: a tuple of each sub-env's frame (as :class:`TextGenEnv` draws it), the layout of
    ``SyncVectorEnv.render`` that Gymnasium's vector ``RecordVideo`` and ``HumanRendering`` tile.

    Arguments: ``num_envs`` plus every keyword of :class:`TextGenEnv` (``render_mode``: ``"ansi"`` or
    ``"rgb_array"``); ``autoreset_mode``; ``copy`` (return copies of the observation arrays, default True);
    ``max_episode_steps`` (an extra truncation limit, passed by ``gymnasium.make_vec`` when the spec sets one).
    """

    metadata: ClassVar[dict[str, Any]] = {
        "render_modes": ["ansi", "rgb_array"],
        "render_fps": 4,
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }

    def __init__(
        self,
        num_envs: int = 1,
        lm: str = "tiny",
        prompts: PromptSource | None = None,
        reward: RewardSpec = None,
        *,
        tokenizer=None,
        max_new_tokens: int = 32,
        stop: str | Sequence[str] | None = None,
        context_length: int | None = None,
        truncate_prompts: bool = False,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        copy: bool = True,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        _engine: Callable[[int], TokenBatch] | None = None,
    ):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.num_envs = int(num_envs)
        self.init_kwargs = {k: v for k, v in locals().items() if k in ENV_KEYWORDS}
        """The keywords this env was built with (agents build batched copies from them)."""
        if _engine is not None:  # a subclass's engine (e.g. envs.dialogue's, with turns)
            self.engine = _engine(self.num_envs)
        else:
            self.engine = build_engine(self.num_envs, **self.init_kwargs, max_episode_steps=max_episode_steps)
        self.tokenizer = self.engine.tokenizer
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = dict(self.metadata, autoreset_mode=self.autoreset_mode)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        self.copy = copy
        self.single_action_space = spaces.Discrete(self.engine.vocab_size)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.single_observation_space = _observation_space(self.engine)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._rngs: list[np.random.Generator | None] = [None] * self.num_envs
        self._needs_reset = np.ones(self.num_envs, dtype=bool)  # finished, awaiting (auto)reset
        self._all = np.arange(self.num_envs)

    # --- the env protocol (textrl.protocol.TextVectorEnv): what agents read ------------------------------

    @property
    def prompts(self) -> list[str]:
        """The prompt texts, indexed by ``options["prompt_index"]``."""
        return self.engine.prompts.texts

    @property
    def max_new_tokens(self) -> int:
        return self.engine.max_new_tokens

    @property
    def stop(self) -> tuple[str, ...]:
        return self.engine.stop

    @property
    def pad_id(self) -> int:
        return self.engine.pad_id

    @property
    def reward_names(self) -> tuple[str, ...]:
        return tuple(self.engine.rewards.names)

    def prompt_text(self, row: int) -> str:
        """The prompt text that ``row`` started its current episode on."""
        return self.engine.row_text[row]

    # --- helpers -------------------------------------------------------------------------------------

    def _rng(self, i: int) -> np.random.Generator:
        if self._rngs[i] is None:
            self._rngs[i], _ = seeding.np_random(None)
        return self._rngs[i]  # type: ignore[return-value]

    def _reset_rows(self, rows: np.ndarray, options: Mapping[str, Any] | None) -> None:
        per_row = options.get("prompt_index") if options else None
        per_row = np.asarray(per_row) if per_row is not None and np.ndim(per_row) == 1 else None
        if per_row is not None and per_row.shape != (self.num_envs,):
            raise ValueError(f"options['prompt_index'] as an array needs {self.num_envs} entries, got {per_row.shape}")
        for i in rows.tolist():
            opts = options if per_row is None else {**options, "prompt_index": per_row[i]}
            index, text = _prompt_choice(self.engine, opts, self._rng(i))
            self.engine.load(i, index, text)
        self._needs_reset[rows] = False

    def _mask(self, rows: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.num_envs, dtype=bool)
        mask[rows] = True
        return mask

    def _put_reset_info(self, info: dict[str, Any], rows: np.ndarray) -> None:
        """Add what ``TextGenEnv.reset`` puts in ``info`` for ``rows``."""
        mask = self._mask(rows)
        index = np.zeros(self.num_envs, dtype=np.int64)
        index[rows] = self.engine.prompt_idx[rows]
        _put(info, "prompt_index", index, mask)
        _put(info, "prompt", _objects(self.num_envs, rows, [self.engine.row_text[i] for i in rows.tolist()]), mask)
        _put(info, "reset", mask.copy(), mask)

    def _put_step_info(self, info, rows, components, done_rows, ends) -> None:
        """Add what ``TextGenEnv.step`` puts in ``info`` for ``rows``; ``ends`` for ``done_rows`` among them."""
        if rows.size:
            mask = self._mask(rows)
            comp: dict[str, Any] = {}
            for name, values in components.items():
                full = np.zeros(self.num_envs)
                full[rows] = values
                comp[name], comp["_" + name] = full, mask.copy()
            _put(info, "reward_components", comp, mask)
        if done_rows.size:
            mask = self._mask(done_rows)
            index = np.zeros(self.num_envs, dtype=np.int64)
            index[done_rows] = [e["prompt_index"] for e in ends]
            _put(info, "prompt", _objects(self.num_envs, done_rows, [e["prompt"] for e in ends]), mask)
            _put(info, "completion", _objects(self.num_envs, done_rows, [e["completion"] for e in ends]), mask)
            _put(info, "prompt_index", index, mask)

    # --- Gymnasium API -------------------------------------------------------------------------------

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} sub-envs")
        options = dict(options or {})
        rows = self._all
        if "reset_mask" in options:
            mask = np.asarray(options.pop("reset_mask"))
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_ or not mask.any():
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) with a True")
            rows = np.flatnonzero(mask)
        for i in rows.tolist():
            if seeds[i] is not None:
                self._rngs[i], _ = seeding.np_random(seeds[i])
        self._reset_rows(rows, options)
        info: dict[str, Any] = {}
        self._put_reset_info(info, rows)
        return self.engine.observation(copy=self.copy), info

    def step(self, actions, *, active=None):
        """Gymnasium's vector step. ``active`` (a textrl extension, a bool array of ``num_envs``): step only these
        sub-envs; the others are left as they are (no step, no autoreset; reward 0, not done). A rollout on a
        multi-turn env uses it while it feeds the policy a reply's tokens, which are not actions."""
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        if actions.dtype.kind not in "iu":
            raise ValueError(f"actions must be integer token ids, got dtype {actions.dtype}")
        bad = np.flatnonzero((actions < 0) | (actions >= self.engine.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"action {int(actions[i])} of sub-env {i} is out of range: "
                f"token ids are 0..{self.engine.vocab_size - 1}"
            )
        actions = actions.astype(np.int64, copy=False)
        n = self.num_envs
        reward = np.zeros(n)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        info: dict[str, Any] = {}

        act = np.ones(n, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        if act.shape != (n,):
            raise ValueError(f"active must be a bool array of shape ({n},), got {act.shape}")
        resetting = np.flatnonzero(self._needs_reset & act)
        if resetting.size and self.autoreset_mode == AutoresetMode.DISABLED:
            raise RuntimeError(f"sub-envs {resetting.tolist()} finished; reset them (options reset_mask) first")
        if resetting.size:  # NEXT_STEP: these rows start a new prompt now and their actions are ignored
            self._reset_rows(resetting, None)
            self._put_reset_info(info, resetting)
            rows = np.flatnonzero(act & ~self._mask(resetting))
        else:
            rows = self._all if active is None else np.flatnonzero(act)
        if not rows.size:
            return self.engine.observation(copy=self.copy), reward, terminated, truncated, info

        try:
            r, term, trunc, components, ends = self.engine.step(rows, actions[rows])
        except Exception:
            self._needs_reset[rows] = True  # e.g. a RewardError: these episodes cannot go on; next step resets
            raise
        reward[rows], terminated[rows], truncated[rows] = r, term, trunc
        done = np.fromiter(ends, dtype=np.int64, count=len(ends))  # positions in `rows`
        done_rows = rows[done]
        end_list = [ends[int(j)] for j in done]
        self._needs_reset[done_rows] = True
        if self.autoreset_mode != AutoresetMode.SAME_STEP or not done_rows.size:
            self._put_step_info(info, rows, components, done_rows, end_list)
            return self.engine.observation(copy=self.copy), reward, terminated, truncated, info

        # SAME_STEP: finished rows report their last step under final_obs / final_info and restart now.
        live = np.ones(rows.size, dtype=bool)
        live[done] = False
        self._put_step_info(info, rows[live], {k: v[live] for k, v in components.items()}, done_rows[:0], [])
        final_info: dict[str, Any] = {}
        self._put_step_info(final_info, done_rows, {k: v[done] for k, v in components.items()}, done_rows, end_list)
        final = self.engine.observation(done_rows, copy=True)
        final_obs = _objects(n, done_rows, [{k: v[j] for k, v in final.items()} for j in range(done_rows.size)])
        mask = self._mask(done_rows)
        _put(info, "final_obs", final_obs, mask)
        _put(info, "final_info", final_info, mask)
        self._reset_rows(done_rows, None)
        self._put_reset_info(info, done_rows)
        return self.engine.observation(copy=self.copy), reward, terminated, truncated, info

    def render(self):
        texts = [(self.engine.row_text[i], self.engine.completion_text(i)) for i in range(self.num_envs)]
        if self.render_mode == "rgb_array":  # one frame per sub-env, as SyncVectorEnv.render returns them
            return tuple(text_frame(prompt, completion) for prompt, completion in texts)
        return [prompt + completion for prompt, completion in texts]


def _objects(n: int, rows: np.ndarray, values: list[Any]) -> np.ndarray:
    out = np.full(n, None, dtype=object)
    for i, v in zip(rows.tolist(), values, strict=True):
        out[i] = v
    return out


def _put(info: dict[str, Any], key: str, values: Any, mask: np.ndarray) -> None:
    """Merge ``values`` (valid where ``mask``) into ``info[key]`` in SyncVectorEnv's array + ``_key`` layout."""
    if key not in info:
        info[key], info["_" + key] = values, mask.copy()
    elif isinstance(values, dict):
        for k, v in values.items():
            if not k.startswith("_"):
                _put(info[key], k, v, values["_" + k])
        info["_" + key] |= mask
    else:
        info[key][mask] = values[mask]
        info["_" + key] |= mask
