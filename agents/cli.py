"""The ``textrl`` command line: ``train``, ``generate``, ``export``, ``pretrain``, ``sft``, ``reward-train``, ``plot``.

Flags are generated from the config dataclasses (:mod:`textrl.config`), so each option is documented
once, next to its field. ``--config FILE`` (YAML or TOML) gives the same settings from a file: its keys
become flags placed before the command line's own, so a flag given there wins and every value goes through
the same parsing and checks. An error is one line on stderr and exit code 2 (``--debug`` or
``TEXTRL_DEBUG=1`` show the traceback); an error raised in the user's own code names its file and line.

Where it lives: the command line is the one module that wires every layer together (env ids from ``envs``,
agents from ``agents``, models, configs and checkpoints from ``textrl``). The layers point one way,
``agents`` -> ``envs`` -> ``textrl``, so it sits in the top layer and nothing below imports it (the
import contract in pyproject.toml, checked by tests/test_layers.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from textrl.config import add_dataclass_args, from_args
from textrl.rollout import Sampling


@dataclass
class GenerateConfig(Sampling):
    """Settings of `textrl generate` (after the sampling settings, :class:`textrl.rollout.Sampling`)."""

    lm: str = "tiny"
    """Embedded model name, local Hugging Face model folder, or textrl run or checkpoint folder (its policy)."""
    prompt: str = ""
    """Text to continue (empty: start from the eos token)."""
    max_new_tokens: int = 48
    """Most tokens to generate per continuation."""
    num_samples: int = 3
    """Continuations to print."""
    seed: int = 0
    """Random seed."""
    stop: list[str] = field(default_factory=list)
    """Stop each continuation right after the first of these strings (kept in the output)."""


@dataclass
class ExportConfig:
    """Settings of `textrl export`."""

    source: str = ""
    """Run folder (its newest complete checkpoint) or checkpoint folder to export the policy of."""
    out: str = ""
    """Folder to write the Hugging Face model to (absent or empty, unless --force)."""
    force: bool = False
    """Write into a non-empty folder, replacing its files."""
    merge: bool = False
    """Merge a LoRA run's adapters into the base weights: a plain Hugging Face folder (without it, the adapter
    folder in peft's format)."""


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
        suppress_tokens=cfg.suppress_tokens,
        num_return_sequences=cfg.num_samples,
        seed=cfg.seed,
        stop=cfg.stop,
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


def _sft(args: argparse.Namespace) -> int:
    from textrl.sft import SFTConfig, sft

    s = sft(from_args(SFTConfig, args))
    if s["heldout_loss_before"] is not None:
        print(
            f"held-out loss {s['heldout_loss_before']:.3f} -> {s['heldout_loss_after']:.3f} "
            f"({s['rows']['heldout']} demonstrations, {s['steps']} steps, {s['tokens']:,} tokens)"
        )
    else:
        print(f"no held-out demonstrations (--heldout-fraction 0); last training loss {s['last_train_loss']:.3f}")
    if s["truncated"]:
        print(f"{s['truncated']} demonstrations were cut to {s['max_length']} tokens (--truncate)")
    adapter = f" (LoRA adapters in {s['adapter']})" if s["adapter"] else ""
    print(f"model saved to {s['out']}{adapter}; TensorBoard logs and checkpoints in {s['run']}")
    return 0


def _reward_train(args: argparse.Namespace) -> int:
    from textrl.reward_model import RewardTrainConfig, reward_train

    s = reward_train(from_args(RewardTrainConfig, args))
    if s["heldout_accuracy_before"] is not None:
        print(
            f"held-out pair accuracy {s['heldout_accuracy_before']:.3f} -> {s['heldout_accuracy_after']:.3f}, "
            f"loss {s['heldout_loss_before']:.3f} -> {s['heldout_loss_after']:.3f} "
            f"({s['pairs']['heldout']} pairs, {s['steps']} steps)"
        )
    else:
        print(f"no held-out pairs (--heldout-fraction 0); last training loss {s['last_train_loss']:.3f}")
    print(f"reward model saved to {s['out']}; TensorBoard logs in {s['run']}")
    print(f"use it as a reward: textrl.rewards.reward_model({s['out']!r})")
    return 0


