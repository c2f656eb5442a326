"""``textrl/Arithmetic-v0``: answer "a+b=" with the right number; a verifiable reward, exact and per digit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from envs.task import TaskEnv


def _answer_text(completion: str) -> str:
    """What a completion answers: its first line, spaces stripped."""
    return completion.split("\n", 1)[0].strip()


@dataclass(eq=False)
class exact_match:
    """Sequence reward: 1.0 when the completion's first line is exactly the ``answer`` column, else 0.

    >>> exact_match()(completions=["12\\n", " 12", "121", "1"], answer=["12", "12", "12", "12"])
    [1.0, 1.0, 0.0, 0.0]
    """

    def __call__(self, completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [float(_answer_text(c) == str(a)) for c, a in zip(completions, answer, strict=True)]


def _matched(text: str, answer: str) -> int:
    """How many leading characters of ``answer`` the text (leading spaces ignored) gets right, or -1 once the
    text has left the answer's path."""
    text = text.lstrip(" ")
    n = 0
    while n < len(text) and n < len(answer) and text[n] == answer[n]:
        n += 1
    return n if n == len(text) or (n == len(answer) and text[n:].startswith("\n")) else -1


@dataclass(eq=False)
class digit_match:
    """Immediate reward: ``1/len(answer)`` for each correct answer character the new token adds, so a fully
    correct answer earns 1 spread over its digits, credited to the tokens that wrote them.

    >>> r = digit_match()
    >>> r(new_tokens=["1", "2", "3", " "], completions=["1", "12", "13", " "], answer=["12", "12", "12", "12"])
    [0.5, 0.5, 0.0, 0.0]
    """

    kind: str = field(default="immediate", init=False, repr=False)

    def __call__(self, new_tokens: list[str], completions: list[str], answer: list[str]) -> list[float]:
        out = []
        for tok, text, a in zip(new_tokens, completions, answer, strict=True):
            before, now = _matched(text[: len(text) - len(tok)], a), _matched(text, a)
            out.append((now - before) / len(a) if before >= 0 and now > before else 0.0)
        return out


class ArithmeticEnv(TaskEnv):
    """Complete ``a+b=`` (or ``-``, ``*``) with the correct number.

    ## Description
    A task with a verifiable answer, the setting of GRPO-style "RL from verifiable rewards". The prompt
    shows ``shots`` solved examples, one per line, then the problem: ``"3+4=7\\n5+2=7\\n6+1="``. The
    ``answer`` column holds the right result. It also shows what immediate rewards are for: the exact-match
    reward says only *whether* the answer was right, the per-digit reward says *which token* was right
    (set ``digit_weight=0`` to train on exact match alone and compare).

    ## Action Space
    ``Discrete(len(tokenizer))``: the next token (digits are single tokens of the embedded tokenizer).

    ## Observation Space
    ``Dict(input_ids, attention_mask)``, right-padded, as in :class:`envs.TextGenEnv`.

    ## Rewards
    - sequence (:class:`exact_match`): 1 if the first line of the completion is exactly the answer;
    - immediate (:class:`digit_match`, weight ``digit_weight``): ``1/len(answer)`` per correct digit, as
      it is written;
    - plus ``fluency`` x the misspelling-rate guard.

    ## Starting State
    One of all ``(max_operand + 1)**2`` problems over operands ``0..max_operand``, each with its own
    ``shots`` examples (drawn with ``seed``).

    ## Episode End
    eos, a newline (``stop="\\n"``), or ``max_new_tokens`` (default 3) tokens.

    ## Arguments
    - ``max_operand`` (9), ``operator`` ("+": one of ``+ - *``), ``shots`` (2), ``seed`` (0).
    - ``digit_weight`` (0.5): weight of the per-digit immediate reward (0 = exact match only).
    - ``fluency`` (0.0): weight of the misspelling-rate guard; any :class:`envs.TextGenEnv` keyword overrides.

    ## Solved
    ``reward_threshold`` 1.4: about 93% exact answers (each worth 1 + 0.5 in digit rewards).

    ## Version History
    - v0: initial version.
    """

    options: ClassVar[dict[str, Any]] = {
        "max_operand": 9,
        "operator": "+",
        "shots": 2,
        "seed": 0,
        "digit_weight": 0.5,
    }

    @classmethod
    def build(cls, max_operand, operator, shots, seed, digit_weight) -> dict[str, Any]:
        ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
        if operator not in ops:
            raise ValueError(f"operator must be one of {sorted(ops)}, got {operator!r}")
        if max_operand < 1 or shots < 0:
            raise ValueError(f"need max_operand >= 1 and shots >= 0, got {max_operand}, {shots}")
        f = ops[operator]
        problems = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        rng = np.random.default_rng(seed)
        rows = []
        for a, b in problems:
            examples = [problems[i] for i in rng.choice(len(problems), shots, replace=False)]
            context = "".join(f"{x}{operator}{y}={f(x, y)}\n" for x, y in examples)
            rows.append({"prompt": f"{context}{a}{operator}{b}=", "answer": str(f(a, b))})
        reward: dict[Any, float] = {exact_match(): 1.0}
        if digit_weight:
            reward[digit_match()] = float(digit_weight)
        return {"prompts": rows, "reward": reward, "max_new_tokens": 3, "stop": "\n"}
