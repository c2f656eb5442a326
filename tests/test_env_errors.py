"""Bad input to TextGenEnv: each is a clear error naming the problem (never a silent default)."""

import json
import math

import numpy as np
import pytest

from envs import PromptError, TextGenEnv, TextGenVectorEnv
from textrl.pretrain import train_tokenizer
from textrl.rewards import RewardError, immediate

CORPUS = ["ab ab ab abc", "hello world", "the quick brown fox jumps over the lazy dog", "love and night"] * 5
LONG = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture
def env(tok):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, max_new_tokens=2)
    env.reset(seed=0)
    return env


def tid(tok, s: str) -> int:
    return tok.convert_tokens_to_ids(s)


# --- actions and episode state ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "match"),
    [
        (300, r"action 300 is out of range: token ids are 0\.\.299"),
        (10**12, "out of range"),
        (-1, r"action -1 is out of range"),
        (np.int64(-5), "out of range"),
        (3.0, r"action 3\.0 \(float\) is not an integer token id"),
        (np.float32(3), "not an integer token id"),
        (np.array(3.0), "has dtype float64"),
        (True, "is a bool"),
        (np.bool_(False), "is a bool"),
        ("3", "not an integer token id"),
        (None, "not an integer token id"),
        (np.array([3]), "not an integer token id"),
    ],
)
def test_bad_action(env, action, match):
    with pytest.raises(ValueError, match=match):
        env.step(action)
    env.step(3)  # the bad action left the episode untouched


def test_step_before_reset(tok):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, max_new_tokens=2)
    with pytest.raises(RuntimeError, match=r"before reset\(\)"):
        env.step(3)


@pytest.mark.parametrize("how", ["eos", "max_new_tokens"])
def test_step_after_the_episode_ended(env, tok, how):
    if how == "eos":
        assert env.step(tok.eos_token_id)[2]
    else:
        env.step(3)
        assert env.step(3)[3]
    with pytest.raises(RuntimeError, match="finished episode"):
        env.step(3)
    env.reset()
    env.step(3)


# --- prompt sources --------------------------------------------------------------------------------------


def test_empty_prompt_list(tok):
    with pytest.raises(PromptError, match=r"prompt source \(list\) is empty"):
        TextGenEnv(prompts=[], tokenizer=tok)


def test_empty_generator(tok):
    with pytest.raises(PromptError, match=r"prompt source \(generator\) is empty"):
        TextGenEnv(prompts=(p for p in []), tokenizer=tok)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_txt_file(tok, tmp_path, content):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    with pytest.raises(PromptError, match=r"prompt source \(.*prompts\.txt\) is empty"):
        TextGenEnv(prompts=str(path), tokenizer=tok)


def test_txt_file_one_prompt_per_line(tok, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("ROMEO:\\n\n\nhello\n")
    env = TextGenEnv(prompts=path, tokenizer=tok, max_new_tokens=2)
    assert env.engine.prompts.texts == ["ROMEO:\n", "hello"]


def test_missing_file(tok, tmp_path):
    with pytest.raises(PromptError, match="prompt file not found"):
        TextGenEnv(prompts=str(tmp_path / "nope.jsonl"), tokenizer=tok)


def test_a_single_string_is_not_a_prompt_list(tok):
    with pytest.raises(PromptError, match="is a single string"):
        TextGenEnv(prompts="hello", tokenizer=tok)


def test_malformed_jsonl(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ab"}) + "\n" + '{"prompt": "he\n')
    with pytest.raises(PromptError, match=r"p\.jsonl:2: not valid JSON"):
        TextGenEnv(prompts=str(path), tokenizer=tok)


def test_jsonl_rows_and_fields(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "ab", "reference": "x"}, {"prompt": "he", "reference": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    env = TextGenEnv(prompts=str(path), tokenizer=tok, max_new_tokens=2)
    assert env.engine.prompts.texts == ["ab", "he"]
    assert env.engine.prompts.fields == {"reference": ["x", "y"]}


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"text": "ab"}], r"prompt row 0 of list is dict .*'prompt' field"),
        (["ab", {"prompt": 3}], r"prompt row 1 of list is dict"),
        (["ab", 7], r"prompt row 1 of list is int 7"),
        ([{"prompt": "a", "reference": 1}, {"prompt": "b"}], r"field 'reference' is missing from prompt rows \[1\]"),
    ],
)
def test_bad_rows(tok, rows, match):
    with pytest.raises(PromptError, match=match):
        TextGenEnv(prompts=rows, tokenizer=tok)