def _train(args: argparse.Namespace) -> int:
    import shlex

    from agents.runner import TrainConfig, run_training
    from textrl.interrupt import TrainingInterrupted

    given = vars(args)  # flags absent from the command line are absent here (their default is SUPPRESS)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        s = run_training(
            {k: v for k, v in given.items() if k in train_fields},
            {k: v for k, v in given.items() if k in args.agent_fields},
        )
    except TrainingInterrupted as e:
        print(f"textrl train: {e}", file=sys.stderr)
        if e.checkpoint is not None:
            run = e.checkpoint.parent.parent if e.checkpoint.parent.name == "checkpoints" else e.checkpoint
            print(f"resume with: textrl train --resume {shlex.quote(str(run))}", file=sys.stderr)
        return 128 + e.signum
    finally:
        _leave_process_group()
    if not s["is_main"]:  # under torchrun, rank 0 reports for all
        return 0
    first, last = s["first_reward"], s["last_reward"]
    if first is not None:
        print(
            f"reward (mean per episode): first iteration {first:.3f} -> last {last:.3f} ({s['iterations']} iterations)"
        )
    print(f"{s['num_timesteps']} tokens; TensorBoard logs: {s['run_dir']}; checkpoint: {s.get('checkpoint')}")
    return 0


def _leave_process_group() -> None:
    """Under torchrun: leave torch.distributed's process group cleanly (no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _export(args: argparse.Namespace) -> int:
    from textrl.export import export_lm

    cfg = from_args(ExportConfig, args)
    source, written = export_lm(cfg.source, cfg.out, force=cfg.force, merge=cfg.merge)
    print(f"exported {source.parent if source.name == 'policy' else source} to {cfg.out}:")
    for path in written:
        print(f"  {path.name} ({_size(path.stat().st_size)})")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({cfg.out!r}) and AutoTokenizer")
    return 0


def _size(n: int) -> str:
    """A file size for people: ``"633 bytes"``, ``"151.1 kB"``, ``"1.2 GB"``."""
    if n < 1000:
        return f"{n} bytes"
    power = min(len(str(n)) - 1, 9) // 3  # 1 kB, 2 MB, 3 GB
    return f"{n / 1000**power:.1f} {('kB', 'MB', 'GB')[power - 1]}"


def _plot(args: argparse.Namespace) -> int:
    from textrl.plot import PlotConfig, plot, summary_lines

    out, runs, tags = plot(from_args(PlotConfig, args))
    for line in summary_lines(runs, tags):
        print(line)
    print(f"wrote {out} ({len(tags)} tags, {len(runs)} runs)")
    return 0


def _agent_name(argv: list[str]) -> str | None:
    """The --agent value in ``argv`` (the last one, as argparse reads it; the agent's flags depend on it)."""
    name = None
    for i, arg in enumerate(argv):
        if arg == "--agent" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--agent="):
            name = arg.split("=", 1)[1]
    return name


def _resumed_agent(argv: list[str]) -> str | None:
    """The agent of the run ``--resume`` names (its flags are the ones that apply), or None when unreadable.

    A resume that cannot be read here is reported by ``textrl train`` itself, with the reason.
    """
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--resume"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--resume=")), None)
    if not path:
        return None
    from pathlib import Path

    from textrl.checkpoint import CheckpointError, latest_checkpoint, load_json

    folder = Path(path)
    if not (folder / "state.json").is_file():
        folder = latest_checkpoint(folder / "checkpoints") or latest_checkpoint(folder) or folder
    try:
        state = load_json(folder / "state.json")
    except CheckpointError:
        return None
    return state.get("agent") if isinstance(state, dict) and isinstance(state.get("agent"), str) else None


