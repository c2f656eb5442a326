"""Env steps per second: the natively batched TextGenVectorEnv against SyncVectorEnv over single TextGenEnv.

The policy is excluded: random actions are generated up front, so only the envs are timed. Both systems
run the same settings (prompts, trivial reward, ``max_new_tokens``, NEXT_STEP autoreset, copied
observations); measurements of the two are interleaved and the median over the repeats is reported.

    python benchmarks/env_steps.py                       # the full table (about 2 minutes)
    python benchmarks/env_steps.py --batch-sizes 1 4 --repeats 2 --seconds 0.05   # a quick smoke run
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from envs import DEFAULT_PROMPTS, TextGenEnv, TextGenVectorEnv
from textrl.rewards import immediate


def sequence_reward(completion_ids, **_):
    """Trivial sequence reward: the completion length."""
    return [float(len(c)) for c in completion_ids]


@immediate
def immediate_reward(new_token_ids):
    """Trivial immediate reward: 0 per token."""
    return np.zeros(len(new_token_ids))


REWARDS = {"sequence": sequence_reward, "immediate": immediate_reward}


def tokenizer_and_source():
    """The embedded model's tokenizer if it is there, else one trained on the fly."""
    from textrl.lm import LMNotFoundError, load_tokenizer

    try:
        return load_tokenizer("tiny"), "embedded tiny model"
    except LMNotFoundError:
        from textrl.pretrain import train_tokenizer

        text = [p + " the king and the night, my lord, what is love?" for p in DEFAULT_PROMPTS] * 20
        return train_tokenizer(text, vocab_size=1024), "a BPE tokenizer trained on the fly"


def steps_per_second(env, actions: np.ndarray, seconds: float) -> float:
    """Env steps (sub-env transitions) per second over at least ``seconds`` of stepping."""
    n, batch = actions.shape
    for t in range(4):  # warm up
        env.step(actions[t])
    steps, start = 0, time.perf_counter()
    while True:
        for _ in range(8):
            env.step(actions[steps % n])
            steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return steps * batch / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256], help="values of B")
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS), help="reward kinds")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per system (median reported)")
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum duration of one timed repeat")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="episode length limit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the envs and of the random actions")
    args = parser.parse_args(argv)

    tokenizer, source = tokenizer_and_source()
    rng = np.random.default_rng(args.seed)
    rows = []
    for kind in args.rewards:
        for batch in args.batch_sizes:
            kwargs = {
                "tokenizer": tokenizer,
                "prompts": DEFAULT_PROMPTS,
                "reward": REWARDS[kind],
                "max_new_tokens": args.max_new_tokens,
            }
            single = functools.partial(TextGenEnv, **kwargs)
            systems = {
                "native": TextGenVectorEnv(batch, autoreset_mode=AutoresetMode.NEXT_STEP, **kwargs),
                "sync": SyncVectorEnv([single] * batch, autoreset_mode=AutoresetMode.NEXT_STEP),
            }
            actions = rng.integers(0, len(tokenizer), (4 * args.max_new_tokens, batch))  # (steps, B), policy-free
            timings: dict[str, list[float]] = {name: [] for name in systems}
            for env in systems.values():
                env.reset(seed=args.seed)
            for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
                for name, env in systems.items():
                    timings[name].append(steps_per_second(env, actions, args.seconds))
            native, sync = (statistics.median(timings[name]) for name in ("native", "sync"))
            rows.append((kind, batch, native, sync, native / sync))
            for env in systems.values():
                env.close()

    print(f"Env steps/second (median of {args.repeats}, policy excluded; {source}, vocab {len(tokenizer)}, ", end="")
    print(f"max_new_tokens {args.max_new_tokens}, {len(DEFAULT_PROMPTS)} prompts)\n")
    print("| reward | B | TextGenVectorEnv | SyncVectorEnv of B TextGenEnv | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for kind, batch, native, sync, ratio in rows:
        print(f"| {kind} | {batch} | {native:,.0f} | {sync:,.0f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
