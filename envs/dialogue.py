"""Multi-turn text generation: the agent writes a turn, the environment answers, the agent goes on.

:class:`MultiTurnEnv` (single) and :class:`MultiTurnVectorEnv` (natively batched) run on
:class:`DialogueBatch`, the array engine of :mod:`envs.engine` with turns. Each action appends one token to
the agent's current turn, as in :class:`envs.TextGenEnv`. The turn ends at the eos token, a ``turn_stop``
string, ``max_turn_tokens`` tokens, or the end of the episode's tokens. The env then calls
``respond(state, turn)``:

- ``state`` is the episode's own dict. It starts as ``{"prompt": text, "turn": i, **the prompt row's
  fields}``, and ``respond`` may keep anything in it from turn to turn (a game's secret, a tool's memory).
- ``turn`` is the text of the agent's turn (special tokens skipped). ``state["turn"]`` is its index from 0.
- ``respond`` returns a :class:`Reply`, or a tuple ``(reply, reward, done)``. ``reply`` is text, a list of
  token ids, or None; ``reward`` is the turn's reward; ``done`` ends the episode (terminated).

The reply's tokens (``reply_template`` formats the text first, e.g. ``"\\nUser: {reply}\\nAgent:"``) are
appended to the observation: the model reads them, but they are never actions. The agent's sampled tokens
are kept as sampled, never decoded and re-encoded. ``info["env_tokens"]`` is how many reply tokens this
step appended; they sit right after the step's action in the observation. ``info["turn_end"]`` marks the
last step of a turn.

The episode ends when ``respond`` says ``done`` (terminated), after ``max_turns`` agent turns (truncated:
the last turn is still scored), or when it has used its tokens (truncated). Every episode may add as many
tokens (actions and replies) as the context leaves after the longest prompt of the set, so that a batch of
episodes fits the context side by side. Rewards come from three places:

- immediate rewards, on every token;
- the turn's reward, on the turn's last token;
- sequence rewards, on the last step. Their ``completions`` are the whole transcript after the prompt: the
  agent's turns and the replies, as the model saw it.

``info["reward_components"]["turn"]`` is the turn reward of the step.

Bad input:

- A ``respond`` that raises is a :class:`RespondError` naming the episode and the turn (``on_error="raise"``,
  the default). ``on_error="reply"`` sends ``"Error: <message>"`` back to the agent instead, and counts it in
  ``info["respond_errors"]``.
- A reply of the wrong type is always a :class:`RespondError`.
- A reply that does not fit the context is an error, unless ``truncate_replies`` ends the episode there
  (truncated).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from envs.engine import ENV_KEYWORDS, TokenBatch, _observation_space, build_engine
from envs.prompts import PromptSource
from envs.textgen import TextGenEnv
from envs.vector import TextGenVectorEnv, _put
from textrl.rewards import RewardSpec


@dataclass(frozen=True)
class Reply:
    """What the env says after an agent's turn."""

    reply: str | Sequence[int] | None = None
    """Text (formatted by ``reply_template`` and tokenized), token ids (appended as they are), or None."""
    reward: float = 0.0
    """The turn's reward, given on the turn's last token."""
    done: bool = False
    """End the episode after this turn (terminated)."""


Respond = Callable[[dict[str, Any], str], "Reply | tuple"]
"""``respond(state, turn) -> Reply | (reply, reward, done)``."""


class RespondError(ValueError):
    """``respond`` raised, returned something that is not a reply, or its reply does not fit the context."""


DIALOGUE_KEYWORDS = ("respond", "max_turns", "max_turn_tokens", "turn_stop", "reply_template", "on_error", "chat")
"""The keywords a multi-turn env adds to :data:`envs.engine.ENV_KEYWORDS`."""


