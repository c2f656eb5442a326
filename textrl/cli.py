"""The ``textrl`` command line: ``textrl train``, ``textrl generate``, ``textrl pretrain`` and ``textrl plot``.

Flags are generated from the config dataclasses (:mod:`textrl.config`), so each option is documented
once, next to its field.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from textrl.config import add_dataclass_args, from_args


@dataclass
class GenerateConfig:
    """Settings of `textrl generate`."""

    lm: str = "tiny"
    """Embedded model name or local Hugging Face model folder."""
    prompt: str = ""
    """Text to continue (empty: start from the eos token)."""
    max_new_tokens: int = 48
    """Most tokens to generate per continuation."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_k: int = 50
    """Sample among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling probability mass (1.0 = off)."""
    num_samples: int = 3
    """Continuations to print."""
    seed: int = 0
    """Random seed."""


def _generate(args: argparse.Namespace) -> int:
    from textrl.lm import generate, load_lm

    cfg = from_args(GenerateConfig, args)
    model, tokenizer = load_lm(cfg.lm)
    texts = generate(
        model,
        tokenizer,
        [cfg.prompt],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        num_return_sequences=cfg.num_samples,
        seed=cfg.seed,
    )
    for i, text in enumerate(texts, 1):
        print(f"--- sample {i} ---")
        print(cfg.prompt + text)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from textrl.pretrain import PretrainConfig, pretrain

    summary = pretrain(from_args(PretrainConfig, args))
    print(
        f"held-out loss {summary['heldout_loss']:.3f} (perplexity {summary['heldout_perplexity']:.1f}); "
        f"unigram baseline {summary['unigram_loss']:.3f} (perplexity {summary['unigram_perplexity']:.1f})"
    )
    print(f"model saved to {summary['config']['out']}; TensorBoard logs in {summary['run']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from textrl.train import TrainConfig, train

    cfg = from_args(TrainConfig, args)
    overrides = {k: v for k, v in vars(args).items() if k in args.agent_fields}
    s = train(cfg, overrides)
    first, last = s["first_reward"], s["last_reward"]
    if first is not None:
        print(
            f"reward (mean per episode): first iteration {first:.3f} -> last {last:.3f} ({s['iterations']} iterations)"
        )
    print(f"{s['num_timesteps']} tokens; TensorBoard logs: {s['run_dir']}; checkpoint: {s.get('checkpoint')}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from textrl.plot import PlotConfig, plot, summary_lines

    out, runs, tags = plot(from_args(PlotConfig, args))
    for line in summary_lines(runs, tags):
        print(line)
    print(f"wrote {out} ({len(tags)} tags, {len(runs)} runs)")
    return 0


def _agent_name(argv: list[str]) -> str:
    """The --agent value on the command line (its flags depend on it), default ppo."""
    for i, arg in enumerate(argv):
        if arg == "--agent" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--agent="):
            return arg.split("=", 1)[1]
    return "ppo"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    import dataclasses

    from agents import AGENTS
    from textrl import __version__
    from textrl.config import field_docs
    from textrl.plot import PlotConfig
    from textrl.pretrain import PretrainConfig
    from textrl.train import TrainConfig

    parser = argparse.ArgumentParser(prog="textrl", description="Reinforcement learning for text generation.")
    parser.add_argument("--version", action="version", version=f"textrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an agent (ppo or reinforce) on an env; flags depend on --agent")
    add_dataclass_args(p, TrainConfig)
    agent_cls = AGENTS.get(_agent_name(argv or []), AGENTS["ppo"])
    add_dataclass_args(p, agent_cls.config_class)
    p.set_defaults(func=_train, agent_fields={f.name for f in dataclasses.fields(agent_cls.config_class)})

    p = sub.add_parser("generate", help="print sampled continuations of a prompt")
    add_dataclass_args(p, GenerateConfig)
    p.set_defaults(func=_generate)

    p = sub.add_parser("pretrain", help="pre-train a small GPT-2 (tokenizer + model) from scratch")
    add_dataclass_args(p, PretrainConfig)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("plot", help="draw learning curves from TensorBoard logs to a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help=field_docs(PlotConfig)["runs"])
    add_dataclass_args(p, PlotConfig, skip=("runs",))
    p.set_defaults(func=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``textrl`` command."""
    from textrl.checkpoint import CheckpointError
    from textrl.corpus import CorpusError
    from textrl.lm import LMNotFoundError, NotACausalLMError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (
        LMNotFoundError,
        NotACausalLMError,
        CorpusError,
        CheckpointError,
        FloatingPointError,  # textrl.agent.NonFiniteError: NaN/inf in training, named in the message
        ValueError,
        TypeError,
    ) as e:
        print(f"textrl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
