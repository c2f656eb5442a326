"""``textrl/Calculator-v0``: tool use. The env asks for a multi-step calculation ("What is 37 * 48 + 12?"); the
agent may call a calculator (``<calc>37 * 48 + 12</calc>``), the env appends the result (`` = 1788``), and the
agent states the answer ("Answer: 1788"). The answers are 3-4 digit numbers: a 4M model cannot guess them, so
the task is solvable only with the tool.

A transcript, as the model reads it (the prompt, then the agent's turns and the env's replies)::

    What is 37 * 48 + 12?
    <calc>37 * 48 + 12</calc> = 1788
    Answer: 1788

The embedded model has never seen the call syntax, so RL alone does not find it (tiny wrote no call in 30k
tokens of REINFORCE): :func:`demonstrations` generates solved episodes for a short supervised warm start with
``textrl sft`` (``python -m envs.calculator demos demos.jsonl``), and RL goes on from the fine-tuned model.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envs.dialogue import MultiTurnEnv, MultiTurnVectorEnv, Reply

PROMPT = "What is {expression}?\n"
"""The prompt of a problem; the expression is written with spaces around the operators."""
REPLY_TEMPLATE = " {reply}\n"
"""The env's reply after the agent's turn: ``" = 1788\\n"`` after a call, ``" Error: ...\\n"`` after a bad one."""
CALL_REWARD = 0.1
"""The turn reward of a well-formed call whose result is a step of the solution (each step once)."""
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""The chat template of :func:`demonstrations`' rows for ``textrl sft``: the messages' contents concatenated,
without role markers, so that a rendered demonstration is exactly the env's transcript."""
N_PROBLEMS = 256
"""The default size of the env's problem set."""
MAX_OPERATIONS = 8
"""The most operators one call may have."""
MAX_VALUE = 10**12
"""A call whose result (or an intermediate value) is this large or larger is an error (its reply would not fit)."""

_NUMBER = re.compile(r"\s*(-?[0-9]{1,12})\s*")  # [0-9], not \d: int() would also read other scripts' digits
_OPERATOR = re.compile(r"[-+*]")
_CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
_ANSWER = re.compile(r"Answer:\s*(-?[0-9]+)?")


@dataclass(frozen=True)
class Step:
    """One operation of a calculation: ``left op right = value``."""

    left: int
    op: str
    right: int
    value: int


def parse(expression: str) -> tuple[list[int], list[str]]:
    """The numbers and operators of ``expression``: integers (an optional leading minus, up to 12 digits each)
    joined by ``+``, ``-`` and ``*``, spaces allowed. Nothing is evaluated as Python: anything else is a
    ValueError (a short message the env sends back to the agent)."""
    numbers: list[int] = []
    operators: list[str] = []
    pos = 0
    while True:
        number = _NUMBER.match(expression, pos)
        if number is None:
            raise ValueError("expected a number")
        numbers.append(int(number.group(1)))
        pos = number.end()
        if pos == len(expression):
            return numbers, operators
        operator = _OPERATOR.match(expression, pos)
        if operator is None:
            raise ValueError("only integers and + - *")
        if len(operators) == MAX_OPERATIONS:
            raise ValueError(f"more than {MAX_OPERATIONS} operations")
        operators.append(operator.group())
        pos = operator.end()


def solve(numbers: Sequence[int], operators: Sequence[str]) -> list[Step]:
    """The operations of the calculation in the order they are done: the products first (left to right), then
    the sums and differences (left to right). The last step's value is the result."""
    numbers, operators = list(numbers), list(operators)
    steps = []
    while operators:
        i = operators.index("*") if "*" in operators else 0
        a, op, b = numbers[i], operators[i], numbers[i + 1]
        value = a * b if op == "*" else a + b if op == "+" else a - b
        if abs(value) >= MAX_VALUE:
            raise ValueError("too large")
        steps.append(Step(a, op, b, value))
        numbers[i : i + 2] = [value]
        del operators[i]
    return steps


def calculate(expression: str) -> int:
    """The value of ``expression`` (see :func:`parse`), with the usual precedence.

    >>> calculate("37 * 48 + 12")
    1788
    """
    numbers, operators = parse(expression)
    steps = solve(numbers, operators)
    return steps[-1].value if steps else numbers[0]


def calculator_reply(state: dict[str, Any], turn: str) -> Reply:
    """The env's rules for one agent turn:

    - a call (the turn has ``<calc>`` or ``</calc>``): ``<calc>EXPR</calc>`` with a valid EXPR is a well-formed
      call; the reply is its result (``"= 1788"``), and its reward :data:`CALL_REWARD` when the result is a step
      of the problem's solution not credited yet. Anything else (unclosed, bad expression) is a malformed call:
      the reply says why (``"Error: ..."``), reward 0;
    - an answer (``"Answer:"``) ends the episode: reward 1 when its number is the problem's answer, else 0;
    - any other turn: no reply, reward 0.

    ``state`` counts the episode's well-formed calls (``"calls"``) and malformed ones (``"call_errors"``).
    """
    state.setdefault("calls", 0)
    state.setdefault("call_errors", 0)
    uncredited = state.setdefault("uncredited", list(state["steps"]))
    if "<calc>" in turn or "</calc>" in turn:
        call = _CALL.search(turn)
        try:
            if call is None:
                raise ValueError("call not closed" if "<calc>" in turn else "call not opened")
            value = calculate(call.group(1))
        except ValueError as e:
            state["call_errors"] += 1
            return Reply(f"Error: {e}")
        state["calls"] += 1
        reward = 0.0
        if value in uncredited:
            uncredited.remove(value)
            reward = CALL_REWARD
        return Reply(f"= {value}", reward=reward)
    answer = _ANSWER.search(turn)
    if answer is not None:
        right = answer.group(1) is not None and int(answer.group(1)) == state["answer"]
        return Reply(None, reward=1.0 if right else 0.0, done=True)
    return Reply(None)