def test_jsonl_row_without_prompt(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ab"}\n{"question": "ab"}\n')
    with pytest.raises(PromptError, match=r"prompt row 1 of .*p\.jsonl is dict .*expected a string or a mapping"):
        TextGenEnv(prompts=str(path), tokenizer=tok)


def test_prompt_longer_than_the_context(tok):
    n = len(tok(LONG)["input_ids"])
    assert n > 3
    with pytest.raises(PromptError, match=rf"prompt 1 \('the quick.*is {n} tokens long, more than the 3 that fit"):
        TextGenEnv(prompts=["ab", LONG], tokenizer=tok, context_length=5, max_new_tokens=2)


def test_truncate_prompts_keeps_the_last_tokens(tok):
    full = tok(LONG)["input_ids"]
    env = TextGenEnv(prompts=[LONG], tokenizer=tok, context_length=5, max_new_tokens=2, truncate_prompts=True)
    obs, info = env.reset(seed=0)
    assert obs["input_ids"].tolist() == full[-3:] + [tok.pad_token_id] * 2
    assert obs["attention_mask"].tolist() == [1, 1, 1, 0, 0]
    assert info["prompt"] == LONG  # the text stays whole; only the observation is cut
    env.step(3)
    obs, _, _, truncated, _ = env.step(3)
    assert truncated and obs["input_ids"].tolist() == [*full[-3:], 3, 3]


def test_ad_hoc_prompt_too_long(tok):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, max_new_tokens=2)
    with pytest.raises(PromptError, match="tokens long, more than the 1 that fit"):
        env.reset(options={"prompt": LONG})
    with pytest.raises(PromptError, match="prompt_index 5 is out of range: the env has 1 prompts"):
        env.reset(options={"prompt_index": 5})
    with pytest.raises(PromptError, match=r"options\['prompt'\] must be a string"):
        env.reset(options={"prompt": 3})


# --- keywords ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 2.5, "3", None])
def test_bad_max_new_tokens(tok, value):
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive integer, got"):
        TextGenEnv(prompts=["ab"], tokenizer=tok, max_new_tokens=value)