class DialogueBatch(TokenBatch):
    """:class:`envs.engine.TokenBatch` with turns: the rows' episodes alternate agent turns and env replies."""

    def __init__(
        self,
        *engine_args: Any,
        respond: Respond,
        max_turns: int,
        max_turn_tokens: int,
        turn_stop: Sequence[str],
        reply_template: str,
        on_error: str,
        truncate_replies: bool,
        turn_close: Sequence[int] = (),
    ):
        """``engine_args``: :class:`envs.engine.TokenBatch`'s (its ``max_new_tokens`` is ``max_turn_tokens``);
        ``turn_close``: the tokens that close an agent turn in the chat template, put before a text reply when
        the turn did not end with them itself."""
        super().__init__(*engine_args)
        self.turn_close = [int(t) for t in turn_close]
        self.respond_fn, self.max_turns, self.max_turn_tokens = respond, max_turns, max_turn_tokens
        self.stop = tuple(turn_stop)  # a stop string ends the turn (the base engine scans the current turn)
        self._stop_window = max((4 * len(s) for s in self.stop), default=0)
        self.reply_template, self.on_error, self.truncate_replies = reply_template, on_error, truncate_replies
        B = len(self.length)
        self.turns = np.zeros(B, dtype=np.int64)  # agent turns finished in the episode
        # tokens an episode may add after its prompt (actions and replies): what the context leaves after the
        # longest prompt, the same for every episode, so that a batch of them fits the context side by side
        self.max_steps = self.C - self.prompts.max_len
        self.end = np.zeros(B, dtype=np.int64)  # the row's last usable column: prompt + max_steps, within C
        self.acted = np.zeros((B, self.C), dtype=np.int8)  # 1 where the agent took the token
        self.state: list[dict[str, Any]] = [{} for _ in range(B)]
        self.respond_errors = np.zeros(B, dtype=np.int64)
        self.env_tokens = np.zeros(B, dtype=np.int64)  # reply tokens the row's last step appended
        self.turn_end = np.zeros(B, dtype=bool)  # whether the row's last step ended the agent's turn

    def load(self, row: int, index: int | None, text: str | None = None) -> None:
        super().load(row, index, text)
        self.turns[row] = 0
        self.acted[row].fill(0)
        self.respond_errors[row] = self.env_tokens[row] = 0
        self.turn_end[row] = False
        self.state[row] = {"prompt": self.row_text[row], "turn": 0, **self.row_fields[row]}
        self.end[row] = min(self.C, self.prompt_len[row] + self.max_steps)

    def step(self, rows: np.ndarray, actions: np.ndarray):
        """Append ``actions`` to ``rows`` and answer the turns that ended; return what
        :meth:`envs.engine.TokenBatch.step` returns (components with ``"turn"``, ends with ``"turns"``). The
        reply tokens appended to each row and whether its turn ended are left in :attr:`env_tokens` and
        :attr:`turn_end` (B,)."""
        k = len(rows)
        pos = self.length[rows]
        self.tokens[rows, pos] = actions
        self.mask[rows, pos] = 1
        self.acted[rows, pos] = 1
        self.length[rows] = pos + 1
        names = self.rewards.names
        components = {name: np.zeros(k) for name in names}
        components["turn"] = np.zeros(k)
        reward = np.zeros(k)
        if self.rewards.immediate_terms:
            generated = self.length[rows] - self.prompt_len[rows]
            total, parts = self.rewards.immediate(self._context(rows, actions, generated), k)
            reward += total
            components.update(parts)

        turn_over = (actions == self.eos_id) | (self.length[rows] - self.turn_start[rows] >= self.max_turn_tokens)
        turn_over |= self.length[rows] >= self.end[rows]
        if self.stop:
            for j in np.flatnonzero(~turn_over):
                turn_over[j] = self._stopped(rows[j])
        terminated, truncated = np.zeros(k, dtype=bool), np.zeros(k, dtype=bool)
        appended = np.zeros(k, dtype=np.int64)
        for j in np.flatnonzero(turn_over).tolist():
            r = int(rows[j])
            reply = self._reply(r)
            self.turns[r] += 1
            reward[j] += reply.reward
            components["turn"][j] = reply.reward
            if reply.done:
                terminated[j] = True
            elif self.turns[r] >= self.max_turns or self.length[r] >= self.end[r]:
                truncated[j] = True
            else:
                appended[j] = self._append(r, reply.reply)
                truncated[j] = appended[j] < 0
                appended[j] = max(0, appended[j])
                self.state[r]["turn"] = int(self.turns[r])

        ends = self._finish(rows, np.flatnonzero(terminated | truncated), reward, components)
        self.env_tokens[rows], self.turn_end[rows] = appended, turn_over
        return reward, terminated, truncated, components, ends

    def _end_info(self, row: int) -> dict[str, Any]:
        return {"turns": int(self.turns[row])}

    def _where(self, row: int) -> str:
        return (
            f"in the episode of prompt {int(self.prompt_idx[row])} ({self.row_text[row]!r}), "
            f"turn {int(self.turns[row])}"
        )

    def _reply(self, row: int) -> Reply:
        """Call ``respond`` on the agent's turn that just ended, and check what it returned."""
        ids = self.tokens[row, self.turn_start[row] : self.length[row]]
        turn = self.tokenizer.decode(ids, skip_special_tokens=True)
        name = getattr(self.respond_fn, "__name__", type(self.respond_fn).__name__)
        try:
            out = self.respond_fn(self.state[row], turn)
        except Exception as e:
            if self.on_error != "reply":
                raise RespondError(f"respond {name!r} raised {type(e).__name__}: {e} {self._where(row)}") from e
            self.respond_errors[row] += 1
            return Reply(f"Error: {e}")
        if isinstance(out, tuple):
            if len(out) != 3:
                raise RespondError(
                    f"respond {name!r} returned a tuple of {len(out)} items {self._where(row)}; "
                    "return (reply, reward, done) or a Reply"
                )
            out = Reply(*out)
        if not isinstance(out, Reply):
            raise RespondError(
                f"respond {name!r} returned {type(out).__name__} {self._where(row)}; "
                "return (reply, reward, done) or a Reply"
            )
        if not isinstance(out.reward, numbers.Real) or not math.isfinite(out.reward):
            raise RespondError(
                f"respond {name!r} returned the reward {out.reward!r} {self._where(row)}; need a finite number"
            )
        if not isinstance(out.done, (bool, np.bool_)):
            raise RespondError(f"respond {name!r} returned done={out.done!r} {self._where(row)}; need a bool")
        reply = out.reply
        ok = reply is None or isinstance(reply, str)
        ok = ok or (isinstance(reply, Sequence | np.ndarray) and all(isinstance(t, numbers.Integral) for t in reply))
        if not ok:
            raise RespondError(
                f"respond {name!r} returned the reply {reply!r} {self._where(row)}; need text, token ids or None"
            )
        return Reply(reply, float(out.reward), bool(out.done))

    def _append(self, row: int, reply: str | Sequence[int] | None) -> int:
        """Append the reply's tokens to ``row`` and start the agent's next turn; the number appended, or -1 when
        it does not fit and ``truncate_replies`` ends the episode."""
        if reply is None:
            ids: list[int] = []
        elif isinstance(reply, str):
            ids = self.tokenizer.encode(self.reply_template.format(reply=reply), add_special_tokens=False)
            close = self.turn_close
            if close and self.tokens[row, self.length[row] - len(close) : self.length[row]].tolist() != close:
                ids = close + ids  # chat: the turn ended at its token limit or a stop string, not at eos
        else:
            ids = [int(t) for t in reply]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RespondError(
                    f"the reply {self._where(row)} has token id {bad[0]}, outside 0..{self.vocab_size - 1}"
                )
        start, m, end = int(self.length[row]), len(ids), int(self.end[row])
        if start + m >= end:  # the agent needs room for at least one token of its next turn
            if self.truncate_replies:
                return -1
            raise RespondError(
                f"the reply {self._where(row)} has {m} tokens and the episode has {end - start} left (of "
                f"{self.max_steps} after the prompt), with none for the agent's next turn: shorten the replies, "
                "lower max_turns, give a larger context_length, or pass truncate_replies=True to end such "
                "episodes (truncated)"
            )
        self.tokens[row, start : start + m] = ids
        self.mask[row, start : start + m] = 1
        self.length[row] = self.turn_start[row] = start + m
        return m

    def observation(self, rows: slice | np.ndarray = slice(None), copy: bool = True) -> dict[str, np.ndarray]:
        obs = super().observation(rows, copy)
        obs["action_mask"] = self.acted[rows].copy() if copy else self.acted[rows]
        return obs