def tool_use(transcript: str) -> dict[str, int]:
    """Count the calls in an episode's transcript (``info["completion"]``, or an evaluation's completion) as the
    env's ``state`` counts them: ``calls`` (well-formed, ``<calc>EXPR</calc>`` with a valid EXPR) and
    ``call_errors`` (malformed). A call's turn ends at ``</calc>`` or a newline (every reply ends with one)."""
    counts = {"calls": 0, "call_errors": 0}
    opened = None  # where the expression of an open call starts
    for tag in re.finditer(r"<calc>|</calc>|\n", transcript):
        if tag.group() == "<calc>":
            opened = tag.end() if opened is None else opened
        elif tag.group() == "</calc>":
            well_formed = opened is not None and _valid(transcript[opened : tag.start()])
            counts["calls" if well_formed else "call_errors"] += 1
            opened = None
        elif opened is not None:  # a newline inside a call: unclosed
            counts["call_errors"] += 1
            opened = None
    if opened is not None:  # the episode ended inside a call (its last turn is still answered)
        counts["call_errors"] += 1
    return counts


def _valid(expression: str) -> bool:
    try:
        calculate(expression)
    except ValueError:
        return False
    return True


def problems(n: int, steps: int = 2, seed: int = 0, low: int = 10, high: int = 99) -> list[dict[str, Any]]:
    """``n`` distinct problems of ``steps`` operations on numbers in ``low..high`` (at least one product), whose
    answer and every intermediate value are in 100..9999: prompt rows with the fields ``expression``,
    ``answer`` and ``steps`` (the intermediate values, in the order of :func:`solve`)."""
    if not 2 <= steps <= 4:
        raise ValueError(f"steps must be in 2..4, got {steps}")
    rng = np.random.default_rng([seed, steps])
    rows, seen = [], set()
    while len(rows) < n:
        numbers = rng.integers(low, high + 1, steps + 1).tolist()
        operators = rng.choice(["+", "-", "*"], steps).tolist()
        if "*" not in operators:
            continue
        try:
            solution = solve(numbers, operators)
        except ValueError:
            continue
        if not all(0 <= s.value <= 9999 for s in solution) or solution[-1].value < 100:
            continue
        expression = " ".join(f"{x} {op}" for x, op in zip(numbers, operators, strict=False)) + f" {numbers[-1]}"
        if expression in seen:
            continue
        seen.add(expression)
        rows.append(
            {
                "prompt": PROMPT.format(expression=expression),
                "expression": expression,
                "answer": solution[-1].value,
                "steps": [s.value for s in solution],
            }
        )
    return rows


