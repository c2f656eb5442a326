"""Multi-turn envs (envs/dialogue.py): a hand-worked episode with exact observations, masks and rewards, both
env checkers, the vector env equal to SyncVectorEnv, random replies and stops, and bad replies."""

import itertools
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401  (registers textrl/MultiTurn-v0)
from envs.dialogue import MultiTurnEnv, MultiTurnVectorEnv, Reply, RespondError
from textrl.pretrain import train_tokenizer
from textrl.rewards import immediate

CORPUS = ["guess 3 higher lower 5 yes no", "the quick brown fox jumps over the lazy dog", "12345 67890 +-*/"] * 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def one(tok, text: str) -> int:
    (token,) = tok.encode(text, add_special_tokens=False)
    return token


def guess(state, turn):
    """A guessing game: the secret is the prompt row's field; "higher"/"lower" until the agent says it."""
    try:
        n = int(turn.strip())
    except ValueError:
        return Reply("say a number", reward=-0.5)
    if n == state["secret"]:
        return Reply(None, reward=1.0, done=True)
    state.setdefault("wrong", 0)
    state["wrong"] += 1
    return Reply("higher" if n < state["secret"] else "lower", reward=0.0)


@immediate
def per_token(new_token_ids):
    return [0.25] * len(new_token_ids)


def transcript_length(completions, **_):
    return [float(len(c)) for c in completions]


GAME = {"prompts": [{"prompt": "guess", "secret": 5}], "respond": guess, "max_turn_tokens": 1, "context_length": 24}


def test_hand_worked_episode(tok):
    env = MultiTurnEnv(
        tokenizer=tok, reward={per_token: 1.0, transcript_length: 0.1}, reply_template=" {reply} ", **GAME
    )
    obs, info = env.reset(seed=0)
    prompt = tok.encode("guess", add_special_tokens=False)
    P = len(prompt)
    assert (
        obs["input_ids"][:P].tolist() == prompt and obs["attention_mask"].sum() == P and obs["action_mask"].sum() == 0
    )
    three, five = one(tok, "3"), one(tok, "5")

    obs, reward, term, trunc, info = env.step(three)  # turn 0: "3" -> " higher "
    reply = tok.encode(" higher ", add_special_tokens=False)
    L = P + 1 + len(reply)
    assert obs["input_ids"][:L].tolist() == [*prompt, three, *reply]
    assert obs["attention_mask"].tolist() == [1] * L + [0] * (24 - L)
    assert obs["action_mask"].tolist() == [0] * P + [1] + [0] * (24 - P - 1)
    assert (reward, term, trunc) == (0.25, False, False)
    assert info["env_tokens"] == len(reply) and info["turn_end"] and info["turn"] == 1
    assert info["reward_components"] == {"per_token": 0.25, "transcript_length": 0.0, "turn": 0.0}

    obs, reward, term, trunc, info = env.step(five)  # turn 1: "5" -> done, turn reward 1
    assert obs["input_ids"][: L + 1].tolist() == [*prompt, three, *reply, five]
    assert obs["action_mask"][: L + 1].tolist() == [0] * P + [1] + [0] * len(reply) + [1]
    completion = tok.decode([three, *reply, five], skip_special_tokens=True)
    assert info["completion"] == completion and info["turns"] == 2 and info["env_tokens"] == 0
    assert (term, trunc) == (True, False)
    assert reward == pytest.approx(0.25 + 1.0 + 0.1 * len(completion))
    with pytest.raises(RuntimeError, match="finished episode"):
        env.step(five)


def test_max_turns_truncates_after_scoring_the_last_turn(tok):
    calls = []

    def count(state, turn):
        calls.append((state["turn"], turn))
        return ("ok", 0.5, False)

    env = MultiTurnEnv(
        tokenizer=tok, prompts=["guess"], respond=count, max_turns=3, max_turn_tokens=2, context_length=40
    )
    env.reset(seed=0)
    x = one(tok, "3")
    rewards, ends = [], []
    for _ in range(6):
        _, r, term, trunc, info = env.step(x)
        rewards.append(r)
        ends.append((info["turn_end"], term, trunc))
    assert [t for t, _ in calls] == [0, 1, 2] and all(turn == "33" for _, turn in calls)
    assert rewards == [0.0, 0.5, 0.0, 0.5, 0.0, 0.5]
    assert ends == [(False, False, False), (True, False, False)] * 2 + [(False, False, False), (True, False, True)]