@pytest.mark.parametrize(("context_length", "max_new_tokens"), [(4, 4), (3, 4)])
def test_context_not_longer_than_max_new_tokens(tok, context_length, max_new_tokens):
    with pytest.raises(ValueError, match=rf"context_length \({context_length}\) must exceed max_new_tokens \(4\)"):
        TextGenEnv(prompts=["ab"], tokenizer=tok, context_length=context_length, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("value", [0, -3, 8.0])
def test_bad_context_length(tok, value):
    with pytest.raises(ValueError, match="context_length must be a positive integer"):
        TextGenEnv(prompts=["ab"], tokenizer=tok, context_length=value, max_new_tokens=2)


def test_unknown_reward_name(tok):
    with pytest.raises(ValueError, match=r"unknown reward 'nope'; built-in rewards: \[.*'keyword_reward'"):
        TextGenEnv(prompts=["ab"], tokenizer=tok, reward="nope")


def test_reward_not_callable(tok):
    with pytest.raises(TypeError, match="a reward must be callable"):
        TextGenEnv(prompts=["ab"], tokenizer=tok, reward=[3])


def test_bad_render_mode(tok):
    with pytest.raises(ValueError, match="render_mode must be one of"):
        TextGenEnv(prompts=["ab"], tokenizer=tok, render_mode="rgb_array_list")


# --- bad reward output ------------------------------------------------------------------------------------


def nan_reward(completions, **_):
    return [math.nan for _ in completions]


def inf_reward(completions, **_):
    return [0.0] * (len(completions) - 1) + [-math.inf]


def short_reward(completions, **_):
    return [1.0] * (len(completions) + 1)


def none_reward(completions, **_):
    return [None for _ in completions]


def none_output_reward(completions, **_):
    return None


def str_reward(completions, **_):
    return "1.0"


def str_items_reward(completions, **_):
    return ["1.0" for _ in completions]


def raising_reward(completions, **_):
    raise KeyError("missing")


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (nan_reward, r"sequence reward 'nan_reward' returned nan for sample 0 \(prompt='ab', completion='ab'\)"),
        (inf_reward, r"sequence reward 'inf_reward' returned -inf for sample 0 \(prompt='ab', completion='ab'\)"),
        (short_reward, r"sequence reward 'short_reward' returned 2 values for 1 samples"),
        (none_reward, r"'none_reward' returned NoneType None for sample 0 .*return 0\.0 explicitly"),
        (none_output_reward, r"'none_output_reward' returned NoneType; expected a list of 1 floats"),
        (str_reward, r"'str_reward' returned str '1\.0'; expected a list of 1 floats"),
        (str_items_reward, r"'str_items_reward' returned str '1\.0' for sample 0 \(prompt='ab', completion='ab'\)"),
        (raising_reward, r"'raising_reward' raised KeyError: 'missing' on a batch of 1 samples"),
    ],
)
def test_bad_sequence_reward_output(tok, fn, match):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward=fn, max_new_tokens=2)
    env.reset(seed=0)
    a, b = tid(tok, "a"), tid(tok, "b")
    env.step(a)  # sequence rewards are only called at the end
    with pytest.raises(RewardError, match=match):
        env.step(b)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (immediate(lambda new_token_ids: [math.nan]), r"immediate reward 'lambda' returned nan for sample 0 .*'a'"),
        (immediate(lambda new_token_ids: np.ones((1, 1))), r"returned an array of shape \(1, 1\)"),
        (immediate(lambda new_token_ids: np.array(["x"])), r"returned an array of dtype <U1"),
        (immediate(lambda step: [1.0, 2.0]), r"immediate reward 'lambda' returned 2 values for 1 samples"),
        (immediate(lambda new_tokens: 1.0), r"returned float; expected a list of 1 floats"),
    ],
)
def test_bad_immediate_reward_output(tok, fn, match):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward=fn, max_new_tokens=2)
    env.reset(seed=0)
    with pytest.raises(RewardError, match=match):
        env.step(tid(tok, "a"))


def test_raising_reward_names_the_sample_that_raises(tok):
    def picky(prompts, completions, **_):
        return [1.0 / ("x" not in c) for c in completions]  # ZeroDivisionError on the completion "x"

    env = TextGenVectorEnv(3, prompts=["ab"], tokenizer=tok, reward=picky, max_new_tokens=1)
    env.reset(seed=0)
    with pytest.raises(
        RewardError,
        match=r"sequence reward 'picky' raised ZeroDivisionError: .* on sample 1 \(prompt='ab', completion='x'\)",
    ):
        env.step(np.array([tid(tok, "a"), tid(tok, "x"), tid(tok, "b")]))


def test_env_must_be_reset_after_a_reward_error(tok):
    def broken(completions, **_):
        raise RuntimeError("boom")

    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward=broken, max_new_tokens=1)
    env.reset(seed=0)
    with pytest.raises(RewardError, match="'broken' raised RuntimeError: boom"):
        env.step(tid(tok, "a"))
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(tid(tok, "a"))
    env.reset(seed=0)  # and a reset recovers

    venv = TextGenVectorEnv(2, prompts=["ab"], tokenizer=tok, reward=broken, max_new_tokens=1)
    venv.reset(seed=0)
    with pytest.raises(RewardError):
        venv.step(np.array([tid(tok, "a"), tid(tok, "b")]))
    _, reward, _, _, info = venv.step(np.array([tid(tok, "a"), tid(tok, "b")]))
    assert info["reset"].all() and not reward.any()  # the broken episodes were autoreset, not continued
