"""Property tests over random action sequences (hypothesis): the single env, and the vector env with random
mixes of immediate and sequence rewards and random stop strings."""

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from envs import TextGenEnv, TextGenVectorEnv
from textrl.pretrain import train_tokenizer
from textrl.rewards import immediate

CORPUS = ["ab ab ab abc", "hello world", "the quick brown fox jumps over the lazy dog", "love and night!"] * 5
PROMPTS = ["ab", "hello", "the lazy dog", "", "ROMEO:\n"]
MAX_NEW_TOKENS = 8
STOP = ["!", "dog", "ab"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def env(tok):
    return TextGenEnv(prompts=PROMPTS, tokenizer=tok, max_new_tokens=MAX_NEW_TOKENS, stop=STOP)


def _token(tok):
    # Any token, with the interesting ones (eos, pad, stop-string pieces, a multi-byte character's bytes) common.
    special = [tok.eos_token_id, tok.pad_token_id, *tok.convert_tokens_to_ids(["!", "a", "b", "d", "o", "g", "Ã", "©"])]
    return st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(special))


def _actions(tok):
    return st.lists(_token(tok), min_size=MAX_NEW_TOKENS, max_size=MAX_NEW_TOKENS)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_episodes(env, tok, data):
    actions = data.draw(_actions(tok))
    seed = data.draw(st.integers(0, 2**31 - 1))
    obs, info = env.reset(seed=seed)
    assert env.observation_space.contains(obs)
    prompt = env.engine.prompts.ids[info["prompt_index"]].tolist()
    taken = []
    for t, a in enumerate(actions):
        obs, _, terminated, truncated, info = env.step(a)
        taken.append(a)
        assert env.observation_space.contains(obs)
        assert obs["input_ids"][: len(prompt) + len(taken)].tolist() == prompt + taken
        assert obs["attention_mask"].sum() == len(prompt) + len(taken)
        assert (obs["input_ids"][len(prompt) + len(taken) :] == tok.pad_token_id).all()
        text = tok.decode(taken, skip_special_tokens=True)
        # terminated exactly when eos is taken or the completion first contains a stop string
        assert terminated == (a == tok.eos_token_id or any(s in text for s in STOP))
        assert truncated == (not terminated and t + 1 == MAX_NEW_TOKENS)
        if terminated or truncated:
            break
        assert set(info) == {"reward_components"}
    assert terminated or truncated  # the episode always ends by max_new_tokens
    assert len(taken) <= MAX_NEW_TOKENS
    assert info["completion"] == tok.decode(taken, skip_special_tokens=True)
    assert info["prompt"] == PROMPTS[info["prompt_index"]]
    with pytest.raises(RuntimeError):
        env.step(0)


@settings(max_examples=20, deadline=None)
@given(actions=st.lists(st.integers(0, 299), min_size=1, max_size=40))
def test_completion_round_trips_without_stop(tok, actions):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, max_new_tokens=40)
    env.reset(seed=0)
    actions = [a for a in actions if a != tok.eos_token_id] + [tok.eos_token_id]
    for a in actions:
        *_, terminated, truncated, info = env.step(a)
        if terminated or truncated:
            break
    assert terminated == (len(actions) <= 40)
    taken = actions[: min(len(actions), 40)]
    assert info["completion"] == tok.decode(taken, skip_special_tokens=True)
    assert np.array_equal(env.engine.completion_ids(0), taken)


# --- the vector env and the reward plumbing under random actions, reward mixes and stop strings ---------------

ROWS = [{"prompt": p, "reference": f"ref {i}"} for i, p in enumerate(PROMPTS)]
REFERENCE = {row["prompt"]: row["reference"] for row in ROWS}


def _rewards(tok, problems: list[str]) -> dict:
    """Two sequence and two immediate rewards that check the batch they receive is aligned (appending to
    ``problems``) and return values that depend on every argument, so a misaligned row changes the reward."""

    def seq_len(prompts, completions, completion_ids, reference, **_):
        if not len(prompts) == len(completions) == len(completion_ids) == len(reference):
            problems.append(f"seq_len: lengths {len(prompts)}, {len(completions)}, {len(completion_ids)}")
        for p, c, ids, r in zip(prompts, completions, completion_ids, reference, strict=False):
            if c != tok.decode(ids, skip_special_tokens=True) or r != REFERENCE[p]:
                problems.append(f"seq_len: misaligned row {p!r} {c!r} {ids} {r!r}")
        return [
            len(ids) + 0.5 * len(c) + 0.25 * len(p)
            for p, c, ids in zip(prompts, completions, completion_ids, strict=True)
        ]

    def seq_words(completions, **_):
        return [-0.1 * len(c.split()) for c in completions]

    @immediate
    def imm_id(new_token_ids, completion_ids):
        for a, ids in zip(new_token_ids.tolist(), completion_ids, strict=False):
            if not ids or ids[-1] != a:
                problems.append(f"imm_id: new token {a} is not the last of {ids}")
        return (new_token_ids % 5) / 5.0

    @immediate
    def imm_step(step, completion_ids, prompts, reference):
        for s, ids, p, r in zip(step.tolist(), completion_ids, prompts, reference, strict=False):
            if len(ids) != s + 1 or r != REFERENCE[p]:
                problems.append(f"imm_step: step {s} for {ids}, prompt {p!r} with {r!r}")
        return 0.1 * step + 1.0

    return {f.__name__: f for f in (seq_len, seq_words, imm_id, imm_step)}