def test_turn_stop_and_eos_end_a_turn(tok):
    turns = []

    def log(state, turn):
        turns.append(turn)
        return ("go", 0.0, len(turns) == 2)

    env = MultiTurnEnv(
        tokenizer=tok, prompts=["guess"], respond=log, turn_stop="!", max_turn_tokens=8, context_length=40
    )
    env.reset(seed=0)
    for token in (one(tok, "3"), one(tok, "!")):  # the stop string ends the first turn
        _, _, term, _, info = env.step(token)
    assert info["turn_end"] and not term and turns == ["3!"]
    _, _, term, _, info = env.step(tok.eos_token_id)  # eos ends the second (the env says done)
    assert info["turn_end"] and term and turns == ["3!", ""]


def test_env_checkers_pass(tok):
    # through gymnasium.make so the checker also tries every render mode (it needs the spec for that)
    env = gymnasium.make(
        "textrl/MultiTurn-v0", tokenizer=tok, **{**GAME, "context_length": 64, "truncate_replies": True}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


def chatty(state, turn):
    """Deterministic replies of varying length (0-5 words), a turn reward, and an end after some turns."""
    h = sum(map(ord, turn)) + 7 * state["turn"]
    words = " ".join(["yes", "no", "lower"][(h + i) % 3] for i in range(h % 6))
    return (words or None, float(h % 3), h % 5 == 0)


VECTOR = {
    "prompts": ["guess", "the quick", "brown fox jumps"],
    "respond": chatty,
    "max_turns": 3,
    "max_turn_tokens": 3,
    "turn_stop": "o",
    "reply_template": " {reply}.",
    "context_length": 48,
    "truncate_replies": True,
}


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_vector_env_equals_sync_vector_env(tok, mode):
    n = 4
    ours = MultiTurnVectorEnv(n, tokenizer=tok, autoreset_mode=mode, **VECTOR)
    ref = SyncVectorEnv([lambda: MultiTurnEnv(tokenizer=tok, **VECTOR)] * n, autoreset_mode=mode)
    o1, i1 = ours.reset(seed=3)
    o2, i2 = ref.reset(seed=3)
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(60):
        a = rng.integers(0, len(tok), n)
        o1, r1, t1, u1, i1 = ours.step(a)
        o2, r2, t2, u2, i2 = ref.step(a)
        for k in o2:
            np.testing.assert_array_equal(o1[k], o2[k])
        np.testing.assert_allclose(r1, r2)
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(u1, u2)
        for key in ("env_tokens", "turn_end", "turn", "turns", "completion"):
            assert (key in i1) == (key in i2), key
            if key in i2:
                np.testing.assert_array_equal(i1["_" + key], i2["_" + key])
                np.testing.assert_array_equal(i1[key][i2["_" + key]], i2[key][i2["_" + key]])
        ends += int((t1 | u1).sum())
    assert ends >= 8


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    replies=st.lists(st.lists(st.integers(0, 299), max_size=6), min_size=1, max_size=8),
    actions=st.lists(st.integers(0, 299), min_size=1, max_size=30),
    turn_tokens=st.integers(1, 4),
)
def test_random_replies_and_stops_keep_the_masks_consistent(tok, replies, actions, turn_tokens):
    """Whatever the replies and actions: the observation is prompt + actions and replies in order, the action
    mask marks exactly the actions, and env_tokens counts exactly the replies appended."""
    said = itertools.cycle(replies)

    def respond(state, turn):
        return (next(said), 0.0, False)

    env = MultiTurnEnv(
        tokenizer=tok, prompts=["guess"], respond=respond, max_turns=50, max_turn_tokens=turn_tokens,
        turn_stop="o", context_length=64, truncate_replies=True,
    )  # fmt: skip
    obs, _ = env.reset(seed=0)
    expected, acted = list(obs["input_ids"][: obs["attention_mask"].sum()]), [0] * int(obs["attention_mask"].sum())
    for a in actions:
        obs, _, term, trunc, info = env.step(a)
        expected.append(a)
        acted.append(1)
        L = int(obs["attention_mask"].sum())
        appended = obs["input_ids"][len(expected) : L].tolist()
        assert len(appended) == info["env_tokens"]
        expected += appended
        acted += [0] * len(appended)
        assert obs["input_ids"][:L].tolist() == expected and obs["action_mask"][:L].tolist() == acted
        assert obs["action_mask"][L:].sum() == 0 and obs["attention_mask"][L:].sum() == 0
        if term or trunc:
            break


