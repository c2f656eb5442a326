"""textrl.reward_model: a reward model trained on a separable toy preference set, then loaded as a reward.

Every model here is a randomly initialised one-layer, width-32 GPT-2 on the shared 300-token test tokenizer,
so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

from agents.cli import main
from textrl import LMNotFoundError
from textrl.jsonl import DataError
from textrl.reward_model import (
    NotARewardModelError,
    RewardModel,
    RewardTrainConfig,
    read_pairs,
    reward_model,
    reward_train,
)
from textrl.reward_set import RewardSet

GOOD = ["good", "kind", "happy"]
BAD = ["bad", "cruel", "awful"]
NOUNS = ["king", "queen", "knight", "horse", "river", "garden"]
TEMPLATES = [
    " the {n} is {w}.",
    " a {w} {n} came by the river.",
    " my {n} was {w} today.",
    " such a {w} day for a {n}.",
]
PROMPTS = ["The story:", "Then", ""]


def toy_pairs(n: int, seed: int) -> list[dict]:
    """Pairs whose chosen sentence has a kind word and whose rejected one has an unkind word; the two sentences
    are drawn independently (template, noun), so the word is the only thing that tells them apart."""
    rng = random.Random(seed)

    def sentence(words: list[str]) -> str:
        return rng.choice(TEMPLATES).format(n=rng.choice(NOUNS), w=rng.choice(words))

    return [{"prompt": rng.choice(PROMPTS), "chosen": sentence(GOOD), "rejected": sentence(BAD)} for _ in range(n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def gpt2_config(tokenizer, **kwargs) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer) -> Path:
    """A random one-layer GPT-2 causal LM folder: what reward-train starts from."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lm")
    GPT2LMHeadModel(gpt2_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pairs")
    return write_jsonl(folder / "train.jsonl", toy_pairs(160, 0)), write_jsonl(
        folder / "heldout.jsonl", toy_pairs(40, 1)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lm_dir, data) -> tuple[dict, Path]:
    """One short training run (a fraction of a second), shared by the tests that read its output."""
    folder = tmp_path_factory.mktemp("rm")
    cfg = RewardTrainConfig(
        lm=str(lm_dir),
        data=str(data[0]),
        heldout_data=str(data[1]),
        out=str(folder / "rm"),
        run_dir=str(folder / "runs"),
        epochs=4,
        batch_size=16,
        lr=3e-3,
        eval_interval=20,
        progress=False,
    )
    return reward_train(cfg), folder / "rm"


# --- training ---------------------------------------------------------------------------------------------


def test_reward_train_learns_the_preference(trained):
    s, out = trained
    assert s["pairs"] == {"train": 160, "heldout": 40} and s["steps"] == 40
    assert 0.2 <= s["heldout_accuracy_before"] <= 0.8  # a fresh score head: about chance
    assert s["heldout_accuracy_after"] >= 0.9
    assert s["heldout_loss_after"] < s["heldout_loss_before"] - 0.3
    assert [step for step, _, _ in s["eval_history"]] == [0, 20, 40]
    assert json.loads((out / "training_summary.json").read_text()) == json.loads(json.dumps(s))
    card = (out / "README.md").read_text()
    assert f"{s['heldout_accuracy_before']:.3f} before -> {s['heldout_accuracy_after']:.3f} after" in card
    tags = set()
    for events in Path(s["run"]).glob("events.out.tfevents.*"):  # add_hparams writes a file of its own
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"eval/accuracy", "eval/loss", "train/loss", "train/accuracy", "charts/learning_rate"} <= set(tags)
    assert json.loads((Path(s["run"]) / "config.json").read_text())["lr"] == 3e-3


def test_out_folder_is_a_plain_transformers_model(trained, data):
    s, out = trained
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()  # transformers alone
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    reward = reward_model(out, device="cpu")
    text = "The story: the king is kind."
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()
    assert reward.score([text])[0] == pytest.approx(expected, abs=1e-5)

    # the held-out figures recomputed through the reward equal the trained model's own
    pairs = read_pairs(data[1])
    r_chosen, r_rejected = (torch.tensor(reward.score([p[i] for p in pairs])) for i in (0, 1))
    assert (r_chosen > r_rejected).float().mean().item() == pytest.approx(s["heldout_accuracy_after"], abs=1e-6)
    loss = -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean().item()
    assert loss == pytest.approx(s["heldout_loss_after"], abs=1e-5)


