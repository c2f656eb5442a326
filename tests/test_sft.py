"""textrl.sft: exact tokens and labels on hand-built rows, then short real runs on a learnable demo set
(learning, output folder, LoRA merge, exact resume), the data errors, and `textrl sft` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPT2Config, GPT2LMHeadModel

import textrl.sft as sft_module
from agents.cli import main
from textrl.jsonl import DataError
from textrl.lm import load_lm, load_tokenizer
from textrl.sft import (
    IGNORE,
    SFTConfig,
    collate,
    encode_messages,
    encode_prompt_completion,
    evaluate,
    load_examples,
    sft,
    split_examples,
    token_loss,
)

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
"""A chat template for the tiny tokenizer (which has none); assistant turns end with the eos token."""

COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


def _demos() -> list[dict]:
    """Learnable rows: the colour of a thing, asked three ways."""
    asks = ["Q: colour of {}?", "Q: what colour is the {}?", "Q: the {} is which colour?"]
    return [
        {"prompt": a.format(k), "completion": f" A: {v}", "ask": i}
        for i, a in enumerate(asks)
        for k, v in COLOURS.items()
    ]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory, tok) -> Path:
    """A random 1-layer, width-32 GPT-2 with the tiny tokenizer and dropout (so resuming must restore the RNG)."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("small-lm")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("data") / "demos.jsonl", _demos())


def _cfg(tmp_path: Path, lm, data, **kw) -> SFTConfig:
    base = dict(
        lm=str(lm), data=str(data), out=str(tmp_path / "out"), run_dir=str(tmp_path / "runs"), batch_size=6,
        lr=1e-2, min_lr=1e-3, warmup_steps=2, steps=6, eval_interval=3, save_interval=0, heldout_fraction=0.2,
        threads=1, device="cpu", progress=False,
    )  # fmt: skip
    return SFTConfig(**(base | kw))


def _logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_lm(folder)
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- tokens and labels, exact -------------------------------------------------------------------------------


def test_prompt_completion_ids_and_labels_are_exact(tok):
    ids, labels = encode_prompt_completion(tok, "Q: colour?", " A: blue")
    prompt = tok("Q: colour?")["input_ids"]
    answer = tok(" A: blue", add_special_tokens=False)["input_ids"]
    assert ids == [*prompt, *answer, tok.eos_token_id]
    assert labels == [IGNORE] * len(prompt) + [*answer, tok.eos_token_id]
    assert tok.decode(ids[len(prompt) :]) == " A: blue<|endoftext|>"
    # an empty prompt starts from the bos token, as a generation prompt does
    ids, labels = encode_prompt_completion(tok, "", "hi")
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE and labels[1:] == ids[1:]


