"""TextGenEnv: both env checkers, a hand-worked episode with known rewards, reset options, registration,
and the rgb_array frames (envs/render.py)."""

import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401  (registers textrl/TextGen-v0)
from envs import TextGenEnv, TextGenVectorEnv
from envs.render import COMPLETION_COLOUR, FRAME_HEIGHT, FRAME_WIDTH, MARGIN, PROMPT_COLOUR, text_frame
from textrl.pretrain import train_tokenizer
from textrl.rewards import immediate

CORPUS = ["ab ab ab abc", "hello world", "the quick brown fox jumps over the lazy dog", "love and night"] * 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def ids(tok, *tokens: str) -> list[int]:
    """Token ids of single-character tokens such as ``"h"`` (the byte-level alphabet has them all)."""
    out = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in out or tok.unk_token_id == tok.eos_token_id
    return out


@immediate
def step_index(step):
    """Immediate: the 0-based index of the new token."""
    return step.astype(float)


@immediate
def per_token(new_token_ids):
    """Immediate: 1.0 per token."""
    return [1.0] * len(new_token_ids)


def n_tokens(completion_ids, **_):
    """Sequence: number of completion tokens (eos included)."""
    return [float(len(c)) for c in completion_ids]


REWARD = {step_index: 1.0, per_token: 0.5, n_tokens: 10.0}


def run(env, actions):
    """Step ``actions``; return the per-step (reward, terminated, truncated, info) lists and the last obs."""
    out = []
    obs = None
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append((r, term, trunc, info))
    return out, obs


# --- env checkers -------------------------------------------------------------------------------------


def _messages(caught) -> list[str]:
    return [str(w.message) for w in caught]


def test_gymnasium_check_env_no_warnings(tok):
    # Through gymnasium.make so the checker can also try every render mode (it needs the spec for that).
    env = gymnasium.make("textrl/TextGen-v0", tokenizer=tok, prompts=["ab", "hello"], reward=REWARD, stop="!")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
    assert _messages(caught) == []


def test_gymnasium_check_env_on_wrapped_env_only_warns_about_wrappers(tok):
    env = gymnasium.make("textrl/TextGen-v0", tokenizer=tok, prompts=["ab"], max_new_tokens=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env)
    messages = _messages(caught)
    assert len(messages) == 1 and "different from the unwrapped version" in messages[0]


def test_gymnasium_check_env_rgb_array(tok):
    env = gymnasium.make("textrl/TextGen-v0", tokenizer=tok, prompts=["ab", "hello"], render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
    assert _messages(caught) == []


@pytest.mark.parametrize("made", [False, True])
def test_sb3_check_env_no_warnings(tok, made):
    kwargs = {"tokenizer": tok, "prompts": ["ab", "the lazy dog"], "reward": REWARD, "max_new_tokens": 5}
    env = gymnasium.make("textrl/TextGen-v0", **kwargs) if made else TextGenEnv(**kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env)
    assert _messages(caught) == []


# --- a hand-worked episode ------------------------------------------------------------------------------


def test_hand_worked_episode_truncated_at_max_new_tokens(tok):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward=REWARD, max_new_tokens=4, stop="!", context_length=8)
    obs, info = env.reset(seed=0)
    assert info == {"prompt_index": 0, "prompt": "ab", "reset": True}
    prompt = tok("ab")["input_ids"]
    assert prompt == [tok.convert_tokens_to_ids("ab")]  # one token: obs layouts below are exact
    assert obs["input_ids"].tolist() == prompt + [tok.pad_token_id] * 7
    assert obs["attention_mask"].tolist() == [1] + [0] * 7

    actions = ids(tok, "h", "e", "l", "o")
    steps, obs = run(env, actions)
    # step t: step_index t (weight 1) + per_token 1.0 (weight 0.5); last step + n_tokens 4 (weight 10)
    assert [s[0] for s in steps] == [0.5, 1.5, 2.5, 43.5]
    assert [s[1] for s in steps] == [False] * 4
    assert [s[2] for s in steps] == [False, False, False, True]
    for t, (_, _, _, info) in enumerate(steps[:-1]):
        assert info == {"reward_components": {"step_index": float(t), "per_token": 1.0, "n_tokens": 0.0}}
    assert steps[-1][3] == {
        "reward_components": {"step_index": 3.0, "per_token": 1.0, "n_tokens": 4.0},
        "prompt": "ab",
        "completion": "helo",
        "prompt_index": 0,
    }
    assert obs["input_ids"].tolist() == prompt + actions + [tok.pad_token_id] * 3
    assert obs["attention_mask"].tolist() == [1] * 5 + [0] * 3
    assert env.render() == "abhelo"


