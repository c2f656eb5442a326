"""``textrl/Arithmetic-v0``: answer "a+b=" with the right number; a verifiable reward, exact and per digit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from envs.task import TaskEnv

_END = ".\n"
"""Characters that may end an answer (the examples end each answer with one of them)."""


def _answer_text(completion: str) -> str:
    """What a completion answers: its first line, without surrounding spaces and a closing full stop."""
    return completion.split("\n", 1)[0].strip().removesuffix(".").strip()


@dataclass(eq=False)
class exact_match:
    """Sequence reward: 1.0 when the completion's first line (spaces and a final full stop stripped) is
    exactly the ``answer`` column, else 0.

    >>> exact_match()(completions=["12\\n", " 12", "121", "1", " seven."], answer=["12", "12", "12", "12", "seven"])
    [1.0, 1.0, 0.0, 0.0, 1.0]
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
    return n if n == len(text) or (n == len(answer) and text[n] in _END) else -1


@dataclass(eq=False)
class digit_match:
    """Immediate reward: ``1/len(answer)`` for each correct answer character the new token adds (digits, or
    the letters of a number word), so a fully correct answer earns 1 spread over the tokens that wrote it.

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


_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """English words for 0 <= n < 100.

    >>> number_words(7), number_words(40), number_words(81)
    ('seven', 'forty', 'eighty-one')
    """
    if not 0 <= n < 100:
        raise ValueError(f"number_words covers 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_WORD_FORMS = {"+": "{a} and {b} make", "-": "{a} less {b} leave", "*": "{a} times {b} make"}


class ArithmeticEnv(TaskEnv):
    """Complete ``a+b=`` (or ``-``, ``*``) with the correct number, in digits or in words.

    ## Description
    A task with a verifiable answer, the setting of GRPO-style "RL from verifiable rewards". The prompt
    shows ``shots`` solved examples, one per line, then the problem: ``"3+4=7\\n5+2=7\\n6+1="`` with
    ``numerals="digits"``, or ``"three and four make seven.\\nfive and two make seven.\\nsix and one make"``
    with ``numerals="words"``. The ``answer`` column holds the right result.

    The default is ``"words"`` because the embedded LM learned English from Shakespeare and the King James
    Bible, which write numbers in words: it gives digit tokens a probability below 1e-4 after ``"8+4=12\\n..."``,
    so with digits there is nothing for RL to reinforce. Use ``numerals="digits"`` with an LM that has
    seen digits.

    It also shows what immediate rewards are for: the exact-match reward says only *whether* the answer was
    right, the per-character reward says *which token* was right (``digit_weight=0`` trains on exact match
    alone, to compare).

    ## Action Space
    ``Discrete(len(tokenizer))``: the next token.

    ## Observation Space
    ``Dict(input_ids, attention_mask)``, right-padded, as in :class:`envs.TextGenEnv`.

    ## Rewards
    - sequence (:class:`exact_match`): 1 if the first line of the completion is exactly the answer;
    - immediate (:class:`digit_match`, weight ``digit_weight``): ``1/len(answer)`` per correct character
      (digit or letter), as it is written;
    - plus ``fluency`` x the misspelling-rate guard.

    ## Starting State
    One of the ``(max_operand + 1)**2`` problems over operands ``0..max_operand`` (``a >= b`` for ``-`` in
    words), each with its own ``shots`` examples (drawn with ``seed``).

    ## Episode End
    eos, a newline or full stop (``stop``), or ``max_new_tokens`` (3 with digits, 4 with words) tokens.

    ## Arguments
    - ``numerals`` ("words"): ``"words"`` or ``"digits"``.
    - ``max_operand`` (9; at most 9 in words), ``operator`` ("+": one of ``+ - *``), ``shots`` (2), ``seed`` (0).
    - ``digit_weight`` (0.5): weight of the per-character immediate reward (0 = exact match only).
    - ``fluency`` (0.0): weight of the misspelling-rate guard; any :class:`envs.TextGenEnv` keyword overrides.

    ## Solved
    ``reward_threshold`` 1.4: about 93% exact answers (each worth 1 + 0.5 in per-character rewards).

    ## Version History
    - v0: initial version.
    """

    options: ClassVar[dict[str, Any]] = {
        "numerals": "words",
        "max_operand": 9,
        "operator": "+",
        "shots": 2,
        "seed": 0,
        "digit_weight": 0.5,
    }

    @classmethod
    def build(cls, numerals, max_operand, operator, shots, seed, digit_weight) -> dict[str, Any]:
        if operator not in _OPS:
            raise ValueError(f"operator must be one of {sorted(_OPS)}, got {operator!r}")
        if numerals not in ("digits", "words"):
            raise ValueError(f"numerals must be 'digits' or 'words', got {numerals!r}")
        if not 1 <= max_operand <= (9 if numerals == "words" else 10**6) or shots < 0:
            raise ValueError(f"need 1 <= max_operand (<= 9 in words) and shots >= 0, got {max_operand}, {shots}")
        f = _OPS[operator]
        problems = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        if numerals == "words" and operator == "-":
            problems = [(a, b) for a, b in problems if a >= b]  # no negative numbers in words

        def show(a: int, b: int) -> tuple[str, str]:  # (question, answer)
            if numerals == "digits":
                return f"{a}{operator}{b}=", str(f(a, b))
            return _WORD_FORMS[operator].format(a=number_words(a), b=number_words(b)), number_words(f(a, b))

        rng = np.random.default_rng(seed)
        rows = []
        for a, b in problems:
            examples = [show(*problems[i]) for i in rng.choice(len(problems), shots, replace=False)]
            question, answer = show(a, b)
            if numerals == "digits":
                context = "".join(f"{q}{ans}\n" for q, ans in examples)
            else:
                context = "".join(f"{q[0].upper()}{q[1:]} {ans}.\n" for q, ans in examples)
                question = question[0].upper() + question[1:]
            rows.append({"prompt": context + question, "answer": answer})
        reward: dict[Any, float] = {exact_match(): 1.0}
        if digit_weight:
            reward[digit_match()] = float(digit_weight)
        stop = ["\n"] if numerals == "digits" else ["\n", "."]
        return {"prompts": rows, "reward": reward, "max_new_tokens": 3 if numerals == "digits" else 4, "stop": stop}
