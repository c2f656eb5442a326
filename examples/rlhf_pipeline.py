"""The whole RLHF pipeline on the embedded LM, offline, in one script: pretrained LM -> SFT -> reward model -> PPO.

1. **Supervised fine-tuning** (``textrl sft``): the embedded model learns to finish the line it is given and
   stop. Demonstrations are lines of the pre-training corpus's training split: the first words are the
   prompt, the rest of the line the completion (which ends with eos).
2. **Preferences and a reward model** (``textrl reward-train``): the SFT model writes two completions of
   each of a set of line openings, and a labeller prefers one. The labeller here is VADER sentiment (a
   lexicon shipped with the ``vaderSentiment`` package), standing in for human raters who prefer the
   kinder line; pairs it cannot tell apart are dropped. A reward model (the embedded LM with a score head)
   learns the preference from the pairs with the Bradley-Terry loss.
3. **RL** (PPO): the SFT model is trained on the *learned* reward, with a KL penalty to the SFT model (the
   leash that keeps it from writing whatever the reward model over-rates).

Every figure is measured on held-out line openings (from the corpus's held-out split, which no step sees):
the learned reward and the labeller's own score (the preference the reward model was meant to capture)
before and after RL, and how often a completion ends by itself before and after SFT.

Run it with ``python examples/rlhf_pipeline.py [--out DIR] [budgets]``; the defaults take about ten minutes on
one CPU thread. Every step writes its TensorBoard logs under ``<out>/runs``; the models go to ``<out>/sft``,
``<out>/reward_model`` and ``<out>/ppo``, the figures to ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from agents import PPO, PPOConfig
from envs import TextGenEnv
from envs.task import line_openings, line_splits
from textrl.lm import generate, load_lm
from textrl.reward_library import vader_sentiment
from textrl.reward_model import RewardTrainConfig, reward_model, reward_train
from textrl.sft import SFTConfig, sft

MAX_NEW_TOKENS = 24
PROMPT_WORDS = 4
MARGIN = 0.2
"""Pairs whose labeller scores differ by less are dropped: too close to call, as a human rater would say."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/rlhf-pipeline", help="folder for the models, logs and summary.json")
    p.add_argument("--lm", default="tiny", help="the pretrained LM to start from")
    p.add_argument("--demos", type=int, default=3000, help="SFT demonstrations")
    p.add_argument("--sft-steps", type=int, default=200, help="SFT steps of 16 rows (about one epoch)")
    p.add_argument("--openings", type=int, default=3000, help="openings sampled twice for preference pairs")
    p.add_argument("--rm-epochs", type=int, default=1)
    p.add_argument("--rl-tokens", type=int, default=40_000, help="PPO budget in generated tokens")
    p.add_argument("--kl-coef", type=float, default=0.2, help="PPO's KL penalty to the SFT model")
    p.add_argument("--eval-prompts", type=int, default=96, help="held-out openings, each continued 4 times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return p.parse_args(argv)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def demonstrations(n: int, seed: int) -> list[dict]:
    """Corpus lines of the training split: the first words as prompt, the rest of the line as completion."""
    return [
        {"prompt": prompt, "completion": " " + rest}
        for prompt, rest in line_splits(n, PROMPT_WORDS, seed, split="train", min_words=8)
    ]


def preference_pairs(model, tokenizer, openings: list[str], labeller, seed: int) -> list[dict]:
    """Two completions of each opening; the labeller's higher-scored one is chosen (near-ties dropped)."""
    completions = generate(model, tokenizer, openings, max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=2, seed=seed)
    scores = labeller(completions=completions)
    pairs = []
    for i, prompt in enumerate(openings):
        (a, sa), (b, sb) = (completions[2 * i], scores[2 * i]), (completions[2 * i + 1], scores[2 * i + 1])
        if abs(sa - sb) < MARGIN or a == b:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def evaluate(model, tokenizer, prompts: list[str], rm, labeller, seed: int) -> dict[str, float]:
    """Mean learned reward and labeller score of 4 sampled completions per held-out prompt, and the share of
    completions that ended before the token limit (by eos)."""
    completions = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=4, seed=seed)
    repeated = [p for p in prompts for _ in range(4)]
    lengths = [len(tokenizer(c, add_special_tokens=False).input_ids) for c in completions]
    return {
        "learned_reward": float(np.mean(rm(prompts=repeated, completions=completions))) if rm is not None else None,
        "labeller": float(np.mean(labeller(completions=completions))),
        "ended": float(np.mean([n < MAX_NEW_TOKENS for n in lengths])),
        "example": repeated[0] + completions[0],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    runs = str(out / "runs")
    t0 = time.time()
    labeller = vader_sentiment()
    heldout = [p for p, _ in line_splits(args.eval_prompts, PROMPT_WORDS, args.seed + 1, split="heldout")]
    base, tokenizer = load_lm(args.lm)
    figures: dict = {"base": evaluate(base, tokenizer, heldout, None, labeller, args.seed)}

    # 1. supervised fine-tuning on demonstrations
    demos = write_jsonl(out / "data" / "demos.jsonl", demonstrations(args.demos, args.seed))
    sft_dir = out / "sft"
    s = sft(
        SFTConfig(
            lm=args.lm,
            data=str(demos),
            out=str(sft_dir),
            run_dir=runs,
            steps=args.sft_steps,
            batch_size=16,
            lr=2e-4,
            warmup_steps=20,
            eval_interval=100,
            save_interval=0,
            seed=args.seed,
            progress=False,
        )
    )
    figures["sft_heldout_loss"] = (s["heldout_loss_before"], s["heldout_loss_after"])
    sft_model, tokenizer = load_lm(sft_dir)

    # 2. preference pairs labelled by the labeller, and a reward model learned from them
    openings = line_openings(args.openings, PROMPT_WORDS, args.seed + 2, split="train")
    pairs = write_jsonl(
        out / "data" / "pairs.jsonl", preference_pairs(sft_model, tokenizer, openings, labeller, args.seed)
    )
    rm_dir = out / "reward_model"
    r = reward_train(
        RewardTrainConfig(
            lm=str(sft_dir),
            data=str(pairs),
            out=str(rm_dir),
            run_dir=runs,
            epochs=args.rm_epochs,
            batch_size=16,
            lr=2e-4,
            warmup_steps=10,
            eval_interval=50,
            seed=args.seed,
            progress=False,
        )
    )
    figures["pairs"] = r["pairs"]
    figures["rm_heldout_accuracy"] = (r["heldout_accuracy_before"], r["heldout_accuracy_after"])
    rm = reward_model(rm_dir)
    figures["sft"] = evaluate(sft_model, tokenizer, heldout, rm, labeller, args.seed)

    # 3. PPO on the learned reward, with a KL penalty to the SFT model
    env = TextGenEnv(lm=str(sft_dir), prompts=openings, reward=rm, max_new_tokens=MAX_NEW_TOKENS)
    config = PPOConfig(batch_size=32, minibatch_size=16, n_epochs=2, learning_rate=1e-4, kl_coef=args.kl_coef)
    agent = PPO(env, config=config, tensorboard_log=runs, seed=args.seed, verbose=0)
    stats: list[dict] = []
    agent.learn(total_timesteps=args.rl_tokens, callback=lambda _, s: stats.append(s))
    figures["rl_kl_to_sft"] = float(np.mean([s["rollout/kl_ref"] for s in stats[-5:]]))  # nats per episode
    figures["rl"] = evaluate(agent.policy.model, tokenizer, heldout, rm, labeller, args.seed)
    agent.save(out / "ppo")  # a textrl checkpoint: `textrl export OUT/ppo DIR` makes it a plain HF folder
    figures["rl_tokens"] = agent.num_timesteps
    figures["wall_clock_seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")

    rows = [("pretrained LM", figures["base"]), ("after SFT", figures["sft"]), ("after PPO", figures["rl"])]
    print(f"SFT held-out loss {s['heldout_loss_before']:.3f} -> {s['heldout_loss_after']:.3f}")
    print(
        f"reward model: {r['pairs']['train']} train / {r['pairs']['heldout']} held-out pairs, held-out accuracy "
        f"{r['heldout_accuracy_before']:.2f} -> {r['heldout_accuracy_after']:.2f}"
    )
    print(f"{'held-out openings':<16} {'learned reward':>15} {'labeller':>9} {'ended':>6}")
    for name, f in rows:
        learned = "-" if f["learned_reward"] is None else f"{f['learned_reward']:.3f}"
        print(f"{name:<16} {learned:>15} {f['labeller']:>9.3f} {f['ended']:>6.2f}")
    print(
        f"PPO: {agent.num_timesteps} tokens, KL to the SFT model {figures['rl_kl_to_sft']:.2f} nats per episode "
        f"(last 5 iterations); whole pipeline {figures['wall_clock_seconds']:.0f} s; files in {out}"
    )
    return figures


if __name__ == "__main__":
    main()