def chat_turns(tokenizer, role: str = "user") -> tuple[str, str]:
    """How the tokenizer's chat template continues a conversation after an agent turn: ``(close, template)``.

    ``close`` is the text that ends the assistant's turn when it is the eos token (the agent's turn usually
    ends by sampling it, so it is the agent's token), else ""; ``template`` is the rest up to the next
    assistant turn's generation prompt, with ``{reply}`` where a ``role`` message's content goes. Both are
    read off the template itself by rendering a conversation with marker contents, so any template works
    whose rendering of a conversation starts with its rendering of that conversation's first turns.

    Raises:
        ValueError: the tokenizer has no chat template, or the template does not render the conversation.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat=True renders the conversation with the tokenizer's chat template, and this tokenizer has none; "
            "set tokenizer.chat_template or use reply_template"
        )
    agent, reply = "AGENTTURNMARKER", "ENVREPLYMARKER"
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": agent}]
    try:
        full = tokenizer.apply_chat_template(
            [*turns, {"role": role, "content": reply}], add_generation_prompt=True, tokenize=False
        )
    except Exception as e:  # a template's own checks, e.g. roles that must alternate
        raise ValueError(f"the chat template cannot render a {role!r} reply after an agent turn: {e}") from e
    if full.count(agent) != 1 or full.count(reply) != 1 or full.index(agent) > full.index(reply):
        raise ValueError(f"the chat template does not render the agent's turn and a {role!r} reply in order")
    after = full[full.index(agent) + len(agent) :]
    eos = tokenizer.eos_token or ""
    close = eos if eos and after.startswith(eos) else ""
    return close, after[len(close) :].replace("{", "{{").replace("}", "}}").replace(reply, "{reply}")


def build_dialogue(num_rows: int, keywords: Mapping[str, Any], dialogue: Mapping[str, Any]) -> DialogueBatch:
    """Validate the multi-turn keywords and build the engine (shared by both envs)."""
    respond = dialogue["respond"]
    if not callable(respond):
        raise TypeError(f"respond must be a callable respond(state, turn), got {type(respond).__name__}")
    for key in ("max_turns", "max_turn_tokens"):
        value = dialogue[key]
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if dialogue["on_error"] not in ("raise", "reply"):
        raise ValueError(f"on_error must be 'raise' or 'reply', got {dialogue['on_error']!r}")
    template = dialogue["reply_template"]
    if not isinstance(template, str) or "{reply}" not in template:
        raise ValueError(f"reply_template must be a string with a {{reply}} field, got {template!r}")
    turn_stop = dialogue["turn_stop"]
    turn_stop = [turn_stop] if isinstance(turn_stop, str) else [s for s in (turn_stop or []) if s]
    keywords = dict(keywords)
    chat, close = dialogue.get("chat", False), []
    if chat:
        if template != "{reply}":
            raise ValueError("chat renders the replies with the chat template; leave reply_template out")
        if keywords.get("tokenizer") is None:
            from textrl.lm import lm_context_length, load_tokenizer

            keywords["tokenizer"] = load_tokenizer(keywords["lm"])
            keywords["tokenizer"].textrl_context_length = lm_context_length(keywords["lm"])
        role = "user" if chat is True else chat
        close_text, template = chat_turns(keywords["tokenizer"], role)
        close = keywords["tokenizer"].encode(close_text, add_special_tokens=False) if close_text else []
    if keywords.get("context_length") is None:  # the replies' lengths are unknown: the model's whole context
        from textrl.lm import lm_context_length

        tokenizer = keywords.get("tokenizer")
        context = getattr(tokenizer, "textrl_context_length", None) if tokenizer else lm_context_length(keywords["lm"])
        if context is None:
            raise ValueError("the model's context length is unknown: give context_length")
        keywords["context_length"] = int(context)
    return build_engine(
        num_rows,
        **keywords,
        max_new_tokens=int(dialogue["max_turn_tokens"]),
        stop=None,
        engine=DialogueBatch,
        respond=respond,
        max_turns=int(dialogue["max_turns"]),
        max_turn_tokens=int(dialogue["max_turn_tokens"]),
        turn_stop=turn_stop,
        reply_template=template,
        on_error=dialogue["on_error"],
        truncate_replies=bool(dialogue["truncate_replies"]),
        chat=bool(chat),
        turn_close=close,
    )


def _dialogue_space(engine: DialogueBatch) -> spaces.Dict:
    space = _observation_space(engine)
    return spaces.Dict({**space.spaces, "action_mask": spaces.Box(0, 1, (engine.C,), np.int8)})


def _split(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine keywords, dialogue keywords) of a multi-turn env's constructor arguments."""
    env = {k: v for k, v in kwargs.items() if k in ENV_KEYWORDS}
    return env, {k: v for k, v in kwargs.items() if k in (*DIALOGUE_KEYWORDS, "truncate_replies")}