def test_eos_terminates_and_is_counted_but_not_decoded(tok):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward=REWARD, max_new_tokens=4)
    env.reset(seed=0)
    steps, obs = run(env, [*ids(tok, "h"), tok.eos_token_id])
    assert [s[0] for s in steps] == [0.5, 1.5 + 20.0]
    assert [(s[1], s[2]) for s in steps] == [(False, False), (True, False)]
    assert steps[-1][3]["completion"] == "h"
    assert steps[-1][3]["reward_components"] == {"step_index": 1.0, "per_token": 1.0, "n_tokens": 2.0}
    assert obs["attention_mask"].sum() == 3
    assert obs["input_ids"][2] == tok.eos_token_id


@pytest.mark.parametrize(
    ("stop", "actions", "n_steps", "completion"),
    [
        ("!", ["h", "!", "e"], 2, "h!"),
        (["xyz", "lo"], ["h", "l", "o", "e"], 3, "hlo"),  # a stop string spread over two tokens
        ("ab", ["a", "<|pad|>", "<|pad|>", "<|pad|>", "<|pad|>", "<|pad|>", "<|pad|>", "<|pad|>", "<|pad|>", "b"],
         10, "ab"),  # special tokens in between decode to nothing
    ],
)  # fmt: skip
def test_stop_string_terminates_and_is_kept(tok, stop, actions, n_steps, completion):
    env = TextGenEnv(prompts=["hello"], tokenizer=tok, reward=REWARD, max_new_tokens=12, stop=stop)
    env.reset(seed=0)
    steps = []
    for a in ids(tok, *actions):
        steps.append(env.step(a))
        if steps[-1][2]:
            break
    assert len(steps) == n_steps
    assert [s[2] for s in steps] == [False] * (n_steps - 1) + [True]
    assert not any(s[3] for s in steps)
    last = steps[-1]
    assert last[4]["completion"] == completion and last[4]["prompt"] == "hello"
    assert last[1] == (n_steps - 1) + 0.5 + 10.0 * n_steps


def test_list_of_rewards_weighs_each_one(tok):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward=[per_token, n_tokens, n_tokens], max_new_tokens=2)
    env.reset(seed=0)
    steps, _ = run(env, ids(tok, "a", "b"))
    assert [s[0] for s in steps] == [1.0, 1.0 + 2.0 + 2.0]
    assert steps[-1][3]["reward_components"] == {"per_token": 1.0, "n_tokens": 2.0, "n_tokens_2": 2.0}


def test_no_reward_gives_zero_and_empty_components(tok):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, max_new_tokens=1)
    env.reset(seed=0)
    _, r, _, trunc, info = env.step(ids(tok, "a")[0])
    assert (r, trunc, info["reward_components"], info["completion"]) == (0.0, True, {}, "a")


def test_numpy_integer_actions_are_accepted(tok):
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, max_new_tokens=3)
    env.reset(seed=0)
    a = ids(tok, "a")[0]
    for action in (np.int64(a), np.int32(a), np.array(a)):
        env.step(action)
    assert env.render() == "abaaa"


# --- reset ---------------------------------------------------------------------------------------------

PROMPTS = ["ab", "hello", "the lazy dog", "love", "night", "fox"]


def test_reset_options_name_a_prompt(tok):
    env = TextGenEnv(prompts=PROMPTS, tokenizer=tok, max_new_tokens=3)
    obs, info = env.reset(options={"prompt_index": 2})
    assert (info["prompt_index"], info["prompt"]) == (2, "the lazy dog")
    n = len(tok("the lazy dog")["input_ids"])
    assert obs["input_ids"][:n].tolist() == tok("the lazy dog")["input_ids"]
    assert obs["attention_mask"].sum() == n

    _, info = env.reset(options={"prompt": "love"})  # a prompt of the set: its index
    assert (info["prompt_index"], info["prompt"]) == (3, "love")

    obs, info = env.reset(options={"prompt": "brown"})  # ad hoc
    assert (info["prompt_index"], info["prompt"]) == (-1, "brown")
    n = len(tok("brown")["input_ids"])
    assert obs["input_ids"][:n].tolist() == tok("brown")["input_ids"]
    assert obs["attention_mask"].tolist() == [1] * n + [0] * (env.engine.C - n)
    *_, info = env.step(tok.eos_token_id)
    assert (info["prompt"], info["prompt_index"], info["completion"]) == ("brown", -1, "")


