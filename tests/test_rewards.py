"""The reward API: built-ins, RewardSet, lazy immediate arguments, and TRL's own reward functions unchanged."""

import numpy as np
import pytest

from envs import TextGenEnv, TextGenVectorEnv
from textrl.pretrain import train_tokenizer
from textrl.reward_set import RewardSet
from textrl.rewards import (
    REWARDS,
    ImmediateReward,
    SequenceReward,
    conversational,
    immediate,
    keyword_reward,
    length_penalty,
    repeated_token_penalty,
    repetition_penalty,
    reward_kind,
    reward_name,
    sequence,
    target_length,
    token_keyword_shaping,
)

CORPUS = ["ab ab ab abc", "hello world", "the quick brown fox jumps over the lazy dog", "<think>\nlove</think>"] * 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def episode(env, actions, **reset):
    """Run ``actions`` from a reset until the episode ends; return the rewards and the last info."""
    env.reset(seed=0, **reset)
    rewards = []
    for a in actions:
        _, r, term, trunc, info = env.step(int(a))
        rewards.append(r)
        if term or trunc:
            return rewards, info
    raise AssertionError("the episode did not end")


# --- built-ins -------------------------------------------------------------------------------------------


def test_builtin_edge_cases():
    assert length_penalty(max_tokens=2, per_token=0.25)(completion_ids=[[], [1, 2], [1, 2, 3]]) == [0.0, 0.0, -0.25]
    assert target_length(target=2)(completion_ids=[[], [1], [1, 2], [1, 2, 3], [1] * 5]) == [0.0, 0.5, 1.0, 0.5, 0.0]
    r = keyword_reward(include=["love", "Night"], avoid=["death", "hate"])
    texts = ["lovely nights", "LOVE, love!", "night's", "hate death love", ""]
    assert r(completions=texts) == [0.0, 0.5, 0.0, -1.5, 0.0]
    assert keyword_reward(include=[], avoid=["x"])(completions=["x y", "y"]) == [-1.0, 0.0]
    rp = repetition_penalty(ngram_size=3, max_penalty=-2.0)
    ids = [[], [1, 2], [1, 2, 3], [7, 7, 7, 7], [1, 2, 1, 2, 1]]
    assert rp(completion_ids=ids) == [0.0, 0.0, 0.0, -2.0 * (1 - 1 / 2), -2.0 * (1 - 2 / 3)]
    with pytest.raises(ValueError, match="max_penalty must be <= 0"):
        repetition_penalty(max_penalty=0.5)
    shaping = token_keyword_shaping(include=["Love"], avoid=["hate"], bonus=2.0)
    assert shaping(new_tokens=["\nlove ", "LOVE", "lo", "hateful", " Hate"]) == [2.0, 2.0, 0.0, 0.0, -2.0]
    repeat = repeated_token_penalty(window=1, penalty=0.5)
    assert repeat(completion_ids=[[3], [3, 3], [3, 4, 3], [4, 3, 3]]) == [0.0, -0.5, 0.0, -0.5]


def test_builtin_registry_and_kinds():
    kinds = {name: reward_kind(make()) for name, make in REWARDS.items()}
    assert kinds == {
        "length_penalty": "sequence",
        "target_length": "sequence",
        "keyword_reward": "sequence",
        "repetition_penalty": "sequence",
        "token_keyword_shaping": "immediate",
        "repeated_token_penalty": "immediate",
        "vader_sentiment": "sequence",
        "chrf": "sequence",
        "bleu": "sequence",
        "rouge": "sequence",
        "semantic_similarity": "sequence",
        "misspelling_rate": "sequence",
        "lexical_constraints": "sequence",
        "lexical_shaping": "immediate",
    }
    assert isinstance(token_keyword_shaping(), ImmediateReward)
    assert not isinstance(length_penalty(), ImmediateReward)
    assert isinstance(length_penalty(), SequenceReward)
    assert [t.name for t in RewardSet(list(REWARDS)).terms] == list(REWARDS)


def test_builtins_by_name_in_the_env(tok):
    env = TextGenEnv(
        prompts=["ab"], tokenizer=tok, reward={"length_penalty": 1.0, "repeated_token_penalty": 10.0}, max_new_tokens=40
    )
    a = tok.convert_tokens_to_ids("a")
    rewards, info = episode(env, [a] * 40)
    # repeated_token_penalty: -0.1 * 10 from the second token on; length_penalty: 8 tokens over 32
    assert rewards[0] == 0.0 and rewards[1:-1] == [-1.0] * 38 and rewards[-1] == -1.0 - 8.0
    assert info["reward_components"] == {"length_penalty": -8.0, "repeated_token_penalty": -0.1}