def _command_configs(command: str, agent: str | None) -> list[tuple[type, tuple[str, ...]]]:
    """``(config dataclass, fields that are not ``--field VALUE`` flags)`` for each config behind a command.

    The fields set apart are positional arguments, or the switches ``--force`` and ``--merge``; config files
    cannot set them.
    """
    from agents import AGENTS
    from agents.runner import TrainConfig
    from textrl.plot import PlotConfig
    from textrl.pretrain import PretrainConfig
    from textrl.reward_model import RewardTrainConfig
    from textrl.sft import SFTConfig

    configs: dict[str, list[tuple[type, tuple[str, ...]]]] = {
        "train": [(TrainConfig, ()), (AGENTS.get(agent or "ppo", AGENTS["ppo"]).config_class, ())],
        "generate": [(GenerateConfig, ())],
        "export": [(ExportConfig, ("source", "out", "force", "merge"))],
        "pretrain": [(PretrainConfig, ())],
        "sft": [(SFTConfig, ())],
        "reward-train": [(RewardTrainConfig, ())],
        "plot": [(PlotConfig, ("runs",))],
    }
    return configs.get(command, [])


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors stay short: a long usage (train has dozens of flags) is one line."""

    def error(self, message: str):
        usage = self.format_usage()
        if usage.count("\n") > 2:
            usage = f"usage: {self.prog} [options] ({self.prog} --help lists them)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``textrl`` parser; ``argv`` decides the agent whose flags ``train`` gets (its last ``--agent``)."""
    from textrl import __version__
    from textrl.config import field_docs

    parser = _Parser(prog="textrl", description="Reinforcement learning for text generation.")
    parser.add_argument("--version", action="version", version=f"textrl {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "train": "train an agent (ppo, reinforce or grpo) on an env; flags depend on --agent",
        "generate": "print sampled continuations of a prompt",
        "export": "write a run's or checkpoint's policy as a plain Hugging Face model folder",
        "pretrain": "pre-train a small GPT-2 (tokenizer + model) from scratch",
        "sft": "supervised fine-tuning on demonstrations (prompt/completion or chat rows), all weights or LoRA",
        "reward-train": "train a reward model on preference pairs (chosen vs rejected), starting from a pretrained LM",
        "plot": "draw learning curves from TensorBoard logs to a PNG",
    }
    funcs = {
        "train": _train,
        "generate": _generate,
        "export": _export,
        "pretrain": _pretrain,
        "sft": _sft,
        "reward-train": _reward_train,
        "plot": _plot,
    }
    agent = _agent_name(argv or []) or _resumed_agent(argv or [])
    for command, help_text in helps.items():
        p = sub.add_parser(command, help=help_text)
        configs = _command_configs(command, agent)
        for cls, special in configs:
            docs = field_docs(cls)
            for name in special:
                if name in ("force", "merge"):  # switches: `textrl export RUN OUT --merge --force`
                    p.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help=docs[name])
                    continue
                kwargs = {"nargs": "+"} if name == "runs" else {}
                metavar = {"runs": "RUN", "source": "RUN|CHECKPOINT", "out": "OUT"}[name]
                p.add_argument(name, metavar=metavar, help=docs[name], **kwargs)
            add_dataclass_args(p, cls, skip=special)
        p.add_argument("--config", action="append", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        p.set_defaults(func=funcs[command])
        if command == "train":
            p.set_defaults(agent_fields={f.name for f in dataclasses.fields(configs[1][0])})
    return parser


CONFIG_HELP = (
    "YAML (.yaml/.yml) or TOML (.toml) file of settings: the keys are the flags' names (kl_coef or kl-coef); "
    "flags given on the command line override it"
)
DEBUG_HELP = "show the full traceback of an error (also TEXTRL_DEBUG=1)"


def _is_negative_number(token: str) -> bool:
    """``-1e-4``, ``-0.5``, ``-inf``, ``-nan``: tokens argparse would take for options."""
    if not token.startswith("-"):
        return False
    try:
        float(token)
    except ValueError:
        return False
    return True


def _join_negative_values(argv: list[str]) -> list[str]:
    """Write ``--flag -1e-4`` as ``--flag=-1e-4``: argparse reads a token like ``-1e-4`` as an unknown option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":  # everything after it is positional already
            return out + argv[i:]
        if token.startswith("--") and "=" not in token and i + 1 < len(argv) and _is_negative_number(argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _flag_tokens(key: str, value: Any) -> list[str]:
    """A config file's ``key: value`` as command-line tokens (a list: one token per item)."""

    def text(v: Any) -> str:
        if v is None:
            return "none"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):  # e.g. env_kwargs, a JSON object on the command line
            return json.dumps(v)
        return str(v)

    flag = "--" + key.replace("_", "-")
    if isinstance(value, list | tuple):
        return [flag, *map(text, value)]
    return [f"{flag}={text(value)}"]  # one token, so a value starting with "-" is not read as an option