def test_bad_replies_are_clear_errors(tok):
    def make(respond, **kw):
        env = MultiTurnEnv(
            tokenizer=tok, prompts=["guess"], respond=respond, max_turn_tokens=1, context_length=24, **kw
        )
        env.reset(seed=0)
        return env

    def boom(state, turn):
        raise KeyError("no such tool")

    x = one(tok, "3")
    with pytest.raises(
        RespondError, match=r"respond 'boom' raised KeyError: 'no such tool' in the episode of prompt 0 "
    ):
        make(boom).step(x)
    env = make(boom, on_error="reply")  # the error goes back to the agent, and is counted
    obs, _, term, trunc, info = env.step(x)
    assert info["respond_errors"] == 1 and not (term or trunc)
    assert tok.decode(obs["input_ids"][: obs["attention_mask"].sum()]).endswith("Error: 'no such tool'")
    for out, match in [
        (("a", 1.0), r"a tuple of 2 items .* return \(reply, reward, done\)"),
        ("text", r"returned str .* return \(reply, reward, done\) or a Reply"),
        (("a", float("nan"), False), r"the reward nan .* finite number"),
        (("a", 0.0, "no"), r"done='no' .* need a bool"),
        (([1.5], 0.0, False), r"the reply \[1\.5\] .* text, token ids or None"),
        (([999], 0.0, False), r"token id 999, outside 0\.\.299"),
        (("the quick brown fox " * 5, 0.0, False), r"has \d+ tokens and the episode has \d+ left .* truncate_replies"),
    ]:
        with pytest.raises(RespondError, match=match):
            make(lambda state, turn, out=out: out).step(x)
    env = make(lambda state, turn: ("the quick brown fox " * 5, 0.0, False), truncate_replies=True)
    _, _, term, trunc, _ = env.step(x)
    assert trunc and not term
    with pytest.raises(ValueError, match=r"reply_template must be a string with a \{reply\} field"):
        make(guess, reply_template="no field")
    with pytest.raises(ValueError, match="max_turns must be a positive integer"):
        make(guess, max_turns=0)


# --- textrl's agents on a multi-turn env -----------------------------------------------------------------


def echo_count(state, turn):
    """A scripted user: replies with how many words the agent's turn had; the episode ends after 3 turns."""
    words = len(turn.split())
    return (f" you said {words} words.", float(words == 2), state["turn"] == 2)


@pytest.fixture(scope="module")
def dialogue_agent():
    from agents import REINFORCE, REINFORCEConfig

    env = MultiTurnEnv(lm="tiny", prompts=["ROMEO:\n", "The king"], respond=echo_count, max_turn_tokens=5)
    config = REINFORCEConfig(batch_size=4, group_size=2, kl_coef=0.1, learning_rate=1e-4)
    return REINFORCE(env, config=config, seed=0, verbose=0)


def test_rollout_reads_the_replies_and_trains_only_on_actions(dialogue_agent):
    agent = dialogue_agent
    rollout, rewards, kl = agent.collect()
    P, tok = rollout.prompt_len, agent.tokenizer
    seen = rollout.attention_mask[:, P:].bool()
    acted = rollout.action_mask
    env_positions = seen & ~acted
    assert env_positions.any() and acted.any() and not (acted & ~seen).any()
    for i in range(rollout.ids.shape[0]):  # each row: its actions, and the replies exactly as the env wrote them
        row = rollout.ids[i, P:][seen[i]].tolist()
        assert tok.decode(row) == rollout.completions[i]
        replies = [tok.decode(rollout.ids[i, P:][env_positions[i]].tolist())]
        assert "you said" in replies[0]
    for x in (rollout.logprobs, rollout.values, rollout.rewards, kl, rewards):
        assert not x[env_positions].any()
    adv, _ = agent.advantages(rollout, rewards)
    assert not adv[env_positions].any() and adv[acted].abs().sum() > 0

    # the KV-cached rollout read the replies as the whole-sequence forward does: same log-probs
    logits, _ = agent.policy.logits_and_values(rollout.ids, rollout.attention_mask, P, need_values=False)
    logp, _ = agent.logprobs_and_entropy(logits.detach(), rollout.actions)
    torch.testing.assert_close(logp[acted], rollout.logprobs[acted], atol=1e-4, rtol=0)

    # the loss has no gradient through the env positions' log-probs
    grads = {}
    original = agent.logprobs_and_entropy

    def keep(logits, actions):
        logits.retain_grad()
        grads["logits"] = logits
        return original(logits, actions)

    agent.logprobs_and_entropy = keep
    try:
        agent.train(rollout, rewards)
    finally:
        agent.logprobs_and_entropy = original
    g = grads["logits"].grad.abs().sum(-1)  # (B, T)
    assert not g[env_positions].any() and g[acted].sum() > 0