def demonstrations(
    n: int, seed: int = 1, steps: int = 2, style: str = "whole", exclude: Sequence[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``n`` solved episodes as ``textrl sft`` rows ``{"messages": [...]}``: the prompt (``user``), the agent's
    turns (``assistant``) and the env's replies (``tool``), exactly as the env writes them; render them with
    :data:`CHAT_TEMPLATE`, which concatenates the contents, so SFT's loss falls on the agent's turns only.

    ``style``: ``"whole"`` calls the calculator once on the whole expression, ``"steps"`` once per operation
    (in the order of :func:`solve`); then the answer. The problems are drawn with ``seed`` and leave out those
    of ``exclude`` (default: the env's own problem set, :class:`CalculatorEnv`'s defaults for ``steps``).
    """
    if style not in ("whole", "steps"):
        raise ValueError(f"style must be 'whole' or 'steps', got {style!r}")
    held = {p["expression"] for p in (exclude if exclude is not None else problems(N_PROBLEMS, steps, seed=0))}
    drawn = [p for p in problems(n + len(held), steps, seed=seed + 1000) if p["expression"] not in held][:n]
    rows = []
    for p in drawn:
        messages = [{"role": "user", "content": p["prompt"]}]
        if style == "whole":
            calls = [(p["expression"], p["answer"])]
        else:
            numbers, operators = parse(p["expression"])
            calls = [(f"{s.left} {s.op} {s.right}", s.value) for s in solve(numbers, operators)]
        for expression, value in calls:
            messages.append({"role": "assistant", "content": f"<calc>{expression}</calc>"})
            messages.append({"role": "tool", "content": REPLY_TEMPLATE.format(reply=f"= {value}")})
        messages.append({"role": "assistant", "content": f"Answer: {p['answer']}\n"})
        rows.append({"messages": messages})
    return rows


def write_demonstrations(path: str | Path, rows: Sequence[dict[str, Any]], template: str | Path | None = None) -> Path:
    """Write ``rows`` as JSONL to ``path`` and :data:`CHAT_TEMPLATE` to ``template`` (default: ``path`` with the
    suffix ``.jinja``); return the template's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    template = Path(template) if template else path.with_suffix(".jinja")
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    return template


def _keywords(n_problems: int, steps: int, seed: int, max_turns: int | None, kwargs: dict[str, Any]) -> dict:
    defaults = {
        "prompts": problems(n_problems, steps, seed),
        "respond": calculator_reply,
        "max_turns": max_turns if max_turns is not None else steps + 2,
        "max_turn_tokens": 16 + 5 * steps,  # a call of two-digit numbers: 13 + 5 * steps tokens of tiny's
        "turn_stop": ["</calc>", "\n"],
        "reply_template": REPLY_TEMPLATE,
        "truncate_replies": True,
    }
    return defaults | kwargs


class CalculatorEnv(MultiTurnEnv):
    """Multi-step arithmetic with a calculator tool: call it with ``<calc>EXPR</calc>``, then answer.

    ## Description
    Tool use as a multi-turn env (:mod:`envs.dialogue`). The prompt asks for a calculation of ``steps``
    operations on two-digit numbers ("What is 37 * 48 + 12?\\n"), whose answer is a 3-4 digit number. An agent
    turn ends at ``</calc>``, a newline, or ``16 + 5 * steps`` tokens. A turn with ``<calc>EXPR</calc>`` (EXPR:
    integers and ``+ - *``, parsed, never evaluated as Python) is a call: the env replies with its result
    (``" = 1788\\n"``), or with ``" Error: ...\\n"`` when it is malformed. A turn with "Answer: N" ends the
    episode. The agent may call as often as it likes within ``max_turns``.

    ## Rewards
    Per turn: :data:`CALL_REWARD` (0.1) for a well-formed call whose result is a step of the solution (each
    step once: the whole expression at once is one step, its result), 1 for the right answer, 0 otherwise.

    ## Episode End
    An answer, right or wrong (terminated), or ``max_turns`` turns (truncated; default ``steps + 2``).

    ## Tool use
    ``engine.state[i]`` counts the episode's well-formed calls (``"calls"``) and malformed ones
    (``"call_errors"``); :func:`tool_use` counts them from a transcript (``info["completion"]``).

    ## Arguments
    ``n_problems`` (256) problems of ``steps`` (2, up to 4) operations, drawn with ``seed`` (0); ``max_turns``.
    Any :class:`envs.MultiTurnEnv` keyword overrides what the task uses.

    ## Solved
    ``reward_threshold`` 1.0: the right answer in nearly every episode, found with the tool. Without it the
    embedded model cannot compute a product of two-digit numbers; a guess of a 3-4 digit number is right about
    once in 10,000 tries. The embedded model never writes a call on its own: warm-start it with ``textrl sft`` on
    :func:`demonstrations` (see the task guide).
    """

    def __init__(
        self,
        lm: str = "tiny",
        n_problems: int = N_PROBLEMS,
        steps: int = 2,
        seed: int = 0,
        max_turns: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(lm=lm, **_keywords(n_problems, steps, seed, max_turns, kwargs))

    @classmethod
    def vector(cls, num_envs: int = 1, lm: str = "tiny", **kwargs: Any) -> MultiTurnVectorEnv:
        """The natively batched env with the same options (Gymnasium's ``vector_entry_point``)."""
        task = {"n_problems": N_PROBLEMS, "steps": 2, "seed": 0, "max_turns": None}
        task |= {k: kwargs.pop(k) for k in list(task) if k in kwargs}
        return MultiTurnVectorEnv(num_envs, lm=lm, **_keywords(**task, kwargs=kwargs))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m envs.calculator demos OUT.jsonl --n 500``: write demonstrations and their chat template."""
    parser = argparse.ArgumentParser(prog="python -m envs.calculator", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demos = sub.add_parser("demos", help="write solved episodes as JSONL rows for textrl sft")
    demos.add_argument("out", help="the JSONL file to write")
    demos.add_argument("--n", type=int, default=500, help="number of demonstrations")
    demos.add_argument("--seed", type=int, default=1, help="seed of the problems (apart from the env's own)")
    demos.add_argument("--steps", type=int, default=2, help="operations per problem")
    demos.add_argument("--style", choices=["whole", "steps"], default="whole", help="one call, or one per operation")
    demos.add_argument("--template", default=None, help="where to write the chat template (default: OUT.jinja)")
    args = parser.parse_args(argv)
    rows = demonstrations(args.n, args.seed, args.steps, args.style)
    template = write_demonstrations(args.out, rows, args.template)
    print(f"wrote {len(rows)} demonstrations to {args.out} and the chat template to {template}")
    print(f"textrl sft --data {args.out} --chat-template {template} --out calc-sft")


if __name__ == "__main__":
    main()
