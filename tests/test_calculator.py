"""textrl/Calculator-v0 (envs/calculator.py): a hand-worked episode with exact observations and rewards, the
parser's safety, the env's rules, the transcript's call counts against the env's, the demonstrations rendered
exactly as the env's transcript, the env checkers and the registration."""

import builtins
import copy
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs.calculator import (
    CHAT_TEMPLATE,
    CalculatorEnv,
    calculate,
    calculator_reply,
    demonstrations,
    main,
    parse,
    problems,
    solve,
    tool_use,
)
from envs.dialogue import Reply
from textrl.sft import IGNORE, encode_messages, load_examples


@pytest.fixture(scope="module")
def env():
    return gymnasium.make("textrl/Calculator-v0", n_problems=8)


def ids(env, text: str) -> list[int]:
    return env.unwrapped.tokenizer.encode(text, add_special_tokens=False)


def play_turn(env, text: str):
    """Step the tokens of ``text`` until the turn ends; returns (rewards, obs, terminated, truncated, info)."""
    rewards = []
    for token in ids(env, text):
        obs, reward, term, trunc, info = env.step(token)
        rewards.append(reward)
        if info["turn_end"] or term or trunc:
            return rewards, obs, term, trunc, info
    raise AssertionError(f"the turn {text!r} did not end")


def test_hand_worked_episode(env):
    obs, info = env.reset(options={"prompt_index": 0})
    row = problems(8)[0]
    assert info["prompt"] == row["prompt"] == f"What is {row['expression']}?\n"
    assert row == {"prompt": "What is 14 + 39 * 96?\n", "expression": "14 + 39 * 96", "answer": 3758,
                   "steps": [3744, 3758]}  # fmt: skip
    prompt = ids(env, row["prompt"])
    P = len(prompt)
    assert obs["input_ids"][:P].tolist() == prompt and obs["attention_mask"].sum() == P

    call = ids(env, "<calc>14 + 39 * 96</calc>")  # turn 0: a well-formed call, the whole expression
    rewards, obs, term, trunc, info = play_turn(env, "<calc>14 + 39 * 96</calc>")
    reply = ids(env, " = 3758\n")
    assert rewards == [0.0] * (len(call) - 1) + [pytest.approx(0.1)] and not (term or trunc)
    assert info["env_tokens"] == len(reply) and info["turn"] == 1
    L = P + len(call) + len(reply)
    assert obs["input_ids"][:L].tolist() == [*prompt, *call, *reply] and obs["attention_mask"].sum() == L
    assert obs["action_mask"][:L].tolist() == [0] * P + [1] * len(call) + [0] * len(reply)

    rewards, obs, term, trunc, info = play_turn(env, "<calc>39 x 96</calc>")  # turn 1: malformed
    assert sum(rewards) == 0.0 and not (term or trunc)
    assert env.unwrapped.tokenizer.decode(obs["input_ids"][: obs["attention_mask"].sum()]).endswith(
        "<calc>39 x 96</calc> Error: only integers and + - *\n"
    )
    rewards, obs, term, trunc, info = play_turn(env, "<calc>14 + 39 * 96</calc>")  # the same step: no credit
    assert sum(rewards) == 0.0

    rewards, obs, term, trunc, info = play_turn(env, "Answer: 3758\n")  # turn 3: right, the episode ends
    assert rewards[-1] == 1.0 and sum(rewards) == 1.0 and term and not trunc and info["turns"] == 4
    assert info["completion"] == (
        "<calc>14 + 39 * 96</calc> = 3758\n<calc>39 x 96</calc> Error: only integers and + - *\n"
        "<calc>14 + 39 * 96</calc> = 3758\nAnswer: 3758\n"
    )
    state = env.unwrapped.engine.state[0]
    assert (state["calls"], state["call_errors"]) == (2, 1)
    assert tool_use(info["completion"]) == {"calls": 2, "call_errors": 1}


def test_step_by_step_calls_earn_each_step_once_and_a_wrong_answer_ends_the_episode(env):
    env.reset(options={"prompt_index": 0})  # 14 + 39 * 96: steps 3744, 3758
    assert sum(play_turn(env, "<calc>39 * 96</calc>")[0]) == pytest.approx(0.1)
    assert sum(play_turn(env, "<calc>14 + 3744</calc>")[0]) == pytest.approx(0.1)
    rewards, _, term, trunc, info = play_turn(env, "Answer: 3757\n")
    assert sum(rewards) == 0.0 and term and not trunc
    env.reset(options={"prompt_index": 0})
    for _ in range(4):  # no call, no answer: no reply, and max_turns (steps + 2) truncates
        rewards, _, term, trunc, info = play_turn(env, "And God said\n")
        assert info["env_tokens"] == 0 and sum(rewards) == 0.0
    assert trunc and not term and info["turns"] == 4


