"""textrl.lm: loading the embedded and local HF causal LMs, the tokenizer, sampling, and the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

import textrl
from textrl import EMBEDDED_MODELS, LMNotFoundError, NotACausalLMError, generate, load_lm
from textrl.checkpoint import CheckpointError, write_atomic
from textrl.export import export_lm
from textrl.lm import context_length_of, cut_at_stop, lm_context_length, load_tokenizer, resolve_lm_path
from textrl.pretrain import EOS, PAD

ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    'Hello , world . isn \'t it ? -- "quoted" (parens) [brackets] {braces}; semi: colon! 100%',
    "first line\nsecond line\n\n  indented after a blank line\ttab\r\nwindows line",
    "café – naïve façade, Æsop's “curly quotes”, 日本語, emoji 😀",
    "  leading and trailing spaces  ",
]


def _check_loaded(model, tokenizer) -> None:
    assert isinstance(model, PreTrainedModel)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.eos_token is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None
    assert not model.training
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


# --- the embedded default --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_lm("tiny")


def test_load_tiny(tiny):
    model, tokenizer = tiny
    _check_loaded(model, tokenizer)
    assert model.config.model_type == "gpt2"
    assert tokenizer.eos_token == EOS
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # a real pad token, not the fallback
    assert load_lm()[0].config.to_dict() == model.config.to_dict()  # "tiny" is the default


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_tiny_ships_small_safetensors_with_a_model_card(name):
    folder = EMBEDDED_MODELS[name]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert not {"pytorch_model.bin", "training_args.bin"} & files
    assert sum(p.stat().st_size for p in folder.iterdir()) < 25 * 2**20
    backend = json.loads((folder / "tokenizer.json").read_text())
    assert backend["padding"] is None and backend["truncation"] is None  # no leftover state of a padded call
    card = (folder / "README.md").read_text()
    for words in ("held-out loss", "unigram baseline", "perplexity", "Shakespeare", "King James"):
        assert words in card


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_tiny_beat_the_unigram_baseline(name):
    """The committed model was trained: its recorded held-out loss is well below the unigram baseline."""
    summary = json.loads((EMBEDDED_MODELS[name] / "training_summary.json").read_text())
    assert summary["heldout_loss"] < summary["unigram_loss"] - 0.5


def test_tiny_moe_is_a_sparse_model_at_the_dense_ones_active_size_and_runs_on_the_engine():
    """The second embedded model: a Mixtral-style MoE with about tiny's active parameters, trained on the same
    tokens; the engine runs it on its fast path, with the HF forward's logits."""
    from textrl.core import core_name, make_core

    dense = json.loads((EMBEDDED_MODELS["tiny"] / "training_summary.json").read_text())
    sparse = json.loads((EMBEDDED_MODELS["tiny-moe"] / "training_summary.json").read_text())
    assert sparse["arch"] == "moe" and sparse["tokens_seen"] == dense["tokens_seen"]
    assert abs(sparse["active_parameters"] / dense["parameters"] - 1) < 0.1
    assert sparse["heldout_loss"] < dense["heldout_loss"]  # better than tiny at about its active size
    model, tokenizer = load_lm("tiny-moe")
    assert type(model).__name__ == "MixtralForCausalLM" and len(tokenizer) == 4096
    ids = tokenizer(["And God said unto Moses"], return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model(input_ids=ids).logits
        core = make_core(model)
        assert core_name(core) == "engine (mixtral)"
        ours = core.forward(ids, torch.ones_like(ids))[0]
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def _nll(model, tokenizer, text: str) -> float:
    ids = tokenizer(tokenizer.eos_token + text, return_tensors="pt").input_ids
    return model(input_ids=ids, labels=ids).loss.item()


def test_tiny_prefers_english_word_order(tiny):
    """A language model of English finds real sentences likelier than the same words shuffled."""
    model, tokenizer = tiny
    sentences = [
        "In the beginning God created the heaven and the earth.",
        "And the king said unto them, Go ye into the city, and tell me what ye see.",
        "What light through yonder window breaks? It is the east, and Juliet is the sun.",
    ]
    rng = torch.Generator().manual_seed(0)
    for sentence in sentences:
        words = sentence.split()
        shuffled = " ".join(words[i] for i in torch.randperm(len(words), generator=rng).tolist())
        real, mixed = _nll(model, tokenizer, sentence), _nll(model, tokenizer, shuffled)
        assert real < mixed - 0.3, (sentence, real, shuffled, mixed)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tiny_tokenizer_round_trip(tiny, text):
    _, tokenizer = tiny
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


# --- any local HF causal LM -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "cls"),
    [("gpt2_dir", "GPT2LMHeadModel"), ("llama_dir", "LlamaForCausalLM"), ("qwen2_dir", "Qwen2ForCausalLM")],
)
def test_load_random_local_model(request, folder, cls):
    path = request.getfixturevalue(folder)
    for name in (path, str(path)):  # a Path or a string
        model, tokenizer = load_lm(name)
        _check_loaded(model, tokenizer)
        assert type(model).__name__ == cls
    texts = generate(model, tokenizer, ["The old king"], max_new_tokens=4, num_return_sequences=2, seed=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_tokenizer_and_context_length_without_weights(gpt2_dir, llama_dir, gpt2_lm, context_length):
    tokenizer = load_tokenizer(gpt2_dir)
    assert tokenizer.get_vocab() == gpt2_lm[1].get_vocab() and tokenizer.pad_token == PAD
    assert load_tokenizer(llama_dir).pad_token == EOS
    assert lm_context_length(gpt2_dir) == lm_context_length(llama_dir) == context_length
    assert context_length_of(PretrainedConfig()) is None
    with pytest.raises(LMNotFoundError, match="model folder not found"):
        load_tokenizer("./nope/model")


def test_missing_pad_token_falls_back_to_eos(llama_dir):
    _, tokenizer = load_lm(llama_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == EOS


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_saved_tokenizer_round_trip(gpt2_lm, text):
    _, tokenizer = gpt2_lm
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text


# --- generation -------------------------------------------------------------------------------------------


def test_generate_count_and_token_budget(gpt2_lm, monkeypatch):
    model, tokenizer = gpt2_lm
    decoded = []
    decode = tokenizer.batch_decode

    def spy(ids, **kwargs):
        decoded.append(ids)
        return decode(ids, **kwargs)

    monkeypatch.setattr(tokenizer, "batch_decode", spy)
    prompts = ["The old king", "Hello", ""]
    texts = generate(model, tokenizer, prompts, max_new_tokens=5, num_return_sequences=3, seed=0)
    assert len(texts) == 9 and all(isinstance(t, str) for t in texts)
    (new_ids,) = decoded
    assert new_ids.shape[0] == 9
    assert 1 <= new_ids.shape[1] <= 5  # only the new tokens are returned, at most max_new_tokens of them


def test_greedy_matches_argmax_loop(gpt2_lm):
    """temperature 0 is greedy: the same tokens as picking the argmax by hand, without the prompt."""
    model, tokenizer = gpt2_lm
    ids = tokenizer("The old king", return_tensors="pt").input_ids
    expected = []
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=ids).logits[0, -1].argmax().item()
            if nxt == tokenizer.eos_token_id:
                break
            expected.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    first = generate(model, tokenizer, ["The old king"], max_new_tokens=6, temperature=0)
    assert first == [tokenizer.decode(expected)]
    torch.manual_seed(123)  # greedy does not depend on the RNG
    assert generate(model, tokenizer, ["The old king"], max_new_tokens=6, temperature=0, seed=None) == first


def test_seed_determinism(gpt2_lm):
    model, tokenizer = gpt2_lm
    kwargs = {"max_new_tokens": 8, "num_return_sequences": 3, "temperature": 2.0}
    a = generate(model, tokenizer, ["The old king"], seed=1, **kwargs)
    torch.rand(100)  # the global RNG moved on; the seed must still win
    b = generate(model, tokenizer, ["The old king"], seed=1, **kwargs)
    c = generate(model, tokenizer, ["The old king"], seed=2, **kwargs)
    assert a == b
    assert a != c
    assert len(set(a)) > 1  # the samples of one call differ from each other too


def test_generate_top_k_one_is_greedy(gpt2_lm):
    model, tokenizer = gpt2_lm
    greedy = generate(model, tokenizer, ["Hello"], max_new_tokens=5, temperature=0)
    for seed in (0, 1):
        assert generate(model, tokenizer, ["Hello"], max_new_tokens=5, top_k=1, seed=seed) == greedy


def test_generate_beyond_context_raises(gpt2_lm, llama_dir, context_length):
    for model, tokenizer in (gpt2_lm, load_lm(llama_dir)):  # n_positions (GPT-2), max_position_embeddings
        prompt = "x" * (context_length - 8)  # one token per "x" with the toy vocabulary
        n_prompt = len(tokenizer(prompt).input_ids)
        assert n_prompt == context_length - 8
        room = context_length - n_prompt
        assert len(generate(model, tokenizer, [prompt], max_new_tokens=room, temperature=0)) == 1
        with pytest.raises(ValueError, match="context"):
            generate(model, tokenizer, [prompt], max_new_tokens=room + 1)


@pytest.mark.parametrize(
    "kwargs", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}]
)
def test_generate_rejects_bad_settings(gpt2_lm, kwargs):
    model, tokenizer = gpt2_lm
    with pytest.raises(ValueError):
        generate(model, tokenizer, ["Hello"], **kwargs)