def test_split_from_one_file_and_steps(tmp_path, lm_dir, data):
    cfg = RewardTrainConfig(
        lm=str(lm_dir), data=str(data[0]), heldout_fraction=0.25, out=str(tmp_path / "rm"),
        run_dir=str(tmp_path / "runs"), steps=3, batch_size=4, eval_interval=0, progress=False,
    )  # fmt: skip
    s = reward_train(cfg)
    assert s["pairs"] == {"train": 120, "heldout": 40} and s["steps"] == 3
    assert [step for step, _, _ in s["eval_history"]] == [0, 3]
    s = reward_train(dataclass_replace(cfg, heldout_fraction=0.0, out=str(tmp_path / "rm2")))
    assert s["heldout_accuracy_before"] is None and s["eval_history"] == [] and math.isfinite(s["last_train_loss"])


def dataclass_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_pairs_cut_to_the_same_tokens_warn(tmp_path, lm_dir):
    rows = [{"chosen": "good and then the same long tail", "rejected": "bad and then the same long tail"}] * 4
    cfg = RewardTrainConfig(
        lm=str(lm_dir), data=str(write_jsonl(tmp_path / "d.jsonl", rows)), heldout_fraction=0.0, max_length=3,
        out=str(tmp_path / "rm"), run_dir=str(tmp_path / "runs"), steps=1, progress=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="4 of 4 training pairs are identical once cut to 3 tokens"):
        reward_train(cfg)


# --- the reward -------------------------------------------------------------------------------------------


def test_batched_scores_equal_one_at_a_time(trained):
    _, out = trained
    texts = ["a", "", "the king is good and the queen is kind by the river today.", "cruel", "Hello, world!" * 3]
    batched = reward_model(out, batch_size=8).score(texts)
    single = reward_model(out, batch_size=1).score(texts)
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(batched)) == len(texts)  # padding did not collapse the rows onto one token


def test_long_texts_keep_their_end(trained):
    _, out = trained
    reward = reward_model(out, max_length=8)
    text = "the queen is awful. " * 10 + "the king is happy."
    ids = reward.tokenizer(text)["input_ids"]
    assert len(ids) > 8
    with torch.no_grad():
        tail = reward.model(input_ids=torch.tensor([ids[-8:]])).logits[0, 0].item()
    assert reward.score([text])[0] == pytest.approx(tail, abs=1e-5)
    assert reward_model(out).max_length == 64  # default: the model's context
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        reward_model(out, max_length=65)


def test_reward_set_calls_it_like_any_reward(trained):
    _, out = trained
    reward = reward_model(out, device="cpu")
    rs = RewardSet({reward: 2.0, "length_penalty": 1.0})
    assert rs.names == ["reward_model", "length_penalty"]
    prompts, completions = ["Then", "Then"], [" my king was kind today.", " my king was cruel today."]
    total, parts = rs.sequence(prompts, completions, [[1, 2], [3, 4]], {"reference": ["x", "y"]})
    direct = reward(prompts=prompts, completions=completions, completion_ids=[[1, 2], [3, 4]])
    assert parts["reward_model"].tolist() == pytest.approx(direct)
    assert total.tolist() == pytest.approx([2 * d for d in direct])
    assert direct[0] > direct[1]  # it learned which is kinder


def test_named_by_its_folder_where_a_reward_name_goes(trained):
    """``"reward_model:FOLDER"`` works wherever a built-in reward's name does (e.g. ``--env-kwargs`` of
    ``textrl train``)."""
    _, out = trained
    rs = RewardSet({f"reward_model:{out}": 1.0})
    completions = [" my king was kind today.", " my king was cruel today."]
    total, _ = rs.sequence(["Then", "Then"], completions, [[1], [2]], {})
    assert total.tolist() == pytest.approx(reward_model(out)(prompts=["Then", "Then"], completions=completions))
    with pytest.raises(ValueError, match="reward_model:FOLDER for a learned one"):
        RewardSet("no_such_reward")