def _with_config_files(argv: list[str], command: str) -> list[str]:
    """``argv`` with the settings of its ``--config`` files spliced in before the command's own flags.

    Raises:
        ConfigFileError: a file that does not load, or a key that is not a flag of the command.
    """
    from textrl.config import ConfigFileError, load_config_file

    at = argv.index(command) + 1
    head, rest = argv[:at], argv[at:]
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config", action="append", default=[])
    try:
        files = pre.parse_known_args(rest)[0].config
    except argparse.ArgumentError:  # e.g. --config without a file: the real parser says so
        return argv
    if not files:
        return argv
    loaded = [(path, load_config_file(path)) for path in files]
    agent = _agent_name(rest)  # the agent decides train's keys: the command line's, else the last file's
    if agent is None:
        for _, data in loaded:
            agent = str(data["agent"]) if "agent" in data else agent
    configs = _command_configs(command, agent)
    valid = sorted(f.name for cls, special in configs for f in dataclasses.fields(cls) if f.name not in special)
    tokens: list[str] = []
    for path, data in loaded:
        for key, value in data.items():
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                for_agent = f" --agent {agent or 'ppo'}" if command == "train" else ""
                raise ConfigFileError(
                    f"config file {path}: unknown key {key!r} for `textrl {command}{for_agent}`{hint}; "
                    f"valid keys: {', '.join(valid)}"
                )
            tokens += _flag_tokens(key, value)
    first_flag = next((i for i, t in enumerate(rest) if t.startswith("-") and len(t) > 1), len(rest))
    # before the first flag of the command line (so its flags win), after its leading positionals
    return [*head, *rest[:first_flag], *tokens, *rest[first_flag:]]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``textrl`` command.

    Returns:
        The exit code: 0, or 2 after an error, which is one line on stderr (``textrl <command>: error: ...``)
        unless ``--debug`` (anywhere on the command line) or ``TEXTRL_DEBUG=1`` ask for the traceback too.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("TEXTRL_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    argv = _join_negative_values([a for a in argv if a != "--debug"])
    command = next((a for a in argv if not a.startswith("-")), None)
    prefix = f"textrl{' ' + command if command else ''}"
    try:
        with warnings.catch_warnings():
            if not debug:  # a warning is one line too, like an error
                warnings.showwarning = lambda message, *_, **__: print(f"{prefix}: warning: {message}", file=sys.stderr)
            if command is not None:
                argv = _with_config_files(argv, command)
            args = build_parser(argv).parse_args(argv)
            return args.func(args)
    except KeyboardInterrupt:  # outside training's own handling (e.g. while a model loads): nothing to save
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from textrl.errors import one_line

        if debug:
            import traceback

            traceback.print_exc()
        print(f"{prefix}: error: {one_line(e, _expected_errors())}", file=sys.stderr)
        return 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    from textrl.checkpoint import CheckpointError
    from textrl.corpus import CorpusError

    # errors whose message is written for users: OSError covers LMNotFoundError, ValueError NotACausalLMError,
    # ConfigFileError, RewardError and DataError (a bad row of a data file); FloatingPointError is
    # agents.guards.NonFiniteError (NaN/inf in training)
    return (ValueError, TypeError, OSError, CorpusError, CheckpointError, FloatingPointError)


if __name__ == "__main__":
    sys.exit(main())