def test_generate_stops_right_after_the_first_stop_string(gpt2_lm):
    """With the same seed, each text is the unstopped one cut after its first stop string (kept)."""
    model, tokenizer = gpt2_lm
    kwargs = {"max_new_tokens": 12, "num_return_sequences": 4, "temperature": 2.0, "seed": 3}
    free = generate(model, tokenizer, ["The old king"], **kwargs)
    letters = [c for c in free[0][1:] if c.isascii() and c.isalpha()]
    assert letters, free
    for stop in (letters[0], [letters[0], "zq"], ["The", letters[0]]):
        stops = [stop] if isinstance(stop, str) else stop
        stopped = generate(model, tokenizer, ["The old king"], stop=stop, **kwargs)
        assert stopped == [cut_at_stop(text, stops) for text in free]
    assert stopped[0].endswith(letters[0]) and len(stopped[0]) < len(free[0])
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        generate(model, tokenizer, ["Hi"], stop=[""])


def test_loading_and_generating_print_nothing(llama_dir, capfd):
    """No progress bar ("Loading weights"), no deprecation or padding warning from transformers."""
    model, tokenizer = load_lm(llama_dir)
    generate(model, tokenizer, ["", "The old king"], max_new_tokens=4, num_return_sequences=2, seed=0)
    assert capfd.readouterr().err == ""


