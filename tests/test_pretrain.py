"""textrl.pretrain: the maths on hand-built inputs, then a short real run on a learnable toy corpus."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from textrl import generate, load_lm
from textrl.config import to_jsonable
from textrl.corpus import CorpusError, file_documents, split_documents
from textrl.pretrain import (
    EOS,
    PAD,
    PretrainConfig,
    active_parameters,
    build_model,
    encode_stream,
    evaluate,
    expert_size,
    heldout_windows,
    lr_at,
    pretrain,
    train_tokenizer,
    unigram_loss,
)

# --- pieces, known answers --------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tokenizer):
    assert (tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)) == (0, 1)
    assert tokenizer.eos_token == tokenizer.bos_token == EOS and tokenizer.pad_token == PAD
    assert len(tokenizer.backend_tokenizer.get_vocab()) == 300  # 256 bytes + 2 special + merges
    text = "The gentle queen finds the old sword."
    ids = tokenizer(text).input_ids
    assert len(ids) < len(text.encode())  # merges were learned
    assert tokenizer.decode(ids) == text


def test_train_tokenizer_is_deterministic():
    docs = ["the cat sat on the mat"] * 5 + ["a dog, a log"] * 3
    a, b = train_tokenizer(docs, 270), train_tokenizer(docs, 270)
    assert a.get_vocab() == b.get_vocab()


def test_encode_stream_ends_documents_with_eos(tokenizer):
    stream = encode_stream(tokenizer, ["ab", "c"])
    ids_ab = tokenizer("ab", add_special_tokens=False).input_ids
    ids_c = tokenizer("c", add_special_tokens=False).input_ids
    assert stream.tolist() == [*ids_ab, 0, *ids_c, 0]
    assert stream.dtype == np.uint16


def test_encode_stream_is_never_padded():
    tok = train_tokenizer(["a bb ccc dddd"] * 3, 262)
    docs = ["a", "bb ccc dddd"]
    expected = encode_stream(tok, docs).tolist()
    tok(docs, padding=True)  # as generate() does: leaves padding switched on in the backend tokenizer
    assert encode_stream(tok, docs).tolist() == expected
    assert PAD not in tok.convert_ids_to_tokens(expected)


def test_heldout_windows():
    stream = np.arange(10, dtype=np.uint16)
    w = heldout_windows(stream, context_length=3, limit=100)
    assert w.dtype == torch.int64
    assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]  # non-overlapping targets
    assert heldout_windows(stream, 3, limit=2).shape == (2, 4)
    with pytest.raises(CorpusError, match="fewer than one context window"):
        heldout_windows(stream, context_length=10, limit=100)


def test_unigram_loss():
    train = np.array([0, 0, 1, 2], dtype=np.uint16)  # add-one counts over vocab 4: 3, 2, 2, 1 of 8
    windows = torch.tensor([[9, 0, 3]])  # targets 0 and 3
    expected = -(math.log(3 / 8) + math.log(1 / 8)) / 2
    assert unigram_loss(train, windows, vocab_size=4) == pytest.approx(expected)


def test_lr_schedule():
    cfg = PretrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # warm-up ends at the peak
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_evaluate_uniform_model_scores_log_vocab(tokenizer):
    model = build_model(PretrainConfig(n_layer=1, n_embd=16, n_head=2, context_length=8), tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()  # tied to the output layer: all logits are 0
    model.train()
    windows = torch.randint(0, len(tokenizer), (5, 9))
    assert evaluate(model, windows, batch_size=2) == pytest.approx(math.log(len(tokenizer)), rel=1e-5)
    assert model.training  # restored


def test_build_model(tokenizer):
    model = build_model(PretrainConfig(n_layer=1, n_embd=16, n_head=4, context_length=8), tokenizer)
    assert model.config.vocab_size == len(tokenizer) and model.config.n_positions == 8
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert (model.config.eos_token_id, model.config.pad_token_id) == (0, 1)
    with pytest.raises(ValueError, match="divisible"):
        build_model(PretrainConfig(n_embd=30, n_head=4), tokenizer)


# --- a short real run -------------------------------------------------------------------------------------


def _config(corpus_file: Path, folder: Path, **overrides) -> PretrainConfig:
    values = {
        "corpus": [str(corpus_file)],
        "out": str(folder / "out"),
        "run_dir": str(folder / "runs"),
        "vocab_size": 300,
        "n_layer": 1,
        "n_embd": 32,
        "n_head": 2,
        "context_length": 32,
        "batch_size": 16,
        "steps": 150,
        "lr": 3e-3,
        "warmup_steps": 10,
        "heldout_fraction": 0.1,
        "eval_interval": 50,
        "eval_windows": 50,
        "save_interval": 75,
        "threads": 1,
        "progress": False,
    }
    return PretrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def run(corpus_file, tmp_path_factory):
    """One pre-training run of a 1-layer, width-32 GPT-2 for 150 steps (a few seconds)."""
    cfg = _config(corpus_file, tmp_path_factory.mktemp("pretrain"))
    return cfg, pretrain(cfg)


def test_run_lowers_heldout_loss_below_unigram(run):
    _, summary = run
    history = summary["eval_history"]
    assert [step for step, _ in history] == [0, 50, 100, 150]
    first, last = history[0][1], history[-1][1]
    assert first == pytest.approx(math.log(300), abs=0.5)  # an untrained model is close to uniform
    assert last < first - 2.0  # about 5.7 -> 1.9 nats/token
    assert last < summary["unigram_loss"] - 1.0  # it learned more than word frequencies (unigram ~3.8)
    assert summary["heldout_loss"] == last
    assert summary["heldout_perplexity"] == pytest.approx(math.exp(last))
    assert summary["documents"]["train"] + summary["documents"]["heldout"] == 170
    assert summary["documents"]["heldout"] >= 5


def test_run_writes_loadable_checkpoints(run):
    cfg, summary = run
    out = Path(cfg.out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    model, tokenizer = load_lm(out)
    assert model.config.n_layer == 1 and model.config.n_embd == 32 and model.config.n_positions == 32
    assert len(tokenizer) == 300 and tokenizer.eos_token == EOS and tokenizer.pad_token == PAD
    # exactly the trained model: it scores the recorded held-out loss on the same held-out windows
    _, heldout = split_documents(file_documents(cfg.corpus), cfg.heldout_fraction, cfg.seed)
    windows = heldout_windows(encode_stream(tokenizer, heldout), cfg.context_length, cfg.eval_windows)
    assert evaluate(model, windows, cfg.batch_size) == pytest.approx(summary["heldout_loss"], rel=1e-5)
    assert json.loads((out / "tokenizer.json").read_text())["padding"] is None  # no state of a padded call
    texts = generate(model, tokenizer, ["The old"], max_new_tokens=12, num_return_sequences=2, temperature=0)
    assert len(texts) == 2 and texts[0] == texts[1] and texts[0].strip()
    checkpoint = Path(summary["run"]) / "checkpoint-75"
    mid, _ = load_lm(checkpoint)
    assert not torch.equal(mid.lm_head.weight, model.lm_head.weight)  # a real, earlier snapshot
    assert not (Path(summary["run"]) / "checkpoint-150").exists()  # the final model goes to `out`


def test_run_writes_tensorboard_events(run):
    cfg, summary = run
    folder = Path(summary["run"])
    assert folder.parent == Path(cfg.run_dir) and folder.name.startswith("pretrain__gpt2-")
    assert list(folder.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    assert {"train/loss", "eval/loss", "eval/unigram_loss", "charts/learning_rate"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("eval/loss")]
    assert [s for s, _ in logged] == [s for s, _ in summary["eval_history"]]
    assert logged[-1][1] == pytest.approx(summary["heldout_loss"], rel=1e-6)
    assert len(events.Scalars("train/loss")) == cfg.steps
    assert "config/text_summary" in events.Tags()["tensors"]  # the config as a markdown table


def test_run_writes_config_and_model_card(run):
    cfg, summary = run
    saved = json.loads((Path(summary["run"]) / "config.json").read_text())
    assert saved == to_jsonable(cfg)
    assert PretrainConfig(**saved) == cfg  # the run folder alone reproduces the run's settings
    card = (Path(cfg.out) / "README.md").read_text()
    assert f"| held-out loss | {summary['heldout_loss']:.3f} nats/token" in card
    assert f"| unigram baseline | {summary['unigram_loss']:.3f} nats/token" in card
    assert "150 steps" in card and "1 layers, width 32" in card
    assert json.loads((Path(cfg.out) / "training_summary.json").read_text()) == json.loads(json.dumps(summary))


def test_same_seed_same_run(corpus_file, tmp_path):
    tiny = {"steps": 6, "eval_interval": 3, "save_interval": 0, "n_embd": 16, "context_length": 16}
    a = pretrain(_config(corpus_file, tmp_path / "a", **tiny))
    b = pretrain(_config(corpus_file, tmp_path / "b", **tiny))
    c = pretrain(_config(corpus_file, tmp_path / "c", seed=1, **tiny))
    assert a["eval_history"] == b["eval_history"] and a["samples"] == b["samples"]
    assert a["eval_history"] != c["eval_history"]


def test_corpus_too_small_for_a_heldout_window(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n\n\n".join(["one short doc", "another short doc", "a third one"]))
    cfg = _config(path, tmp_path, context_length=64, vocab_size=260, heldout_fraction=0.3)
    with pytest.raises(CorpusError, match="held-out split"):
        pretrain(cfg)


def test_summary_is_complete(run):
    cfg, summary = run
    assert summary["config"] == dataclasses.asdict(cfg)
    assert summary["parameters"] == sum(p.numel() for p in load_lm(cfg.out)[0].parameters())
    assert summary["tokens_seen"] == cfg.steps * cfg.batch_size * cfg.context_length


# --- mixture of experts -----------------------------------------------------------------------------------


def test_build_moe_matches_the_dense_models_active_size(tokenizer):
    cfg = PretrainConfig(arch="moe", n_layer=2, n_embd=64, n_head=4, n_experts=4, top_k=2, context_length=32)
    model = build_model(cfg, tokenizer)
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 4
    assert model.config.intermediate_size == expert_size(cfg) == 64  # 8 * 64 // 6 = 85, down to a multiple of 32
    assert model.lm_head.weight is model.get_input_embeddings().weight
    dense = build_model(PretrainConfig(n_layer=2, n_embd=64, n_head=4, context_length=32), tokenizer)
    expert_weights = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert active_parameters(model) == sum(p.numel() for p in model.parameters()) - expert_weights // 2
    assert active_parameters(dense) == sum(p.numel() for p in dense.parameters())
    per_layer_mlp = 8 * 64 * 64  # the dense MLP's two matrices; the two chosen experts hold at most as many
    assert 2 * 3 * 64 * expert_size(cfg) <= per_layer_mlp
    with pytest.raises(ValueError, match="top_k"):
        build_model(PretrainConfig(arch="moe", n_experts=2, top_k=3), tokenizer)
    with pytest.raises(ValueError, match="arch must be one of gpt2, moe"):
        build_model(PretrainConfig(arch="t5"), tokenizer)


@pytest.fixture(scope="module")
def moe_run(corpus_file, tmp_path_factory):
    """A short pre-training run of a 1-layer Mixtral-style MoE (4 experts, top 2)."""
    cfg = _config(corpus_file, tmp_path_factory.mktemp("moe"), arch="moe", steps=120, save_interval=0, eval_interval=60)
    return cfg, pretrain(cfg)


def test_moe_run_learns_and_balances_its_router(moe_run):
    cfg, summary = moe_run
    history = summary["eval_history"]
    assert history[-1][1] < history[0][1] - 2.0 and history[-1][1] < summary["unigram_loss"] - 0.5
    assert summary["arch"] == "moe" and summary["architecture"]["n_experts"] == 4
    assert summary["active_parameters"] < summary["parameters"]
    events = EventAccumulator(summary["run"])
    events.Reload()
    aux = [e.value for e in events.Scalars("train/router_aux_loss")]
    assert len(aux) == cfg.steps
    assert all(1.5 < v < 3.0 for v in aux)  # about top_k = 2 at an even load, larger as the router favours some
    assert aux[-1] < 2.5  # and the router stays near balance while the loss is trained with it
    assert Path(summary["run"]).name.startswith("pretrain__moe-")
    assert "mixture-of-experts" in (Path(cfg.out) / "README.md").read_text()


def test_moe_model_loads_runs_on_the_engine_and_trains_with_rl(moe_run):
    from agents import REINFORCE, REINFORCEConfig
    from envs import TextGenEnv
    from textrl.core import core_name

    cfg, _ = moe_run
    assert type(load_lm(cfg.out)[0]).__name__ == "MixtralForCausalLM"
    env = TextGenEnv(
        cfg.out, prompts=["The"], max_new_tokens=6, reward=lambda completions, **_: [len(c) for c in completions]
    )
    agent = REINFORCE(env, config=REINFORCEConfig(batch_size=4, group_size=2, learning_rate=1e-2), seed=0, verbose=0)
    assert core_name(agent.policy.core) == "engine (mixtral)"  # the fast path, not the generic HF forward
    before = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}
    agent.learn(total_timesteps=48)
    after = dict(agent.policy.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if ".experts." in n)  # the experts train