def test_parser_is_safe_and_exact(monkeypatch):
    def no_eval(*args, **kwargs):
        raise AssertionError("eval was called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    monkeypatch.setattr(builtins, "exec", no_eval)
    assert calculate("7*8") == 56 and calculate(" 2 + 3 * 4 - 5 ") == 9 and calculate("12 * -3") == -36
    assert calculate("10 - 4 - 3") == 3 and calculate("42") == 42 and calculate("37 * 48 + 12") == 1788
    assert parse("1+2*3") == ([1, 2, 3], ["+", "*"])
    assert [s.value for s in solve([14, 39, 96], ["+", "*"])] == [3744, 3758]
    for bad in [
        "__import__('os').system('echo hi')", "().__class__", "2**10", "(1+2)", "1e3", "0x10", "1_000", "7/2",
        "", "1 +", "+1", "3 4", "١٢+1", "1" * 13, "+".join(["1"] * 10), "999999999999 * 999999999999",
    ]:  # fmt: skip
        with pytest.raises(ValueError):
            calculate(bad)
    state = {"steps": [56], "answer": 60}
    assert calculator_reply(state, "<calc>__import__('os').system('x')</calc>") == Reply("Error: expected a number")
    assert state["call_errors"] == 1 and state["calls"] == 0


def test_env_rules():
    state = {"steps": [56, 60], "answer": 60}
    assert calculator_reply(state, "<calc>7 * 8</calc>") == Reply("= 56", 0.1, False)
    assert calculator_reply(state, "<calc>7*8</calc>") == Reply("= 56", 0.0, False)  # credited once
    assert calculator_reply(state, "<calc>1 + 1</calc>") == Reply("= 2", 0.0, False)  # not a step
    assert calculator_reply(state, "<calc>7 * 8\n") == Reply("Error: call not closed")
    assert calculator_reply(state, "7 * 8</calc>") == Reply("Error: call not opened")
    assert calculator_reply(state, "thus <calc>56 + 4</calc>") == Reply("= 60", 0.1, False)
    assert calculator_reply(state, "The king\n") == Reply(None)
    assert (state["calls"], state["call_errors"]) == (4, 2)
    assert calculator_reply(state, "Answer: 60\n") == Reply(None, 1.0, True)
    assert calculator_reply(state, "Answer:60") == Reply(None, 1.0, True)
    assert calculator_reply(state, "Answer: 600\n") == Reply(None, 0.0, True)
    assert calculator_reply(state, "Answer: sixty\n") == Reply(None, 0.0, True)


@pytest.mark.parametrize(
    "turns",
    [
        ["<calc>1+2\n", "x</calc>", "<calc>1<calc>2</calc>", "<calc>3 * 4</calc>", "hello\n"],
        ["<calc>" + " + ".join(["1"] * 12) + "</calc>", "Answer: 5\n"],  # ends at max_turn_tokens, unclosed
        ["<calc>7 *", "8</calc>"],  # eos ends the first turn inside the call (added below)
        ["Answer: <calc>1 + 1</calc>", "hi\n", "hi\n", "<calc>2"],  # a call wins over "Answer:"; the last turn
        # (max_turns) ends inside a call, with no reply after it
    ],
)
def test_tool_use_counts_the_transcript_as_the_env_counts(env, turns):
    env.reset(options={"prompt_index": 1})
    eos = env.unwrapped.tokenizer.eos_token_id
    done = False
    for i, turn in enumerate(turns):
        tokens = ids(env, turn) + ([eos] if turn == "<calc>7 *" or i == len(turns) - 1 else [])
        for token in tokens:
            _, _, term, trunc, info = env.step(token)
            done = term or trunc
            if info["turn_end"] or done:
                break
        if done:
            break
    if not done:
        while not done:
            _, _, term, trunc, info = env.step(eos)
            done = term or trunc
    state = env.unwrapped.engine.state[0]
    assert tool_use(info["completion"]) == {"calls": state["calls"], "call_errors": state["call_errors"]}


def test_demonstrations_render_exactly_as_the_env_transcript(env):
    tok = copy.deepcopy(env.unwrapped.tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    own = {p["expression"] for p in problems(256)}
    for style in ("whole", "steps"):
        rows = demonstrations(6, seed=1, style=style)
        assert len({r["messages"][0]["content"] for r in rows}) == 6
        for row in rows:
            messages = row["messages"]
            expression = re.fullmatch(r"What is (.*)\?\n", messages[0]["content"]).group(1)
            assert expression not in own  # apart from the env's problem set
            steps = [s.value for s in solve(*parse(expression))]
            problem = {"prompt": messages[0]["content"], "expression": expression, "answer": steps[-1], "steps": steps}
            demo_ids, labels = encode_messages(tok, messages)
            single = CalculatorEnv(prompts=[problem])
            obs, _ = single.reset(seed=0)
            total, term = 0.0, False
            for m in messages[1:]:
                if m["role"] == "assistant":
                    rewards, obs, term, _, info = play_turn(single, m["content"])
                    total += sum(rewards)
            L = int(obs["attention_mask"].sum())
            assert obs["input_ids"][:L].tolist() == demo_ids  # the same tokens, replies included
            assert obs["action_mask"][:L].tolist() == [int(label != IGNORE) for label in labels]  # SFT's loss mask
            assert term and total == pytest.approx(1.0 + 0.1 * (len(steps) if style == "steps" else 1))
            assert tok.apply_chat_template(messages, tokenize=False) == problem["prompt"] + info["completion"]


def test_demos_command_writes_rows_sft_reads(tmp_path, env, capsys):
    out = tmp_path / "demos.jsonl"
    main(["demos", str(out), "--n", "5", "--style", "steps"])
    assert "textrl sft --data" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and rows == demonstrations(5, seed=1, style="steps")
    tok = copy.deepcopy(env.unwrapped.tokenizer)
    tok.chat_template = (tmp_path / "demos.jinja").read_text()
    examples = load_examples(out, tok, max_length=256)
    assert len(examples) == 5 and all(any(label != IGNORE for label in e.labels) for e in examples)


def test_registered_checked_and_vectorised(env):
    spec = gymnasium.spec("textrl/Calculator-v0")
    assert spec.reward_threshold == 1.0 and envs.MULTI_TURN_TASKS["textrl/Calculator-v0"][1] == 1.0
    assert CalculatorEnv.__doc__.count("## ") >= 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []
    vec = gymnasium.make_vec("textrl/Calculator-v0", num_envs=3, vectorization_mode="vector_entry_point", n_problems=8)
    assert isinstance(vec, envs.MultiTurnVectorEnv)
    obs, _ = vec.reset(seed=0)
    assert obs["input_ids"].shape[0] == 3 and vec.engine.prompts.texts == env.unwrapped.engine.prompts.texts
    assert vec.engine.max_turns == 4 and vec.engine.max_turn_tokens == 26
    other = gymnasium.make("textrl/Calculator-v0", n_problems=8, steps=3, seed=5).unwrapped
    rows = [{k: v[i] for k, v in other.engine.prompts.fields.items()} for i in range(8)]
    for r in rows:
        assert len(r["steps"]) == 3 and 100 <= r["answer"] <= 9999 and calculate(r["expression"]) == r["answer"]
    assert (other.engine.max_turns, other.engine.max_turn_tokens) == (5, 31)
    with pytest.raises(ValueError, match=r"steps must be in 2\.\.4"):
        problems(4, steps=1)


def test_benchmark_runs_the_recipe_with_tiny_budgets(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "calculator_benchmark", Path(__file__).parents[1] / "benchmarks" / "calculator.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["calculator_benchmark"] = module
    spec.loader.exec_module(module)
    module.main(
        ["--work", str(tmp_path / "work"), "--runs", str(tmp_path / "runs"), "--demos", "12", "--sft-steps", "2",
         "--sft-batch-size", "4", "--budget", "100", "--budget-tiny", "0", "--eval-episodes", "8", "--batch-size", "8"]
    )  # fmt: skip
    out = capsys.readouterr().out
    stages = re.findall(r"^\| (tiny \(untrained\)|SFT \(12 demos, 2 steps\)|SFT \+ reinforce) \|", out, re.M)
    assert stages == ["tiny (untrained)", "SFT (12 demos, 2 steps)", "SFT + reinforce"]
    assert (tmp_path / "work" / "sft" / "config.json").is_file() and (tmp_path / "work" / "demos.jinja").is_file()