# --- RewardSet --------------------------------------------------------------------------------------------


def test_reward_names_and_duplicates():
    def f(completions, **_):
        return [1.0] * len(completions)

    rs = RewardSet([f, f, lambda completions, **_: [2.0] * len(completions), keyword_reward(), f])
    assert rs.names == ["f", "f_2", "lambda", "keyword_reward", "f_3"]
    assert [t.weight for t in rs.terms] == [1.0] * 5
    assert reward_name(lambda: 0) == "lambda" and reward_name(length_penalty()) == "length_penalty"
    assert RewardSet(None).names == [] and RewardSet("target_length").names == ["target_length"]
    assert RewardSet(rs).names == rs.names


def test_weighted_total_and_unweighted_components():
    def one(completions, **_):
        return [1.0] * len(completions)

    def length(completions, **_):
        return [float(len(c)) for c in completions]

    rs = RewardSet({one: -0.5, length: 2.0})
    total, parts = rs.sequence(["p", "q"], ["abc", ""], [[1], [2]])
    assert total.tolist() == [5.5, -0.5]
    assert {k: v.tolist() for k, v in parts.items()} == {"one": [1.0, 1.0], "length": [3.0, 0.0]}
    assert repr(rs) == "RewardSet(one[sequence]*-0.5, length[sequence]*2)"


@pytest.mark.parametrize(("weight", "match"), [(float("nan"), "finite number"), ("2", "finite number")])
def test_bad_weight(weight, match):
    with pytest.raises(ValueError, match=rf"the weight of reward 'length_penalty' must be a {match}"):
        RewardSet({length_penalty(): weight})


def test_bad_kind():
    def f(completions, **_):
        return [0.0]

    f.kind = "token"
    with pytest.raises(ValueError, match="reward 'f' has kind='token'; expected 'sequence' or 'immediate'"):
        RewardSet(f)
    with pytest.raises(TypeError, match="reward must be a callable, a name, a list or a dict, got int"):
        RewardSet(3)


def test_decorators():
    def f(**_):
        return [0.0]

    assert reward_kind(f) == "sequence"
    assert reward_kind(immediate(f)) == "immediate"
    assert reward_kind(sequence(f)) == "sequence"


# --- immediate rewards get only what they name --------------------------------------------------------------


def test_immediate_reward_gets_only_the_arguments_it_names():
    calls = []

    def provider(key, value):
        def compute():
            calls.append(key)
            return value

        return compute

    def forbidden():
        raise AssertionError("completions were decoded")

    @immediate
    def by_id(new_token_ids):
        return new_token_ids * 2.0

    @immediate
    def by_step(step, new_token_ids):
        return step + new_token_ids

    context = {
        "new_token_ids": provider("new_token_ids", np.array([1, 2])),
        "step": provider("step", np.array([0, 5])),
        "completions": forbidden,
        "prompts": forbidden,
    }
    total, parts = RewardSet({by_id: 1.0, by_step: 0.5}).immediate(context, 2)
    assert total.tolist() == [2.0 + 0.5, 4.0 + 3.5]
    assert {k: v.tolist() for k, v in parts.items()} == {"by_id": [2.0, 4.0], "by_step": [1.0, 7.0]}
    assert calls == ["new_token_ids", "step"]  # each computed once, shared by both rewards

    @immediate
    def takes_all(**kwargs):
        return [float(len(kwargs))] * 2

    with pytest.raises(AssertionError, match="completions were decoded"):
        RewardSet(takes_all).immediate(context, 2)


def test_immediate_reward_on_token_ids_never_decodes_in_the_env(tok, monkeypatch):
    @immediate
    def token_is_a(new_token_ids):
        return (new_token_ids == tok.convert_tokens_to_ids("a")).astype(float)

    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward=token_is_a, max_new_tokens=3)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a completion")

    monkeypatch.setattr(env.engine, "completion_text", no_decoding)
    monkeypatch.setattr(type(env.engine), "token_text", property(no_decoding))
    env.reset(seed=0)
    assert [env.step(tok.convert_tokens_to_ids(c))[1] for c in "ab"] == [1.0, 0.0]


def test_immediate_reward_context_values(tok):
    seen = []

    @immediate
    def record(new_token_ids, new_tokens, completion_ids, completions, prompts, step):
        seen.append((new_token_ids.tolist(), new_tokens, completion_ids, completions, prompts, step.tolist()))
        return [0.0] * len(prompts)

    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward=record, max_new_tokens=2)
    h, i = tok.convert_tokens_to_ids(["h", "i"])
    episode(env, [h, i])
    assert seen == [
        ([h], ["h"], [[h]], ["h"], ["ab"], [0]),
        ([i], ["i"], [[h, i]], ["hi"], ["ab"], [1]),
    ]