class MultiTurnEnv(TextGenEnv):
    """A conversation with the environment, one token per step (see the module docstring for the rules).

    ## Observation Space
    As :class:`envs.TextGenEnv`'s, plus ``action_mask`` (``Box(0, 1, (C,), int8)``): 1 where the agent took the
    token, 0 on the prompt, the env's replies and padding.

    ## Arguments
    ``respond`` (required), ``max_turns`` (default 4), ``max_turn_tokens`` (default 32), ``turn_stop`` (strings
    that end a turn), ``reply_template`` (default ``"{reply}"``), ``on_error`` (``"raise"`` or ``"reply"``),
    ``truncate_replies``, ``chat`` (True or a role such as ``"tool"``: render the prompt and every reply with
    the tokenizer's chat template, the replies as messages of that role, ``"user"`` for True), and
    :class:`envs.TextGenEnv`'s ``lm``, ``prompts``, ``reward``, ``tokenizer``,
    ``context_length`` (default: the model's context), ``truncate_prompts`` and ``render_mode``.

    ## Info
    Every step: ``env_tokens`` (reply tokens appended after this step's action), ``turn_end``, ``turn`` (agent
    turns finished), ``respond_errors`` (replies that were errors, ``on_error="reply"``) and
    ``reward_components`` (with ``"turn"``). The last step also has ``prompt``, ``completion`` (the
    transcript after the prompt), ``prompt_index`` and ``turns``.
    """

    def __init__(
        self,
        lm: str = "tiny",
        prompts: PromptSource | None = None,
        reward: RewardSpec = None,
        *,
        respond: Respond,
        max_turns: int = 4,
        max_turn_tokens: int = 32,
        turn_stop: str | Sequence[str] | None = None,
        reply_template: str = "{reply}",
        on_error: str = "raise",
        truncate_replies: bool = False,
        chat: bool | str = False,
        tokenizer=None,
        context_length: int | None = None,
        truncate_prompts: bool = False,
        render_mode: str | None = None,
    ):
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "render_mode", "__class__")}
        super().__init__(lm, render_mode=render_mode, _engine=lambda: build_dialogue(1, *_split(kwargs)))
        self.init_kwargs = kwargs
        """The keywords this env was built with (agents build batched copies from them)."""
        self.observation_space = _dialogue_space(self.engine)

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        engine = self.engine
        info |= {
            "env_tokens": int(engine.env_tokens[0]),
            "turn_end": bool(engine.turn_end[0]),
            "turn": int(engine.turns[0]),
            "respond_errors": int(engine.respond_errors[0]),
        }
        return obs, reward, terminated, truncated, info