# --- textrl runs and checkpoints ----------------------------------------------------------------------------


def _checkpoint(folder: Path, model_dir: Path, step: int = 10) -> Path:
    """A checkpoint as textrl writes one (policy/ + state.json, completed by its manifest), from a model folder."""

    def write(tmp: Path) -> None:
        shutil.copytree(model_dir, tmp / "policy")
        (tmp / "state.json").write_text(
            json.dumps({"agent": "reinforce", "env_id": "toy", "num_timesteps": step, "lm": str(model_dir)})
        )

    return write_atomic(folder / f"step-{step:012d}", write)


def test_a_checkpoint_or_run_folder_loads_its_policy(gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "config.json").parent.mkdir()
    (run / "config.json").write_text("{}")  # the run's settings: not a model config
    old = _checkpoint(run / "checkpoints", gpt2_dir, step=10)
    new = _checkpoint(run / "checkpoints", gpt2_dir, step=20)
    assert resolve_lm_path(new) == new / "policy"
    assert resolve_lm_path(run) == resolve_lm_path(run / "checkpoints") == new / "policy"
    assert lm_context_length(run) == lm_context_length(gpt2_dir)
    model, tokenizer = load_lm(run)
    _check_loaded(model, tokenizer)
    (new / "policy" / "model.safetensors").write_bytes(b"truncated")  # the newest breaks: the previous one
    assert resolve_lm_path(run) == old / "policy"
    assert f"warning: skipping checkpoint {new}" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="truncated or corrupt"):  # named directly: it must verify
        load_lm(new)
    (old / "state.json").write_text("{}")
    with pytest.raises(LMNotFoundError, match="has no complete checkpoint"):
        load_lm(run)


