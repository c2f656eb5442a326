"""Multi-turn rollout speed: tokens/s of a textrl rollout on a multi-turn env against a single-turn rollout of
the same total length, on the embedded ``tiny``.

Single turn: ``TextGenEnv`` with ``max_new_tokens = turns x (turn + reply)``. Multi-turn: ``MultiTurnEnv`` with
``turns`` agent turns of exactly ``turn`` tokens, each answered by a reply of exactly ``reply`` tokens (the
last turn ends the episode, so the last reply is not appended: the episode is ``reply`` tokens shorter). eos is
suppressed, so every episode has the same length. The policy reads a reply's tokens one per step, as it reads
its own actions; the env is not stepped meanwhile. Reported: rollout tokens/s counting every token the policy
read after the prompt (actions and replies), and counting actions alone. Runs alternate between the two envs,
``--repeats`` times; medians.

    python benchmarks/multiturn.py                  # B=16, 3 turns of 16 tokens, 16-token replies
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from agents import REINFORCE, REINFORCEConfig
from envs import MultiTurnEnv, TextGenEnv


def make_agents(batch: int, turns: int, turn: int, reply: int, seed: int):
    prompts = ["ROMEO:\n", "JULIET:\n", "The king", "My lord,"]
    single = TextGenEnv(lm="tiny", prompts=prompts, max_new_tokens=turns * (turn + reply))
    eos = single.tokenizer.eos_token_id
    filler = single.tokenizer.encode(" and", add_special_tokens=False)[:1] * reply

    def respond(state, text):
        return (filler, 0.0, state["turn"] == turns - 1)

    multi = MultiTurnEnv(lm="tiny", prompts=prompts, respond=respond, max_turns=turns, max_turn_tokens=turn)
    config = REINFORCEConfig(batch_size=batch, group_size=4, kl_coef=0.0, suppress_tokens=[eos])
    return {
        name: REINFORCE(env, config=config, seed=seed, verbose=0)
        for name, env in (("single", single), ("multi", multi))
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--turn", type=int, default=16)
    parser.add_argument("--reply", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    agents = make_agents(args.batch, args.turns, args.turn, args.reply, 0)
    times: dict[str, list[float]] = {name: [] for name in agents}
    counts: dict[str, tuple[int, int]] = {}
    for agent in agents.values():
        agent.collect()  # warm-up
    for _ in range(args.repeats):
        for name, agent in agents.items():
            t0 = time.perf_counter()
            rollout, _, _ = agent.collect()
            times[name].append(time.perf_counter() - t0)
            read = int(rollout.attention_mask[:, rollout.prompt_len :].sum())
            counts[name] = (read, int(rollout.action_mask.sum()))
    print(f"# Rollout on the embedded tiny, B={args.batch}, {args.threads} threads, medians of {args.repeats}")
    print(f"# multi-turn: {args.turns} turns of {args.turn} tokens, replies of {args.reply} tokens")
    print()
    print("| env | tokens read per episode | actions per episode | rollout ms | tokens/s (read) | actions/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in agents:
        seconds = statistics.median(times[name])
        read, acted = counts[name]
        label = "single turn" if name == "single" else "multi-turn"
        cells = [label, f"{read // args.batch}", f"{acted // args.batch}", f"{seconds * 1000:,.0f}"]
        cells += [f"{read / seconds:,.0f}", f"{acted / seconds:,.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