# --- conversational --------------------------------------------------------------------------------------


def test_conversational_wrapper():
    got = {}

    @immediate
    def chat(prompts, completions, **kwargs):
        got.update(prompts=prompts, completions=completions, **kwargs)
        return [1.0]

    wrapped = conversational(chat)
    assert (reward_name(wrapped), reward_kind(wrapped)) == ("chat", "immediate")
    assert wrapped(prompts=["p"], completions=["c"], completion_ids=[[1]], reference=["r"]) == [1.0]
    assert got == {
        "prompts": [[{"role": "user", "content": "p"}]],
        "completions": [[{"role": "assistant", "content": "c"}]],
        "completion_ids": [[1]],
        "reference": ["r"],
    }


# --- TRL's reward functions, unchanged -------------------------------------------------------------------


def test_trl_rewards_plug_in_unchanged(tok):
    trl_rewards = pytest.importorskip("trl.rewards")
    repetition = trl_rewards.get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    overlong = trl_rewards.get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward={repetition: 1.0, overlong: 0.5}, max_new_tokens=6)
    a, b, c = tok.convert_tokens_to_ids(["a", "b", "c"])
    eos = tok.eos_token_id
    for actions in ([a, b, a, b, eos], [a] * 6, [c, eos], [eos], [a, b, c, a, b, c]):
        rewards, info = episode(env, actions)
        ids = [actions[: len(rewards)]]
        want_rep, want_long = repetition(completion_ids=ids)[0], overlong(completion_ids=ids)[0]
        assert info["reward_components"] == {
            "repetition_penalty_reward": want_rep,
            "soft_overlong_punishment_reward": want_long,
        }
        assert rewards == [0.0] * (len(rewards) - 1) + [want_rep + 0.5 * want_long]
    # the built-in agrees with TRL's
    ids = [[a, b, a, b, eos], [a] * 6, [], [a, a, b, b, a, a, b, b]]
    assert repetition_penalty(ngram_size=2)(completion_ids=ids) == repetition(completion_ids=ids)


def test_trl_rewards_in_a_batch(tok):
    trl_rewards = pytest.importorskip("trl.rewards")
    repetition = trl_rewards.get_repetition_penalty_reward(ngram_size=2)
    venv = TextGenVectorEnv(4, prompts=["ab"], tokenizer=tok, reward=repetition, max_new_tokens=4)
    venv.reset(seed=0)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    actions = np.array([[a, a, a, a], [a, b, a, b], [a, b, b, a], [b, b, b, a]])
    for t in range(4):
        _, reward, _, trunc, info = venv.step(actions[:, t])
    assert trunc.all()
    want = repetition(completion_ids=actions.tolist())
    assert reward.tolist() == want == [-(1 - 1 / 3), -(1 - 2 / 3), 0.0, -(1 - 2 / 3)]
    assert info["reward_components"]["repetition_penalty_reward"].tolist() == want


def test_trl_think_format_reward_through_conversational(tok):
    trl_rewards = pytest.importorskip("trl.rewards")
    env = TextGenEnv(prompts=["ab"], tokenizer=tok, reward=conversational(trl_rewards.think_format_reward))
    for text, expected in [("<think>\nlove</think>\nyes", 1.0), ("<think>\nlove\nyes", 0.0), ("love</think>", 0.0)]:
        actions = [*tok(text)["input_ids"], tok.eos_token_id]
        rewards, info = episode(env, actions)
        assert info["completion"] == text
        assert trl_rewards.think_format_reward([[{"content": text}]]) == [expected]
        assert rewards[-1] == info["reward_components"]["think_format_reward"] == expected


# --- datasets ---------------------------------------------------------------------------------------------


def test_datasets_dataset_as_prompts(tok):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "ab", "answer": "x"}, {"prompt": "hello", "answer": "y"}]
    seen = []

    def check(prompts, completions, answer, **_):
        seen.extend(zip(prompts, answer, strict=True))
        return [0.0] * len(prompts)

    env = TextGenEnv(prompts=datasets.Dataset.from_list(rows), tokenizer=tok, reward=check, max_new_tokens=1)
    assert env.engine.prompts.texts == ["ab", "hello"]
    for i in (1, 0, 1):
        env.reset(options={"prompt_index": i})
        env.step(5)
    assert seen == [("hello", "y"), ("ab", "x"), ("hello", "y")]