def test_reset_seed_is_deterministic(tok):
    def draws(seed):
        env = TextGenEnv(prompts=PROMPTS, tokenizer=tok, max_new_tokens=3)
        first = env.reset(seed=seed)[1]["prompt_index"]
        return [first] + [env.reset()[1]["prompt_index"] for _ in range(15)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert set(draws(7)) == set(range(len(PROMPTS)))  # uniform over the set: all six appear in 16 draws

    env = TextGenEnv(prompts=PROMPTS, tokenizer=tok, max_new_tokens=3)
    a, _ = env.reset(seed=3)
    env.step(ids(tok, "a")[0])
    b, _ = env.reset(seed=3)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"])


def test_observation_layout_is_right_padded(tok):
    env = TextGenEnv(prompts=PROMPTS, tokenizer=tok, max_new_tokens=4)
    longest = max(len(tok(p)["input_ids"]) for p in PROMPTS)
    assert env.observation_space["input_ids"].shape == (longest + 4,)
    assert env.observation_space["attention_mask"].dtype == np.int8
    for i, p in enumerate(PROMPTS):
        obs, _ = env.reset(options={"prompt_index": i})
        p_ids = tok(p)["input_ids"]
        assert obs["input_ids"].dtype == np.int64 and obs["attention_mask"].dtype == np.int8
        assert obs["input_ids"][: len(p_ids)].tolist() == p_ids  # prompt at index 0
        assert (obs["input_ids"][len(p_ids) :] == tok.pad_token_id).all()
        for t in range(1, 5):
            obs, *_ = env.step(ids(tok, "e")[0])
            assert obs["attention_mask"].sum() == len(p_ids) + t
            assert obs["attention_mask"][: len(p_ids) + t].all()  # valid tokens first, then padding
            assert obs["input_ids"][len(p_ids) + t - 1] == ids(tok, "e")[0]
            assert env.observation_space.contains(obs)


def test_empty_prompt_starts_from_bos(tok):
    env = TextGenEnv(prompts=[""], tokenizer=tok, max_new_tokens=2)
    obs, _ = env.reset(seed=0)
    assert obs["input_ids"][0] == tok.bos_token_id and obs["attention_mask"].sum() == 1


# --- registration ---------------------------------------------------------------------------------------


def test_gymnasium_make_passes_keywords(tok):
    env = gymnasium.make("textrl/TextGen-v0", tokenizer=tok, prompts=["ab"], reward=REWARD, max_new_tokens=2)
    assert isinstance(env.unwrapped, TextGenEnv)
    assert env.action_space == gymnasium.spaces.Discrete(len(tok))
    env.reset(seed=0)
    steps, _ = run(env, ids(tok, "a", "b"))
    assert [s[0] for s in steps] == [0.5, 1.5 + 20.0]
    assert steps[-1][3]["completion"] == "ab"


def test_time_limit_from_make_truncates(tok):
    env = gymnasium.make("textrl/TextGen-v0", tokenizer=tok, prompts=["ab"], max_new_tokens=10, max_episode_steps=3)
    env.reset(seed=0)
    flags = [env.step(ids(tok, "a")[0])[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


# --- rgb_array frames -----------------------------------------------------------------------------------

SHAPE = (FRAME_HEIGHT, FRAME_WIDTH, 3)


def _has(frame: np.ndarray, colour) -> bool:
    return bool((frame == np.array(colour, dtype=np.uint8)).all(-1).any())


def _ink_rows(frame: np.ndarray) -> np.ndarray:
    """Indices of the pixel rows with any text on them."""
    return np.flatnonzero((frame != frame[0, 0]).any(-1).any(-1))


def _n_lines(frame: np.ndarray) -> int:
    """Number of lines of text: runs of pixel rows with ink."""
    rows = _ink_rows(frame)
    return int(rows.size > 0) + int((np.diff(rows) > 1).sum())


def test_text_frame_has_a_fixed_shape_and_dtype():
    long = "The old king sees the queen by the river. " * 60 + "\n" * 40 + "x" * 500
    for prompt, completion in [("", ""), ("Hi", ""), ("The old king", " sees"), (long, long)]:
        frame = text_frame(prompt, completion)
        assert frame.shape == SHAPE and frame.dtype == np.uint8
    assert text_frame("Hi", " there", width=64, height=48).shape == (48, 64, 3)
    assert not _ink_rows(text_frame("", "")).size  # nothing to draw: background only
    with pytest.raises(ValueError, match="pixels"):
        text_frame("Hi", "", width=10, height=10)


def test_text_frame_shows_the_text_prompt_and_completion_apart():
    frames = {
        "prompt": text_frame("The old king sees", ""),
        "completion": text_frame("", "The old king sees"),
        "split": text_frame("The old ki", "ng sees"),  # the completion continues a word of the prompt
        "other": text_frame("The old queen sees", ""),
    }
    assert _has(frames["prompt"], PROMPT_COLOUR) and not _has(frames["prompt"], COMPLETION_COLOUR)
    assert _has(frames["completion"], COMPLETION_COLOUR) and not _has(frames["completion"], PROMPT_COLOUR)
    assert _has(frames["split"], PROMPT_COLOUR) and _has(frames["split"], COMPLETION_COLOUR)
    names = list(frames)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.array_equal(frames[a], frames[b]), (a, b)
    # same text, same ink: only the colour differs
    np.testing.assert_array_equal(_ink_rows(frames["prompt"]), _ink_rows(frames["completion"]))


def test_text_frame_wraps_and_honours_newlines():
    assert _n_lines(text_frame("The old king", "")) == 1
    assert _n_lines(text_frame("The old\nking", "")) == 2
    assert _n_lines(text_frame("The old", "\n\nking")) == 2  # a blank line between them...
    assert _ink_rows(text_frame("The old", "\n\nking")).max() > _ink_rows(text_frame("The old\nking", "")).max()
    assert np.array_equal(text_frame("a\r\nb", ""), text_frame("a\nb", ""))
    wrapped = text_frame("the quick brown fox " * 10, "")  # 200 characters: wider than one line
    assert 3 <= _n_lines(wrapped) <= 4
    ink_columns = np.flatnonzero((wrapped != wrapped[0, 0]).any(-1).any(0))
    assert ink_columns.min() >= MARGIN - 1 and ink_columns.max() < FRAME_WIDTH - MARGIN + 2  # inside the margins
    assert _n_lines(text_frame("", "y" * 400)) >= 4  # a word wider than a line is broken between characters


def test_text_frame_keeps_the_newest_text_when_it_overflows():
    story = "The old king sees the queen by the river and the knight guards the castle. " * 20
    endings = {w: text_frame("Once upon a time\n", story + w) for w in ("LAST", "WORD")}
    rows = np.flatnonzero((endings["LAST"] != endings["WORD"]).any(-1).any(-1))
    assert rows.size and rows.min() > FRAME_HEIGHT // 2  # the last word differs, on the last line
    # the oldest text has scrolled off: a different first line draws the same frame
    assert np.array_equal(endings["LAST"], text_frame("A long time ago\n", story + "LAST"))
    assert not np.array_equal(text_frame("Once upon a time\n", "Hi"), text_frame("A long time ago\n", "Hi"))
    assert _ink_rows(endings["LAST"]).max() > FRAME_HEIGHT - MARGIN - 20  # the frame is full to the bottom


def test_env_renders_rgb_array_frames_of_its_text(tok):
    env = TextGenEnv(prompts=["ab", "hello"], tokenizer=tok, max_new_tokens=4, render_mode="rgb_array")
    env.reset(options={"prompt": "hello"})
    first = env.render()
    assert first.shape == SHAPE and first.dtype == np.uint8
    np.testing.assert_array_equal(first, text_frame("hello", ""))
    env.step(ids(tok, "a")[0])
    env.step(ids(tok, "b")[0])
    np.testing.assert_array_equal(env.render(), text_frame("hello", "ab"))
    ansi = TextGenEnv(prompts=["ab"], tokenizer=tok, render_mode="ansi")
    ansi.reset(seed=0)
    assert ansi.render() == "ab"  # the text modes are unchanged


def test_vector_env_renders_a_frame_per_sub_env_like_sync_vector_env(tok):
    kwargs = {"prompts": ["ab", "hello", "the lazy dog"], "tokenizer": tok, "max_new_tokens": 3}
    native = TextGenVectorEnv(3, **kwargs, render_mode="rgb_array")
    sync = gymnasium.vector.SyncVectorEnv([lambda: TextGenEnv(**kwargs, render_mode="rgb_array")] * 3)
    native.reset(seed=0)
    sync.reset(seed=0)
    for _ in range(4):  # past an autoreset
        frames, expected = native.render(), sync.render()
        assert isinstance(frames, tuple) and len(frames) == 3
        for a, b in zip(frames, expected, strict=True):
            assert a.shape == SHAPE and a.dtype == np.uint8
            np.testing.assert_array_equal(a, b)
        actions = np.array(ids(tok, "a", "b", "c"))
        native.step(actions)
        sync.step(actions)
    assert isinstance(TextGenVectorEnv(2, **kwargs).render(), list)  # ansi / None: the texts, as before
    with pytest.raises(ValueError, match="render_mode must be one of"):
        TextGenVectorEnv(2, **kwargs, render_mode="human")


@pytest.mark.parametrize("vectorization_mode", ["sync", "vector_entry_point"])
def test_task_env_accepts_rgb_array(vectorization_mode):
    env = gymnasium.make("textrl/Arithmetic-v0", render_mode="rgb_array")
    env.reset(seed=0)
    assert env.render().shape == SHAPE
    vec = gymnasium.make_vec(
        "textrl/Arithmetic-v0", num_envs=2, vectorization_mode=vectorization_mode, render_mode="rgb_array"
    )
    vec.reset(seed=0)
    frames = vec.render()
    assert len(frames) == 2 and all(f.shape == SHAPE for f in frames)