def _expected_reward(fns, weights, prompt: str, taken: list[int], tok, done: bool) -> tuple[float, dict[str, float]]:
    """What one row's step must pay, computed independently of the env."""
    ids, text = taken, tok.decode(taken, skip_special_tokens=True)
    values = {
        "imm_id": (taken[-1] % 5) / 5.0,
        "imm_step": 0.1 * (len(taken) - 1) + 1.0,
        "seq_len": len(ids) + 0.5 * len(text) + 0.25 * len(prompt),
        "seq_words": -0.1 * len(text.split()),
    }
    parts = {name: values[name] for name in weights if name.startswith("imm") or done}
    return sum(weights[name] * v for name, v in parts.items()), parts


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_vector_env_random_episodes_rewards_and_stops(tok, data):
    n = data.draw(st.integers(1, 4), label="num_envs")
    max_new = data.draw(st.integers(1, 6), label="max_new_tokens")
    stop = data.draw(st.lists(st.sampled_from(["!", "dog", "ab", "o", "\n"]), max_size=2, unique=True), label="stop")
    problems: list[str] = []
    fns = _rewards(tok, problems)
    names = data.draw(st.lists(st.sampled_from(sorted(fns)), max_size=4, unique=True), label="rewards")
    weights = {name: data.draw(st.floats(-3, 3, allow_nan=False), label=f"weight {name}") for name in names}
    env = TextGenVectorEnv(
        n,
        prompts=ROWS,
        tokenizer=tok,
        reward={fns[k]: w for k, w in weights.items()},
        max_new_tokens=max_new,
        stop=stop,
    )
    obs, info = env.reset(seed=data.draw(st.integers(0, 2**31 - 1), label="seed"))
    assert env.observation_space.contains(obs) and info["reset"].all()
    prompt = list(info["prompt"])
    prefix = [obs["input_ids"][i, : obs["attention_mask"][i].sum()].tolist() for i in range(n)]
    taken: list[list[int]] = [[] for _ in range(n)]
    needs_reset = np.zeros(n, dtype=bool)
    episodes = 0
    token = _token(tok)
    for _ in range(data.draw(st.integers(1, 2 * max_new + 3), label="steps")):
        actions = np.array(data.draw(st.lists(token, min_size=n, max_size=n), label="actions"))
        obs, reward, terminated, truncated, info = env.step(actions)
        assert env.observation_space.contains(obs)
        assert np.isfinite(reward).all()
        for i in range(n):
            if needs_reset[i]:  # NEXT_STEP autoreset: the action is ignored and a new prompt starts
                assert info["_reset"][i] and info["reset"][i] and reward[i] == 0
                assert not terminated[i] and not truncated[i]
                prompt[i], taken[i], needs_reset[i] = info["prompt"][i], [], False
                prefix[i] = obs["input_ids"][i, : obs["attention_mask"][i].sum()].tolist()
                continue
            taken[i].append(int(actions[i]))
            text = tok.decode(taken[i], skip_special_tokens=True)
            ended_by_stop = actions[i] == tok.eos_token_id or any(s in text for s in stop)
            assert terminated[i] == ended_by_stop
            assert truncated[i] == (not ended_by_stop and len(taken[i]) == max_new)
            assert obs["input_ids"][i, : len(prefix[i]) + len(taken[i])].tolist() == prefix[i] + taken[i]
            assert obs["attention_mask"][i].sum() == len(prefix[i]) + len(taken[i])
            done = bool(terminated[i] or truncated[i])
            total, parts = _expected_reward(fns, weights, prompt[i], taken[i], tok, done)
            assert reward[i] == pytest.approx(total, rel=1e-12, abs=1e-12)
            components = info.get("reward_components", {})
            for name, value in parts.items():
                assert components["_" + name][i] and components[name][i] == pytest.approx(value, rel=1e-12)
            if names:  # the reward is exactly the weighted sum of the reported components
                reported = sum(weights[k] * components[k][i] for k in names if components.get("_" + k, [0] * n)[i])
                assert reward[i] == pytest.approx(reported, rel=1e-12, abs=1e-12)
            if done:
                assert info["_completion"][i] and info["completion"][i] == text
                assert info["prompt"][i] == prompt[i] and ROWS[info["prompt_index"][i]]["prompt"] == prompt[i]
                needs_reset[i] = True
                episodes += 1
        assert (obs["input_ids"][obs["attention_mask"] == 0] == tok.pad_token_id).all()
    event(f"finished episodes: {min(episodes, 3)}{'+' if episodes >= 3 else ''}")
    event(f"rewards: {len(names)}")
    assert problems == []