def test_exported_from_textrl_rewards(trained):
    import textrl.reward_model
    import textrl.rewards

    assert textrl.rewards.reward_model is textrl.reward_model.reward_model
    assert textrl.rewards.RewardModel is RewardModel
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = textrl.rewards.nothing_here


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = gpt2_config(tokenizer, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp("three")
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_several_labels_need_a_choice(three_labels):
    with pytest.raises(ValueError, match=r"3 labels \(0='negative', 1='neutral', 2='positive'\).*label="):
        reward_model(three_labels)
    with pytest.raises(ValueError, match=r"'happy' is not one of .*2='positive'"):
        reward_model(three_labels, label="happy")
    with pytest.raises(ValueError, match="label 3 is not one of"):
        reward_model(three_labels, label=3)

    model = GPT2ForSequenceClassification.from_pretrained(three_labels).eval()
    tokenizer = AutoTokenizer.from_pretrained(three_labels)
    texts = ["the king is good", "a cruel day"]
    with torch.no_grad():
        logits = torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0] for t in texts])
    assert reward_model(three_labels, label="positive")(prompts=["", ""], completions=texts) == pytest.approx(
        logits[:, 2].tolist(), abs=1e-5
    )
    assert reward_model(three_labels, label=0).score(texts) == pytest.approx(logits[:, 0].tolist(), abs=1e-5)
    probs = reward_model(three_labels, label="neutral", normalize="softmax").score(texts)
    assert probs == pytest.approx(logits.softmax(-1)[:, 1].tolist(), abs=1e-6)


# --- errors -----------------------------------------------------------------------------------------------


def test_a_causal_lm_folder_is_named(lm_dir):
    with pytest.raises(NotARewardModelError, match=r"'gpt2' causal language model \(GPT2LMHeadModel\).*reward-train"):
        reward_model(lm_dir)
    with pytest.raises(NotARewardModelError, match="causal language model"):
        reward_model("tiny")


def test_other_models_and_missing_folders(bert_dir, tmp_path):
    with pytest.raises(NotARewardModelError, match=r"'bert' model \(BertModel\), not a sequence-classification"):
        reward_model(bert_dir)
    with pytest.raises(LMNotFoundError, match="not found"):
        reward_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        reward_model(bert_dir, device="gpu")


def test_a_folder_without_a_trained_head_is_refused(lm_dir, tmp_path):
    """A config that names no architecture loads as a classifier only if the head's weights are there."""
    for path in lm_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((lm_dir / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotARewardModelError, match=r"lacks weights for score\.weight.*without a trained"):
        reward_model(tmp_path)


def test_pickled_weights_are_never_loaded(three_labels, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((three_labels / name).read_bytes())
    model = GPT2ForSequenceClassification.from_pretrained(three_labels)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(LMNotFoundError, match=r"never loads pickled \.bin"):
        reward_model(folder, label=0)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"chosen": "a", "rejected": "b"}', '{"chosen": "a", "rejected": '], "line 2: not valid JSON"),
        ([{"chosen": "a", "rejected": "b"}, {"chosen": "a"}], "line 2: missing field 'rejected'"),
        ([{"chosen": "a", "rejected": 3}], "line 1: field 'rejected' must be a str, got int"),
        ([{"prompt": 1, "chosen": "a", "rejected": "b"}], "line 1: field 'prompt' must be a str"),
        ([{"chosen": "a", "rejected": "b"}, {"prompt": "same", "chosen": "", "rejected": ""}], "line 2: chosen and"),
        (['{"chosen": "a", "rejected": "b"}', "", '["a", "b"]'], "line 3: expected a JSON object, got list"),
    ],
)
def test_data_errors_name_the_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        reward_train(RewardTrainConfig(data=str(path), out=str(tmp_path / "rm"), progress=False))
    assert not (tmp_path / "rm").exists()  # the data is checked before anything loads or is written


# --- command line -----------------------------------------------------------------------------------------


def test_cli_reward_train(tmp_path, lm_dir, data, capsys):
    out, runs = tmp_path / "rm", tmp_path / "runs"
    argv = [
        "reward-train", "--lm", str(lm_dir), "--data", str(data[0]), "--out", str(out), "--run-dir", str(runs),
        "--epochs", "1", "--batch-size", "16", "--lr", "3e-3", "--heldout-fraction", "0.2", "--progress", "false",
    ]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    s = json.loads((out / "training_summary.json").read_text())
    assert f"held-out pair accuracy {s['heldout_accuracy_before']:.3f} -> {s['heldout_accuracy_after']:.3f}" in stdout
    assert f"reward model saved to {out}" in stdout
    assert s["pairs"] == {"train": 128, "heldout": 32}
    assert isinstance(reward_model(out), RewardModel)


def test_cli_reward_train_errors(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "same", "rejected": "same"}])
    assert main(["reward-train", "--data", str(bad), "--out", str(tmp_path / "rm")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textrl reward-train: error:") and "line 1: chosen and rejected are identical" in err
    assert main(["reward-train", "--out", str(tmp_path / "rm")]) == 2
    assert "--data is required" in capsys.readouterr().err