def test_agents_learn_loop_runs_on_a_multi_turn_env(dialogue_agent):
    agent = dialogue_agent
    agent.learn(200)
    assert agent.num_timesteps >= 200 and agent.iteration >= 2


def test_stock_sb3_ppo_with_textrl_policy_trains_a_multi_turn_env():
    """SB3's PPO with TransformerActorCriticPolicy: the prefix cache extends rows by the action and the reply
    after it (no recompute for a reply), and the stored log-probs and values equal the full forward's."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.sb3 import TransformerActorCriticPolicy

    kwargs = {"lm": "tiny", "prompts": ["ROMEO:\n", "The king"], "respond": echo_count, "max_turn_tokens": 3}
    venv = DummyVecEnv([lambda: MultiTurnEnv(**kwargs)] * 2)
    venv.seed(0)
    model = PPO(
        TransformerActorCriticPolicy, venv, n_steps=12, batch_size=12, n_epochs=1, seed=0, verbose=0,
        policy_kwargs={"lm": "tiny"},
    )  # fmt: skip
    policy = model.policy
    # non-zero values (the value net starts at zero) of unit scale, as a trained head gives: weights of std 1 would
    # scale the hidden state's float32 rounding (decode kernels against the full forward) by sqrt(width)
    width = policy.value_net.weight.shape[1]
    torch.nn.init.normal_(policy.value_net.weight.data, std=width**-0.5)
    _, callback = model._setup_learn(24, callback=None)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, 12)
    buffer = model.rollout_buffer
    lengths = buffer.observations["attention_mask"].sum(-1)  # (steps, envs)
    assert (np.diff(lengths, axis=0) > 1).any()  # some steps grew a row by a reply, not one token
    stats = policy.cache_stats
    assert stats["extended"] >= 20 and stats["recomputed"] <= 4  # the first observations, and resets
    obs = {k: torch.as_tensor(v.reshape(24, *v.shape[2:])) for k, v in buffer.observations.items()}
    actions = torch.as_tensor(buffer.actions.reshape(24)).long()
    values, logp, _ = policy.evaluate_actions(obs, actions)  # with gradients: the full, uncached forward
    torch.testing.assert_close(logp.detach().numpy(), buffer.log_probs.reshape(24), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values.detach().numpy().ravel(), buffer.values.reshape(24), atol=1e-5, rtol=1e-5)
    model.learn(24, reset_num_timesteps=False)  # and it trains


def test_guess_number_game_rules_and_registration():
    from envs.guess import guess_reply

    state = {"secret": 7, "turn": 0}
    assert guess_reply(state, " seven") == Reply(None, 1.1, True)
    assert guess_reply(state, " Three of") == Reply("Higher.", 0.1, False)
    assert guess_reply(state, " 9") == Reply("Lower.", 0.1, False)
    assert guess_reply(state, " someone") == Reply("Say a number.", 0.0, False)  # "one" inside a word: no guess
    env = gymnasium.make("textrl/GuessNumber-v0", high=3)
    assert env.spec.reward_threshold == 1.0
    env.reset(seed=0)
    secret = env.unwrapped.engine.state[0]["secret"]
    tok = env.unwrapped.tokenizer
    for token in tok.encode(" " + ["one", "two", "three"][secret - 1] + "\n", add_special_tokens=False)[:3]:
        _, reward, term, _, info = env.step(token)
        if term:
            break
    assert term and reward == pytest.approx(1.1) and info["turns"] == 1
    venv = gymnasium.make_vec("textrl/GuessNumber-v0", num_envs=3, vectorization_mode="vector_entry_point", high=3)
    assert venv.num_envs == 3 and venv.max_new_tokens > 0


def test_say_word_user_answers_what_the_agent_said():
    from envs.scripted import user_reply

    state = {"words": ["love", "king"]}
    assert user_reply(state, " I know") == Reply("No. Say: love.", 0.0, False)  # not said: the same request
    assert user_reply(state, " my Love") == Reply("Good. Say: king.", 1.0, False)  # said: the next word
    assert user_reply(state, " kingdom") == Reply("No. Say: king.", 0.0, False)  # a whole word only
    assert user_reply(state, " the king") == Reply(None, 1.0, True)
    env = gymnasium.make("textrl/SayWord-v0", n_prompts=4)
    assert env.spec.reward_threshold == 1.5
    obs, _ = env.reset(seed=0)
    tok = env.unwrapped.tokenizer
    words = env.unwrapped.engine.state[0]["words"]
    assert tok.decode(obs["input_ids"][: obs["attention_mask"].sum()]) == f"Say: {words[0]}.\n"
    total = 0.0
    for word in words:
        for token in tok.encode(f" {word}\n", add_special_tokens=False):
            _, reward, term, _, info = env.step(token)
            total += reward
            if info["turn_end"]:
                break
    assert term and total == 2.0


CHAT = (
    "{% for m in messages %}<|pad|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|pad|>assistant\n{% endif %}"
)
"""A ChatML-like template on the test tokenizer's two special tokens: ``<|pad|>`` opens a message, the eos closes it."""


