"""Shared fixtures: tiny randomly initialised HF models saved to temp folders, and a learnable toy corpus.

Everything here is built once per session in a few seconds, so the suite never needs network or the
embedded model's weights except in the tests that are about the embedded model.
"""

from __future__ import annotations

import random
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from textrl.pretrain import EOS, train_tokenizer

CONTEXT = 64
"""Context length (positions) of every tiny random model."""

_ADJS = ["old", "young", "brave", "quiet", "golden", "dark", "gentle", "proud"]
_NOUNS = ["king", "queen", "knight", "horse", "river", "castle", "garden", "sword", "letter", "crown", "child"]
_VERBS = ["sees", "finds", "loves", "follows", "guards", "fears", "carries", "praises"]
_PLACES = ["by the river", "in the garden", "at the castle", "under the hill", "near the gate"]


def pseudo_english(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of 4-7 sentences from a small grammar: easy to learn, with a unigram baseline to beat."""
    rng = random.Random(seed)

    def sentence() -> str:
        subject, verb, obj = rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_NOUNS)
        return f"The {rng.choice(_ADJS)} {subject} {verb} the {rng.choice(_ADJS)} {obj} {rng.choice(_PLACES)}."

    return ["\n".join(sentence() for _ in range(rng.randint(4, 7))) for _ in range(n_docs)]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models are overhead-bound: one thread is faster, and immune to a busy 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path) -> Path:
    """No network and an empty Hugging Face cache; returns the cache's home folder.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HOME once, when it is first imported (long before any test),
    so both the environment (for subprocesses and late imports) and the module's constants are set.
    """
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


@pytest.fixture(scope="session")
def context_length() -> int:
    """Positions of every tiny random model."""
    return CONTEXT


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with 300 tokens, trained on a few hundred made-up lines."""
    chat = ["Hello, world! How are you today?", "It's a fine day; isn't it? Yes -- quite fine.", "Numbers: 1, 2, 42."]
    lines = pseudo_english(60, seed=1) + chat * 20
    tok = train_tokenizer(lines, vocab_size=300)
    assert len(tok) == 300
    return tok


def _save(folder: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised 2-layer, width-32 GPT-2 and its tokenizer, saved as an HF model folder."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(tmp_path_factory.mktemp("gpt2"), GPT2LMHeadModel(config), tokenizer)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama. Its tokenizer defines eos but no pad token (load_lm must fall back to eos)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=EOS, bos_token=EOS)
    assert no_pad.pad_token is None
    return _save(tmp_path_factory.mktemp("llama"), LlamaForCausalLM(config), no_pad)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Qwen2 with the shared tokenizer."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(tmp_path_factory.mktemp("qwen2"), Qwen2ForCausalLM(config), tokenizer)


@pytest.fixture(scope="session")
def llama_gqa_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama with grouped-query attention over several kv heads (4 heads, 2 kv heads).

    ``llama_dir`` has a single kv head, where every way of sharing kv heads between query heads agrees;
    with two, a kv head repeated in the wrong order (``repeat`` instead of ``repeat_interleave``) shows.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(tmp_path_factory.mktemp("llama-gqa"), LlamaForCausalLM(config), tokenizer)


MISTRAL_WINDOW = 4
"""Sliding window of the tiny Mistral: each position attends to itself and the 3 before it (HF's rule),
so the window acts inside the 10-12 token test sequences."""


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Mistral: grouped-query attention (4 heads, 2 kv heads) and a sliding window of 4."""
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,  # MistralConfig's default is 128, not hidden_size / heads
        sliding_window=MISTRAL_WINDOW,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(tmp_path_factory.mktemp("mistral"), MistralForCausalLM(config), tokenizer)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Qwen3: RMSNorm on q and k, a head size (16) other than hidden / heads (8), grouped-query
    attention (4 heads, 2 kv heads) and the LM head tied to the input embeddings."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(tmp_path_factory.mktemp("qwen3"), Qwen3ForCausalLM(config), tokenizer)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Mixtral: 4 SwiGLU experts, 2 chosen per token (renormalised), a sliding window of 5."""
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=5,
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(tmp_path_factory.mktemp("mixtral"), MixtralForCausalLM(config), tokenizer)


@pytest.fixture(scope="session")
def qwen2_moe_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Qwen2-MoE: layer 0 sparse (4 experts, top 2, not renormalised, plus a gated shared expert),
    layer 1 a dense MLP; q/k/v biases."""
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(tmp_path_factory.mktemp("qwen2_moe"), Qwen2MoeForCausalLM(config), tokenizer)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, tokenizer) -> Path:
    """An encoder-only model (BERT) that transformers will nonetheless map to a "causal LM" class."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT,
    )
    return _save(tmp_path_factory.mktemp("bert"), BertModel(config), tokenizer)


@pytest.fixture(scope="session")
def distilbert_dir(tmp_path_factory, tokenizer) -> Path:
    """An encoder-only model that has no causal-LM class at all in transformers."""
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    return _save(tmp_path_factory.mktemp("distilbert"), DistilBertModel(config), tokenizer)


@pytest.fixture(scope="session")
def gpt2_lm(gpt2_dir):
    """``load_lm`` of the random GPT-2 folder, shared by the tests that only read it."""
    from textrl import load_lm

    return load_lm(gpt2_dir)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """About 50 KB of pseudo-English in 170 documents (separated by two blank lines) in a .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "toy.txt"
    path.write_text("\n\n\n".join(pseudo_english(170, seed=0)) + "\n", encoding="utf-8")
    return path


@torch.no_grad()
def _sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) random parameters: matrices N(0, 0.15^2), norm weights 1 + N(0, 0.3^2), biases N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim > 1:
            p.copy_(0.15 * noise)
        elif "norm" in name or "ln_" in name:
            p.copy_(1 + 0.3 * noise)
        else:
            p.copy_(0.1 * noise)
    return model


@pytest.fixture(scope="session")
def sharpen():
    """A function giving a model O(1) random parameters: random-init HF models have every norm weight 1, every
    bias 0 and weights so small that attention is nearly uniform, so a forward that skipped a norm weight or a
    bias would still agree with the reference."""
    return _sharpen


def _resumed_exactly(a, folder: Path, env, keys: tuple[str, ...]):
    """Save ``a`` (an agent that has run its first iteration) to ``folder``; ``a`` runs on for 2 iterations, and
    an agent loaded from ``folder`` runs the same 2. Both must end with identical trainable weights, the same
    ``keys`` in every iteration's logged statistics, and the same step count. Returns the loaded agent."""
    a.save(folder)
    stats_a: list[dict] = []
    stats_b: list[dict] = []
    for _ in range(2):
        a.learn(1, reset_num_timesteps=False, callback=lambda ag, s: stats_a.append(s))
    b = type(a).load(folder, env=env)
    for _ in range(2):
        b.learn(1, reset_num_timesteps=False, callback=lambda ag, s: stats_b.append(s))
    for pa, pb in zip(a.policy.trainable_parameters(), b.policy.trainable_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert len(stats_a) == len(stats_b) == 2
    for sa, sb in zip(stats_a, stats_b, strict=True):
        for key in keys:
            assert sa[key] == sb[key], key
    assert a.num_timesteps == b.num_timesteps
    return b


@pytest.fixture(scope="session")
def resumed_exactly():
    """The exact-resume check every agent's tests share (see :func:`_resumed_exactly`)."""
    return _resumed_exactly
