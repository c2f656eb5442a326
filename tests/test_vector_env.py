"""TextGenVectorEnv: equal to SyncVectorEnv over single envs, make_vec, reset info, batched reward calls."""

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import envs  # noqa: F401  (registers textrl/TextGen-v0)
from envs import TextGenEnv, TextGenVectorEnv
from textrl.pretrain import train_tokenizer
from textrl.rewards import immediate

CORPUS = ["ab ab ab abc", "hello world", "the quick brown fox jumps over the lazy dog", "love and night!"] * 5
ROWS = [
    {"prompt": "ab", "reference": "R0"},
    {"prompt": "hello", "reference": "R1"},
    {"prompt": "the lazy dog", "reference": "R2"},
    {"prompt": "", "reference": "R3"},
    {"prompt": "love and", "reference": "R4"},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


@immediate
def shaping(new_token_ids, step, reference):
    """Immediate: depends on the token, its position and a row field."""
    rows = zip(new_token_ids.tolist(), step.tolist(), reference, strict=True)
    return [0.01 * a + 0.1 * s + len(r) for a, s, r in rows]


def score(prompts, completions, completion_ids, reference, **_):
    """Sequence: depends on every argument, so any misalignment changes it."""
    rows = zip(prompts, completions, completion_ids, reference, strict=True)
    return [len(p) + 0.5 * len(c) + sum(i) / 7 + int(r[1]) for p, c, i, r in rows]


KWARGS = {"prompts": ROWS, "reward": {shaping: 0.5, score: 2.0}, "max_new_tokens": 6, "stop": ["!", "dog"]}


def random_actions(tok, rng: np.random.Generator, n: int) -> np.ndarray:
    """Mostly uniform tokens, with eos and a stop token often enough that episodes end at different steps."""
    a = rng.integers(0, len(tok), n)
    u = rng.random(n)
    a[u < 0.12] = tok.eos_token_id
    a[(u >= 0.12) & (u < 0.2)] = tok.convert_tokens_to_ids("!")
    return a


def assert_same(a, b, path="info"):
    """Recursive exact equality: same keys, same array dtypes/shapes/values (object arrays element-wise)."""
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: {type(b).__name__} is not a dict"
        assert sorted(a) == sorted(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), f"{path}: {b!r} is not a tuple of {len(a)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{path}: {type(b).__name__} is not an array"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        if a.dtype == object:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                assert_same(x, y, f"{path}[{i}]")
        else:
            np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def test_assert_same_catches_differences():
    x = {"a": np.array([1, 2]), "_a": np.array([True, False]), "o": np.array(["p", None], dtype=object)}
    assert_same(x, {k: v.copy() for k, v in x.items()})
    for changed in (
        {**x, "a": np.array([1, 3])},
        {**x, "a": np.array([1.0, 2.0])},
        {**x, "_a": np.array([True, True])},
        {**x, "o": np.array(["p", "q"], dtype=object)},
        {k: v for k, v in x.items() if k != "o"},
    ):
        with pytest.raises(AssertionError):
            assert_same(x, changed)


def lockstep(ours, ref, tok, rng, steps: int) -> np.ndarray:
    """Step both envs with the same random actions, asserting equal results; return how episodes ended."""
    ends = {"eos": 0, "stop": 0, "truncated": 0, "per_env": np.zeros(ours.num_envs, dtype=int)}
    for t in range(steps):
        actions = random_actions(tok, rng, ours.num_envs)
        got, want = ours.step(actions), ref.step(actions)
        assert_same(got, want, f"step {t}")
        terminated, truncated = got[2], got[3]
        eos = actions == tok.eos_token_id
        ends["eos"] += (terminated & eos).sum()
        ends["stop"] += (terminated & ~eos).sum()
        ends["truncated"] += truncated.sum()
        done = terminated | truncated
        ends["per_env"] += done
        if ours.autoreset_mode == AutoresetMode.DISABLED and done.any():
            assert_same(ours.reset(options={"reset_mask": done}), ref.reset(options={"reset_mask": done}), "reset")
    return ends


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
def test_equals_sync_vector_env(tok, mode):
    n = 5
    ours = TextGenVectorEnv(n, tokenizer=tok, autoreset_mode=mode, **KWARGS)
    ref = SyncVectorEnv([lambda: TextGenEnv(tokenizer=tok, **KWARGS)] * n, autoreset_mode=mode)
    assert ours.single_observation_space == ref.single_observation_space
    assert ours.observation_space == ref.observation_space
    assert ours.action_space == ref.action_space

    rng = np.random.default_rng(0)
    assert_same(ours.reset(seed=123), ref.reset(seed=123), "reset")
    ends = lockstep(ours, ref, tok, rng, 60)
    assert (ends["per_env"] >= 5).all()  # every sub-env went through several episodes
    assert min(ends["eos"], ends["stop"], ends["truncated"]) >= 5  # ending in all three ways
    # a seed of None keeps that sub-env's generator going, in both
    assert_same(ours.reset(seed=[4, None, 6, 7, 8]), ref.reset(seed=[4, None, 6, 7, 8]), "reseed")
    lockstep(ours, ref, tok, rng, 10)


def test_make_vec_returns_the_native_vector_env(tok):
    venv = gymnasium.make_vec(
        "textrl/TextGen-v0", num_envs=4, vectorization_mode="vector_entry_point", tokenizer=tok, **KWARGS
    )
    assert isinstance(venv, TextGenVectorEnv)
    assert venv.num_envs == 4 and venv.autoreset_mode == AutoresetMode.NEXT_STEP
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, info = venv.reset(seed=0)
    assert obs["input_ids"].shape == (4, venv.engine.C)
    assert info["reset"].tolist() == [True] * 4


def test_info_reset_marks_exactly_the_rows_starting_a_new_prompt(tok):
    n = 6
    venv = TextGenVectorEnv(n, tokenizer=tok, **KWARGS)
    obs, info = venv.reset(seed=1)
    prompt_ids = venv.engine.prompts.ids
    rng = np.random.default_rng(1)
    done = np.zeros(n, dtype=bool)
    n_resets = 0
    for _ in range(40):
        before = obs["attention_mask"].sum(axis=1)
        obs, _, term, trunc, info = venv.step(random_actions(tok, rng, n))
        marked = info.get("_reset", np.zeros(n, dtype=bool))
        assert marked.tolist() == done.tolist()  # NEXT_STEP: the step after an episode ended
        assert info.get("reset", np.zeros(n, dtype=bool)).tolist() == done.tolist()
        for i in np.flatnonzero(done):
            p = prompt_ids[info["prompt_index"][i]]
            assert obs["attention_mask"][i].sum() == len(p)
            assert obs["input_ids"][i, : len(p)].tolist() == p.tolist()
            assert not term[i] and not trunc[i]
        grew = obs["attention_mask"].sum(axis=1) - before
        assert (grew[~done] == 1).all()  # the others took their action
        n_resets += done.sum()
        done = term | trunc
    assert n_resets >= 10


def test_same_step_reset_info(tok):
    n = 4
    venv = TextGenVectorEnv(n, tokenizer=tok, autoreset_mode=AutoresetMode.SAME_STEP, **KWARGS)
    venv.reset(seed=2)
    prompt_ids = venv.engine.prompts.ids
    rng = np.random.default_rng(2)
    n_done = 0
    for _ in range(30):
        obs, _, term, trunc, info = venv.step(random_actions(tok, rng, n))
        done = term | trunc
        assert info.get("_reset", np.zeros(n, dtype=bool)).tolist() == done.tolist()
        assert info.get("_final_obs", np.zeros(n, dtype=bool)).tolist() == done.tolist()
        for i in np.flatnonzero(done):
            final, final_info = info["final_obs"][i], info["final_info"]
            p_len = len(prompt_ids[final_info["prompt_index"][i]])
            m = final["attention_mask"].sum()
            completion = tok.decode(final["input_ids"][p_len:m], skip_special_tokens=True)
            assert final_info["completion"][i] == completion and final_info["_completion"][i]
            p = prompt_ids[info["prompt_index"][i]]  # the row already holds its next prompt
            assert obs["attention_mask"][i].sum() == len(p)
            assert obs["input_ids"][i, : len(p)].tolist() == p.tolist()
            n_done += 1
    assert n_done >= 5


def test_sequence_reward_called_once_per_step_with_all_finished_rows(tok):
    calls = []

    def counted(prompts, completions, completion_ids, reference):
        calls.append(list(reference))
        return [float(len(c)) for c in completion_ids]

    n = 8
    venv = TextGenVectorEnv(n, tokenizer=tok, prompts=ROWS, reward=counted, max_new_tokens=5, stop="!")
    venv.reset(seed=3)
    rng = np.random.default_rng(3)
    expected = []
    for _ in range(40):
        before = len(calls)
        _, reward, term, trunc, info = venv.step(random_actions(tok, rng, n))
        done = np.flatnonzero(term | trunc)
        assert len(calls) - before == (1 if done.size else 0)
        if done.size:
            expected.append([ROWS[info["prompt_index"][i]]["reference"] for i in done])
            assert calls[-1] == expected[-1]  # every finished row, in row order, in one batch
            assert (reward[done] > 0).all() and (reward[np.setdiff1d(np.arange(n), done)] == 0).all()
    assert len(expected) >= 10 and max(len(e) for e in expected) >= 2


def test_reward_fields_follow_the_rows(tok):
    seen = []

    def check(prompts, completions, completion_ids, reference):
        seen.extend(zip(prompts, reference, strict=True))
        return [0.0] * len(prompts)

    venv = TextGenVectorEnv(4, tokenizer=tok, prompts=ROWS, reward=check, max_new_tokens=2)
    venv.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        venv.step(rng.integers(2, len(tok), 4))
    by_prompt = {r["prompt"]: r["reference"] for r in ROWS}
    assert len(seen) >= 20 and all(by_prompt[p] == ref for p, ref in seen)

    env = TextGenEnv(tokenizer=tok, prompts=ROWS, reward=check, max_new_tokens=1)
    seen.clear()
    env.reset(options={"prompt_index": 2})
    env.step(5)
    env.reset(options={"prompt": "fox"})
    env.step(5)
    assert seen == [("the lazy dog", "R2"), ("fox", None)]


@pytest.mark.parametrize(
    ("actions", "error", "match"),
    [
        (np.zeros(3, dtype=np.int64), ValueError, r"actions must have shape \(4,\), got \(3,\)"),
        (np.zeros((4, 1), dtype=np.int64), ValueError, r"actions must have shape \(4,\), got \(4, 1\)"),
        (np.zeros(4), ValueError, "actions must be integer token ids, got dtype float64"),
        (np.zeros(4, dtype=bool), ValueError, "got dtype bool"),
        (np.array([0, 1, 300, 2]), ValueError, r"action 300 of sub-env 2 is out of range: token ids are 0\.\.299"),
        (np.array([0, -1, 0, 2]), ValueError, r"action -1 of sub-env 1 is out of range"),
        (5, ValueError, r"actions must have shape \(4,\), got \(\)"),
    ],
)
def test_bad_actions(tok, actions, error, match):
    venv = TextGenVectorEnv(4, tokenizer=tok, prompts=["ab"], max_new_tokens=3)
    venv.reset(seed=0)
    with pytest.raises(error, match=match):
        venv.step(actions)
    obs, *_ = venv.step(np.full(4, 5))  # nothing was written by the bad step
    assert obs["attention_mask"].sum(axis=1).tolist() == [2] * 4


def test_bad_vector_keywords(tok):
    with pytest.raises(ValueError, match="num_envs must be a positive integer, got 0"):
        TextGenVectorEnv(0, tokenizer=tok, prompts=["ab"])
    venv = TextGenVectorEnv(2, tokenizer=tok, prompts=["ab"])
    with pytest.raises(ValueError, match="got 3 seeds for 2 sub-envs"):
        venv.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError, match=r"reset_mask.*must be a bool array of shape \(2,\)"):
        venv.reset(options={"reset_mask": np.array([1, 0])})


def test_disabled_autoreset_requires_a_reset(tok):
    venv = TextGenVectorEnv(2, tokenizer=tok, prompts=["ab"], max_new_tokens=1, autoreset_mode=AutoresetMode.DISABLED)
    venv.reset(seed=0)
    venv.step(np.array([5, 5]))
    with pytest.raises(RuntimeError, match=r"sub-envs \[0, 1\] finished; reset them"):
        venv.step(np.array([5, 5]))