@pytest.fixture
def chat_tok(tok):
    import copy

    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT
    return chat


def test_chat_template_renders_the_conversation(chat_tok):
    """With chat=True the observation is exactly the chat template's rendering of the conversation so far: the
    prompt as a user message, the agent's turns as assistant messages, the replies as messages of the role
    asked for; the closing eos is the agent's token when it sampled it, the env's when the turn hit its limit."""
    tok = chat_tok
    eos, three = tok.eos_token_id, one(tok, "3")
    env = MultiTurnEnv(
        tokenizer=tok,
        prompts=["guess"],
        respond=lambda state, turn: Reply("lower" if state["turn"] == 0 else "higher"),
        chat="tool",
        max_turns=3,
        max_turn_tokens=2,
        context_length=128,
    )

    def rendered(ids) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    messages = [{"role": "user", "content": "guess"}]
    obs, _ = env.reset(seed=0)
    P = int(obs["attention_mask"].sum())
    assert rendered(obs["input_ids"][:P]) == tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert obs["input_ids"][:P].tolist() == tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]

    env.step(three)
    obs, _, _, _, info = env.step(eos)  # turn 0 ends at the agent's own eos
    messages += [{"role": "assistant", "content": "3"}, {"role": "tool", "content": "lower"}]
    L = int(obs["attention_mask"].sum())
    assert rendered(obs["input_ids"][:L]) == tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert obs["action_mask"][P : P + 2].tolist() == [1, 1] and obs["action_mask"][P + 2 : L].sum() == 0
    assert info["env_tokens"] == L - P - 2

    env.step(three)
    obs, _, _, _, info = env.step(three)  # turn 1 hits max_turn_tokens: the env closes it with the eos
    messages += [{"role": "assistant", "content": "33"}, {"role": "tool", "content": "higher"}]
    end = int(obs["attention_mask"].sum())
    assert rendered(obs["input_ids"][:end]) == tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert obs["input_ids"][L + 2] == eos and obs["action_mask"][L + 2] == 0  # the closing eos is an env token
    assert info["env_tokens"] == end - L - 2


def test_chat_needs_a_template_and_its_own_replies(tok, chat_tok):
    with pytest.raises(ValueError, match="has none"):
        MultiTurnEnv(tokenizer=tok, prompts=["guess"], respond=guess, chat=True, context_length=64)
    with pytest.raises(ValueError, match="leave reply_template out"):
        MultiTurnEnv(
            tokenizer=chat_tok,
            prompts=["guess"],
            respond=guess,
            chat=True,
            reply_template="> {reply}",
            context_length=64,
        )
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "guess"}], "secret": 3}
    ]
    env = MultiTurnEnv(tokenizer=chat_tok, prompts=rows, respond=guess, chat=True, context_length=128)
    obs, _ = env.reset(seed=0)
    P = int(obs["attention_mask"].sum())
    assert chat_tok.decode(obs["input_ids"][:P]) == chat_tok.apply_chat_template(
        rows[0]["messages"], add_generation_prompt=True, tokenize=False
    )