def test_the_loss_scores_completion_tokens_only(tok):
    rows = [encode_prompt_completion(tok, "Q: colour of the sky?", " A: blue"), encode_prompt_completion(tok, "x", "y")]
    batch = collate([sft_module.Example(i, lab, n) for n, (i, lab) in enumerate(rows)], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(rows[0][0]))
    assert batch["attention_mask"][1].tolist() == [1] * len(rows[1][0]) + [0] * (len(rows[0][0]) - len(rows[1][0]))
    assert (batch["labels"][1, len(rows[1][0]) :] == IGNORE).all()  # right padding is never scored
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, len(tok))
    total, count = token_loss(logits, batch["labels"])
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(batch["labels"].shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target != IGNORE:
                expected -= torch.log_softmax(logits[b, t], -1)[target].item()
                n += 1
    assert count == n == sum(sum(lab != IGNORE for lab in labels[1:]) for _, labels in rows)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    # the logits that predict prompt tokens or padding can be anything: the loss does not change
    changed = logits.clone()
    unscored = torch.nn.functional.pad(batch["labels"][:, 1:] == IGNORE, (0, 1), value=True)
    changed[unscored] = torch.randn(int(unscored.sum()), len(tok)) * 100
    assert torch.equal(token_loss(changed, batch["labels"])[0], total)


def test_messages_score_assistant_turns_only(tok):
    tok = load_tokenizer("tiny")
    tok.chat_template = TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "sky?"},
        {"role": "assistant", "content": " blue"},
        {"role": "user", "content": "grass?"},
        {"role": "assistant", "content": " green"},
    ]
    ids, labels = encode_messages(tok, messages)

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    context_1, reply_1 = enc("<system>Be brief.<user>sky?<assistant>"), enc(" blue<|endoftext|>")
    context_2, reply_2 = enc("<user>grass?<assistant>"), enc(" green<|endoftext|>")
    assert ids == context_1 + reply_1 + context_2 + reply_2
    assert reply_1[-1] == reply_2[-1] == tok.eos_token_id  # the template's turn end is scored too
    a, b = len(context_1), len(context_1) + len(reply_1)
    c = b + len(context_2)
    expected = [IGNORE] * a + reply_1 + [IGNORE] * len(context_2) + reply_2
    assert labels == expected
    scored = [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert scored == [*range(a, b), *range(c, len(ids))]
    assert tok.decode([ids[i] for i in scored]) == " blue<|endoftext|> green<|endoftext|>"


def test_a_template_whose_prefixes_differ_is_a_data_error(tmp_path, tok):
    tok = load_tokenizer("tiny")
    tok.chat_template = "[{{ messages | length }}]" + TEMPLATE  # the header changes as the conversation grows
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data = _write(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=r"d\.jsonl, line 1: the chat template renders the conversation before"):
        load_examples(data, tok, 64)


# --- data errors ---------------------------------------------------------------------------------------------


def test_data_errors_name_the_line(tmp_path, tok):
    good = {"prompt": "a", "completion": "b"}
    cases = [
        ([good, "{not json"], r"line 2: not valid JSON"),
        ([good, good, {"prompt": "a"}], r"line 3: missing field 'completion'"),
        ([{"prompt": "a", "completion": 3}], r"line 1: field 'completion' must be a str, got int"),
        ([good, {"text": "a"}], r"line 2: expected 'prompt' and 'completion' strings or a 'messages' list"),
        ([{"messages": "hi"}], r"line 1: field 'messages' must be a list, got str"),
        ([{"messages": [{"role": "user"}]}], r"line 1: messages\[0\] has no 'content'"),
        ([good, {"messages": [{"role": "assistant", "content": "b"}]}], r"line 2: .*--chat-template FILE"),
    ]
    for rows, message in cases:
        with pytest.raises(DataError, match=message):
            load_examples(_write(tmp_path / "d.jsonl", rows), tok, 64)
    examples = load_examples(_write(tmp_path / "d.jsonl", [good, "", {**good, "extra": [1]}]), tok, 64)
    assert [e.line for e in examples] == [1, 3]  # blank lines skipped, extra fields ignored


def test_an_over_long_demonstration_errors_or_is_truncated(tmp_path, tok):
    rows = [{"prompt": "Q: sky?", "completion": " A: blue"}, {"prompt": "Q: a?", "completion": " the sky is blue " * 5}]
    data = _write(tmp_path / "d.jsonl", rows)
    n = len(encode_prompt_completion(tok, rows[1]["prompt"], rows[1]["completion"])[0])
    with pytest.raises(DataError, match=rf"d\.jsonl, line 2: the demonstration is {n} tokens, more than max_length 12"):
        load_examples(data, tok, 12)
    short, cut = load_examples(data, tok, 12, truncate=True)
    assert not short.truncated and cut.truncated and len(cut.ids) == len(cut.labels) == 12
    assert cut.ids == encode_prompt_completion(tok, rows[1]["prompt"], rows[1]["completion"])[0][:12]
    # a prompt that fills max_length leaves nothing to learn, even truncated
    with pytest.raises(DataError, match=r"line 1: no completion or assistant token to learn from after truncation"):
        load_examples(data, tok, 3, truncate=True)


def test_split_is_seeded_and_keeps_a_training_row(tok, demo_file):
    examples = load_examples(demo_file, tok, 64)
    train, held = split_examples(examples, 0.2, seed=3)
    assert len(held) == round(0.2 * len(examples)) and len(train) + len(held) == len(examples)
    assert [e.line for e in held] == [e.line for e in split_examples(examples, 0.2, seed=3)[1]]
    with pytest.raises(DataError, match="too few to hold out"):
        split_examples(examples[:1], 0.1, 0)


# --- real runs ---------------------------------------------------------------------------------------------


def test_sft_learns_and_writes_a_loadable_model(tmp_path, small_lm, demo_file, tok):
    summary = sft(_cfg(tmp_path, small_lm, demo_file, steps=30, eval_interval=10, save_interval=30))
    assert summary["steps"] == 30 and summary["rows"] == {"train": 14, "heldout": 4} and summary["truncated"] == 0
    assert summary["heldout_loss_after"] < 0.6 * summary["heldout_loss_before"]
    assert [s for s, _ in summary["eval_history"]] == [0, 10, 20, 30]
    (run,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "charts/learning_rate", "charts/tokens_per_second"} <= tags
    train_loss = [e.value for e in events.Scalars("train/loss")]
    assert len(train_loss) == 30 and sum(train_loss[-5:]) < 0.5 * sum(train_loss[:5])
    # the output folder is the trained model: same logits as the last checkpoint, same held-out loss
    out = tmp_path / "out"
    assert {"model.safetensors", "config.json", "tokenizer.json", "training_summary.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    ids = torch.tensor([encode_prompt_completion(tok, "Q: colour of sky?", " A: blue")[0]])
    assert torch.equal(_logits(out, ids), _logits(run, ids))  # load_lm(run) = its newest checkpoint's policy
    model, tokenizer = load_lm(out)
    heldout = split_examples(load_examples(demo_file, tokenizer, 64), 0.2, 0)[1]
    assert evaluate(model, heldout, 6, tokenizer.pad_token_id) == pytest.approx(summary["heldout_loss_after"], rel=1e-5)
    assert "| held-out loss |" in (out / "README.md").read_text()
    assert json.loads((out / "training_summary.json").read_text())["tokens"] == summary["tokens"] > 0


def test_messages_run_keeps_the_chat_template(tmp_path, small_lm):
    rows = [
        {"messages": [{"role": "user", "content": f"{k}?"}, {"role": "assistant", "content": f" {v}"}]}
        for k, v in COLOURS.items()
    ]
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    data = _write(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: .*--chat-template"):
        sft(_cfg(tmp_path, small_lm, data, steps=1))
    summary = sft(_cfg(tmp_path, small_lm, data, steps=3, chat_template=str(template)))
    assert summary["chat_template"] and summary["heldout_loss_after"] is not None
    assert load_lm(tmp_path / "out")[1].chat_template == TEMPLATE


def test_lora_run_writes_a_merged_model_and_the_adapters(tmp_path, small_lm, demo_file, tok):
    summary = sft(_cfg(tmp_path, small_lm, demo_file, lora_rank=4, lora_alpha=8.0, steps=5, lr=3e-2))
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        small_lm.resolve()
    )
    assert summary["lora"]["rank"] == 4 and summary["trainable_parameters"] < summary["parameters"]
    merged, _ = load_lm(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain model
    ids = torch.tensor([encode_prompt_completion(tok, "Q: colour of snow?", " A: white")[0]])
    merged_logits, adapter_logits = _logits(out, ids), _logits(out / "adapter", ids)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=0)
    assert (merged_logits - _logits(small_lm, ids)).abs().max() > 1e-3  # the adapters did change the model


class _Stop(Exception):
    pass


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_is_exact(tmp_path, small_lm, demo_file, monkeypatch, lora_rank):
    # 3 examples a step over 14 training rows: batches straddle epochs; warm-up and cosine decay both act
    settings = dict(steps=8, batch_size=3, save_interval=4, eval_interval=3, lora_rank=lora_rank, lora_alpha=8.0)
    whole = sft(_cfg(tmp_path / "whole", small_lm, demo_file, **settings))

    save = sft_module.save_checkpoint

    def save_then_die(run, step, *args):
        path = save(run, step, *args)
        if step == 4:
            raise _Stop  # the process dies right after the checkpoint of step 4
        return path

    monkeypatch.setattr(sft_module, "save_checkpoint", save_then_die)
    with pytest.raises(_Stop):
        sft(_cfg(tmp_path / "parts", small_lm, demo_file, **settings))
    monkeypatch.undo()
    (run,) = (tmp_path / "parts" / "runs").iterdir()
    with pytest.raises(ValueError, match=r"resume: lr is 0\.01 in the run .* cannot change"):
        sft(SFTConfig(resume=str(run), lr=0.5))
    resumed = sft(SFTConfig(resume=str(run), out=str(tmp_path / "parts" / "out")))

    a, _ = load_lm(tmp_path / "whole" / "out")
    b, _ = load_lm(tmp_path / "parts" / "out")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert resumed["eval_history"] == whole["eval_history"]
    assert resumed["tokens"] == whole["tokens"] and resumed["run"] == str(run)


def test_a_non_finite_loss_names_the_step(tmp_path, small_lm, demo_file, monkeypatch):
    real = sft_module.token_loss
    calls = []

    def poisoned(logits, labels):
        total, count = real(logits, labels)
        calls.append(1)
        return (total * float("nan"), count) if len(calls) == 2 else (total, count)  # no held-out set: step 2

    monkeypatch.setattr(sft_module, "token_loss", poisoned)
    with pytest.raises(FloatingPointError, match="at step 2"):
        sft(_cfg(tmp_path, small_lm, demo_file, heldout_fraction=0.0))


# --- command line --------------------------------------------------------------------------------------------


def test_cli_sft(tmp_path, demo_file, capsys):
    out, runs = tmp_path / "model", tmp_path / "runs"
    argv = ["sft", "--lm", "tiny", "--data", str(demo_file), "--out", str(out), "--steps", "3"]
    assert main([*argv, "--run-dir", str(runs), "--progress", "false", "--threads", "1", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    summary = json.loads((out / "training_summary.json").read_text())
    assert f"held-out loss {summary['heldout_loss_before']:.3f} -> {summary['heldout_loss_after']:.3f}" in stdout
    assert f"model saved to {out}" in stdout and str(runs) in stdout
    assert summary["steps"] == 3 and load_lm(out)[0].config.n_layer == 4

    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    assert main(["sft", "--data", str(bad), "--out", str(tmp_path / "m2"), "--run-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textrl sft: error: ") and "bad.jsonl, line 2: missing field 'completion'" in err
    assert err.count("\n") == 1 and not (tmp_path / "m2").exists()
