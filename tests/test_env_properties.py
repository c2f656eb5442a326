"""Property tests over random action sequences (hypothesis)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs import TextGenEnv
from textrl.pretrain import train_tokenizer

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


def _actions(tok):
    # Any token, with the interesting ones (eos, pad, stop-string pieces, a multi-byte character's bytes) common.
    special = [tok.eos_token_id, tok.pad_token_id, *tok.convert_tokens_to_ids(["!", "a", "b", "d", "o", "g", "Ã", "©"])]
    token = st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(special))
    return st.lists(token, min_size=MAX_NEW_TOKENS, max_size=MAX_NEW_TOKENS)


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