class MultiTurnVectorEnv(TextGenVectorEnv):
    """``num_envs`` :class:`MultiTurnEnv` episodes stepped together as arrays (natively batched): the same
    observations, rewards and infos as ``SyncVectorEnv`` over :class:`MultiTurnEnv` with the same keywords and
    seeds. Arguments: ``num_envs``, :class:`MultiTurnEnv`'s, and :class:`envs.TextGenVectorEnv`'s
    ``autoreset_mode`` and ``copy``."""

    def __init__(
        self,
        num_envs: int = 1,
        lm: str = "tiny",
        prompts: PromptSource | None = None,
        reward: RewardSpec = None,
        *,
        respond: Respond,
        max_turns: int = 4,
        max_turn_tokens: int = 32,
        turn_stop: str | Sequence[str] | None = None,
        reply_template: str = "{reply}",
        on_error: str = "raise",
        truncate_replies: bool = False,
        chat: bool | str = False,
        tokenizer=None,
        context_length: int | None = None,
        truncate_prompts: bool = False,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        copy: bool = True,
        render_mode: str | None = None,
    ):
        skip = ("self", "num_envs", "autoreset_mode", "copy", "render_mode", "__class__")
        kwargs = {k: v for k, v in locals().items() if k not in skip}
        super().__init__(
            num_envs,
            lm,
            prompts,
            reward,
            tokenizer=tokenizer,
            max_new_tokens=max_turn_tokens,
            context_length=context_length,
            truncate_prompts=truncate_prompts,
            autoreset_mode=autoreset_mode,
            copy=copy,
            render_mode=render_mode,
            _engine=lambda n: build_dialogue(n, *_split(kwargs)),
        )
        self.init_kwargs = kwargs
        self.single_observation_space = _dialogue_space(self.engine)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)

    @property
    def reward_names(self) -> tuple[str, ...]:
        """The env's reward terms, then ``"turn"`` (``respond``'s turn rewards)."""
        return (*self.engine.rewards.names, "turn")

    @property
    def max_new_tokens(self) -> int:
        """The most steps an episode can take (agent tokens and reply tokens): the context left after the
        longest prompt. A rollout sizes its buffers with it."""
        return self.engine.max_steps

    def _put_step_info(self, info, rows, components, done_rows, ends) -> None:
        super()._put_step_info(info, rows, components, done_rows, ends)
        if rows.size:
            mask = self._mask(rows)
            engine = self.engine
            for key, values in (
                ("env_tokens", engine.env_tokens),
                ("turn_end", engine.turn_end),
                ("turn", engine.turns),
                ("respond_errors", engine.respond_errors),
            ):
                full = np.zeros(self.num_envs, dtype=values.dtype)
                full[rows] = values[rows]
                _put(info, key, full, mask)
        if done_rows.size:
            turns = np.zeros(self.num_envs, dtype=np.int64)
            turns[done_rows] = [e["turns"] for e in ends]
            _put(info, "turns", turns, self._mask(done_rows))