def test_export_writes_a_plain_hf_folder(gpt2_dir, tmp_path):
    checkpoint = _checkpoint(tmp_path / "run" / "checkpoints", gpt2_dir, step=30)
    out = tmp_path / "export"
    source, written = export_lm(tmp_path / "run", out)
    assert source == checkpoint / "policy"
    names = {p.name for p in written}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers alone
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint / "policy")
    ids = tokenizer(["The old king sees"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(checkpoint / "policy").get_vocab()
    card = (out / "README.md").read_text()
    assert str(checkpoint) in card and "| trained tokens | 30 |" in card
    with pytest.raises(ValueError, match="is not empty; pass --force"):
        export_lm(checkpoint, out)
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    export_lm(checkpoint, out, force=True)
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == reference.num_parameters()


# --- errors -----------------------------------------------------------------------------------------------


def test_hub_id_offline_says_to_pass_a_local_folder(offline_hub):
    name = "some-org/definitely-not-cached-model"
    for load in (load_lm, load_tokenizer, lm_context_length):
        with pytest.raises(LMNotFoundError) as info:
            load(name)
        message = str(info.value)
        assert name in message and "local folder" in message
        assert info.value.__cause__ is None and info.value.__suppress_context__  # no hub-client traceback
    assert not any(offline_hub.rglob("*definitely-not-cached*"))  # nothing was fetched into the cache


def test_embedded_model_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(EMBEDDED_MODELS, "tiny", tmp_path / "gone")
    with pytest.raises(LMNotFoundError, match="embedded model 'tiny' is missing"):
        load_lm("tiny")


@pytest.mark.parametrize("folder", ["bert_dir", "distilbert_dir"])
def test_encoder_only_model_is_not_a_causal_lm(request, folder):
    path = request.getfixturevalue(folder)
    with pytest.raises(NotACausalLMError, match="not a causal language model"):
        load_lm(path)


def test_nonexistent_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("./nope/model", "nope/deeper/model", str(tmp_path / "nope")):
        with pytest.raises(LMNotFoundError, match="model folder not found"):
            load_lm(name)


def test_file_instead_of_folder(gpt2_dir):
    with pytest.raises(LMNotFoundError, match="is a file"):
        load_lm(gpt2_dir / "config.json")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LMNotFoundError, match=r"no config\.json\), nor a textrl checkpoint"):
        load_lm(tmp_path)


def test_folder_without_tokenizer(tmp_path, gpt2_dir):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((gpt2_dir / name).read_bytes())
    with pytest.raises(LMNotFoundError, match="no tokenizer files"):
        load_lm(tmp_path)


def test_errors_are_exported():
    assert textrl.LMNotFoundError is LMNotFoundError and textrl.NotACausalLMError is NotACausalLMError
    assert issubclass(LMNotFoundError, FileNotFoundError) and issubclass(NotACausalLMError, ValueError)
