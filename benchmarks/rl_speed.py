"""Tokens/second of a full RL iteration and of the rollout alone: textrl's agents, a plain PyTorch loop, SB3.

Systems (``--systems``), all on the same model, prompts and reward:

- ``ppo``: textrl PPO with one optimisation step per batch (``n_epochs=1``, ``minibatch_size=B``);
- ``ppo-4epochs``: textrl PPO with its default epochs and minibatches (4 epochs of minibatches of 8);
- ``ppo-kl``: as ``ppo`` but with the default ``kl_coef`` (the reference model's batched pass included);
- ``reinforce``: textrl REINFORCE, RLOO baseline over groups of 4 samples of a prompt;
- ``plain``: a plain PyTorch loop: HF ``model.generate`` (KV cache) on left-padded prompts, the reward on the
  decoded text, then one REINFORCE update (log-probs from a full forward with grad, ``-(logp * (R - mean
  R)).mean()``, one Adam step; with a KL coefficient (``peers.py``), a frozen reference copy's forward too
  and GRPO's KL term in the loss);
- ``sb3``: stable-baselines3 PPO run naively over the token env: ``DummyVecEnv`` of B ``TextGenEnv``, a
  features extractor that runs the model's trunk (GPT-2's ``transformer``) over the whole observation at every
  step (no KV cache), ``net_arch=[]`` so the action net is a ``Linear(E, V)`` head (initialised from the LM head), one
  rollout of ``n_steps=T`` and one epoch of one minibatch per ``learn()``;
- ``sb3-policy``: the same SB3 PPO set-up with :class:`agents.sb3.TransformerActorCriticPolicy`: the LM head
  is the action net, and during rollouts the trunk runs through the prefix KV cache (one token per row and
  step instead of the whole prefix); the update is SB3's full forward over its minibatch, as for ``sb3``.

Workload: the embedded model ``tiny`` when it is there, else a randomly initialised GPT-2 of the same shape
(4 layers, width 256, 4 heads, 256 positions) with a 4,096-token BPE tokenizer trained on the fly; 64 prompts
of exactly 8 tokens, B drawn per iteration; exactly 32 new tokens per prompt at temperature 1; a cheap
sequence reward (the fraction of the completion's words that are "the"); ``kl_coef=0`` unless noted.
EOS cannot end an episode early in any system: textrl's agents run with ``suppress_tokens=[eos]`` (never
sampled, and removed from the distribution trained on), the others with ``min_new_tokens`` of ``generate``
or a hook on SB3's action net,
so every iteration generates exactly B x 32 tokens, which the benchmark checks.

Measurement: each (system, batch) run is a subprocess of its own (so its peak RSS, ``ru_maxrss``, is its
own; the RSS after set-up, before any iteration, is printed beside it); runs are interleaved round-robin
over the repeats so drifts in machine load hit every system alike. A run builds its system, warms up with
one iteration and one rollout, then times ``--iters`` full iterations and rollouts alternately
(``--sb3-iters`` for SB3); the table reports the median over repeats of each run's median, and every
row's ratio to ``ppo`` at the same batch size. "Rollout" is everything before the update: generation, env
steps and reward (for ``ppo-kl`` also the reference pass); "iteration" adds the update (for textrl: one
``agent.learn`` iteration). Both SB3 systems run only up to ``--sb3-max-batch`` (16): one naive iteration takes
~15 s at B=16 on one core and its single 512-sequence minibatch peaks at ~3.7 GB; B=64 would be ~4x both.

    python benchmarks/rl_speed.py                      # the full table (about 7 minutes on 2 cores)
    python benchmarks/rl_speed.py --tiny-random --batch-sizes 4 --iters 1 --repeats 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LEARNING_RATE = 5e-5
"""Adam learning rate of every system (textrl's default)."""

SYSTEMS = {
    "ppo": "textrl PPO (1 epoch, 1 minibatch)",
    "ppo-4epochs": "textrl PPO (default 4 epochs, minibatch min(8, B))",
    "ppo-kl": "textrl PPO (1 epoch, default kl_coef: reference pass)",
    "reinforce": "textrl REINFORCE (RLOO, group 4)",
    "plain": "PyTorch loop: HF generate + REINFORCE",
    "sb3": "SB3 PPO over TextGenEnv (no KV cache)",
    "sb3-policy": "SB3 PPO + TransformerActorCriticPolicy (prefix cache)",
}
"""System name (``--systems``) -> table label."""
SB3_SYSTEMS = {"sb3", "sb3-policy"}
"""The SB3 systems: their update is a full forward over B x T observations, so ``--sb3-max-batch`` and
``--sb3-iters`` apply to both."""


@dataclass
class Workload:
    """What every system runs on; written to ``workload.json`` for the subprocesses."""

    lm: str
    """Model folder."""
    source: str
    """Where the model came from (printed)."""
    prompts: list[str]
    """Prompts of exactly ``prompt_tokens`` tokens each."""
    prompt_tokens: int
    """P."""
    new_tokens: int
    """T, generated per prompt."""


def the_fraction(completions: list[str], **_) -> list[float]:
    """Cheap sequence reward: the fraction of the completion's words that are "the".

    >>> the_fraction(completions=["The cat and the dog", ""])
    [0.4, 0.0]
    """
    out = []
    for text in completions:
        words = text.lower().split()
        out.append(words.count("the") / len(words) if words else 0.0)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (``getrusage(RUSAGE_SELF).ru_maxrss``)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux


# --- the workload ---------------------------------------------------------------------------------------


def _pseudo_english(n_docs: int, seed: int = 0) -> list[str]:
    """Documents from a small grammar: a corpus for the tiny test model, or when no packaged corpus is there."""
    rng = random.Random(seed)
    nouns = ["king", "queen", "knight", "horse", "river", "castle", "garden", "sword", "letter", "crown"]
    adjs, verbs = ["old", "young", "brave", "quiet", "golden", "dark"], ["sees", "finds", "loves", "follows"]

    def sentence() -> str:
        return f"The {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)} at dawn."

    return ["\n".join(sentence() for _ in range(5)) for _ in range(n_docs)]


def make_prompts(tokenizer, docs: list[str], n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` distinct lines cut to exactly ``length`` tokens (checked to re-encode to the same tokens); when too
    few lines are that long (long prompts), passages of consecutive lines joined by spaces.

    Tokens that the tokenizer adds itself (a Llama tokenizer's bos) count, and are left out of the text."""
    lines = [line.strip() for doc in docs for line in doc.splitlines() if len(line.strip()) > 20]
    random.Random(seed).shuffle(lines)
    words = " ".join(docs).split()  # consecutive lines (across documents, which may be short) joined by spaces
    passages = [" ".join(words[i : i + 3 * length]) for i in range(0, len(words), 3 * length)]  # 3 words a token
    random.Random(seed).shuffle(passages)
    candidates = [line for line in lines if len(line) >= length] + passages  # shorter lines: (nearly) too few tokens
    prompts: list[str] = []
    for i in range(0, len(candidates), 1024):  # encoded a batch at a time (one call each)
        chunk = candidates[i : i + 1024]
        for ids in tokenizer(chunk)["input_ids"]:
            ids = ids[:length]
            if len(ids) < length:
                continue
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if tokenizer(text)["input_ids"] == ids and text not in prompts:
                prompts.append(text)
                if len(prompts) == n:
                    return prompts
    raise RuntimeError(f"found only {len(prompts)} prompts of {length} tokens")


def build_workload(folder: Path, tiny_random: bool, prompt_tokens: int, new_tokens: int, seed: int) -> Workload:
    """The embedded ``tiny`` model if present, else a random GPT-2 of its shape saved into ``folder``."""
    import torch
    from transformers.utils import logging

    from textrl import corpus
    from textrl.lm import EMBEDDED_MODELS, load_tokenizer
    from textrl.pretrain import PretrainConfig, build_model, save_model, train_tokenizer

    logging.disable_progress_bar()  # "Writing model shards" bars
    if tiny_random:
        docs = _pseudo_english(200, seed)
        cfg = PretrainConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=2, context_length=64)
        source = "a tiny random GPT-2 (2 layers, width 32, vocab 300; --tiny-random)"
    else:
        try:
            docs = corpus.load_documents()
        except corpus.CorpusError:
            docs = _pseudo_english(2000, seed)
        cfg = PretrainConfig()  # the embedded model's shape: 4 layers, width 256, 4 heads, vocab 4096, 256 positions
        source = "a random GPT-2 of the embedded model's shape (4 layers, width 256, 4 heads, 256 positions)"
    if not tiny_random and (EMBEDDED_MODELS["tiny"] / "config.json").is_file():
        lm, tokenizer = str(EMBEDDED_MODELS["tiny"]), load_tokenizer("tiny")
        source = "the embedded model `tiny`"
    else:
        tokenizer = train_tokenizer(docs[::4], cfg.vocab_size)  # every 4th document: ~1 s, and enough text
        torch.manual_seed(seed)
        save_model(build_model(cfg, tokenizer), tokenizer, folder / "model")
        lm = str(folder / "model")
        source += f" with a {len(tokenizer)}-token BPE tokenizer trained on the fly"
    prompts = make_prompts(tokenizer, docs, 64, prompt_tokens, seed)
    return Workload(lm, source, prompts, prompt_tokens, new_tokens)


# --- the systems: each builds a runner with iteration() and rollout(), both returning tokens generated ----


class TextRLRunner:
    """A textrl agent: an iteration is one ``learn()`` iteration, a rollout is ``collect()``."""

    def __init__(
        self,
        system: str,
        work: Workload,
        batch: int,
        seed: int,
        kl_coef: float | None = None,
        lora_rank: int = 0,
        device: str = "cpu",
        dtype=None,
        overrides: dict | None = None,
    ):
        """``kl_coef`` (when given) replaces the system's own KL coefficient (0, or the default for ``ppo-kl``);
        ``lora_rank > 0`` trains LoRA adapters of that rank (alpha 2 x rank, every linear layer of the blocks)
        instead of every weight; ``device`` and ``dtype`` (a ``torch.dtype``; None: float32) place the policy;
        ``overrides``: further config fields (e.g. ``decode_step``)."""
        from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
        from envs import TextGenEnv
        from textrl.runtime import Runtime

        env = TextGenEnv(lm=work.lm, prompts=work.prompts, reward=the_fraction, max_new_tokens=work.new_tokens)
        kl = kl_coef if kl_coef is not None else PPOConfig().kl_coef if system == "ppo-kl" else 0.0
        # eos is never sampled (and removed from the distribution trained on): every episode is exactly
        # new_tokens long, as with generate(min_new_tokens=...) in the other systems
        eos = env.engine.tokenizer.eos_token_id
        common = {"batch_size": batch, "learning_rate": LEARNING_RATE, "device": device, "kl_coef": kl}
        common["suppress_tokens"] = [eos]
        if lora_rank > 0:  # lora_targets: the default, all-linear (not the LM head)
            common |= {"lora_rank": lora_rank, "lora_alpha": 2.0 * lora_rank}
        common |= overrides or {}
        place = {"runtime": Runtime.local(device, dtype)} if dtype is not None else {}
        if system in ("ppo", "ppo-kl"):
            config = PPOConfig(**common, n_epochs=1, minibatch_size=batch)
            agent = PPO(env, config=config, seed=seed, verbose=0, **place)
        elif system == "ppo-4epochs":
            config = PPOConfig(**common, minibatch_size=min(PPOConfig().minibatch_size, batch))
            agent = PPO(env, config=config, seed=seed, verbose=0, **place)
        elif system == "reinforce":
            config = REINFORCEConfig(**common, group_size=4, baseline="rloo")
            agent = REINFORCE(env, config=config, seed=seed, verbose=0, **place)
        else:
            raise ValueError(system)
        self.agent = agent

    def iteration(self) -> int:
        before = self.agent.num_timesteps
        self.agent.learn(1, reset_num_timesteps=False)  # exactly one iteration
        return self.agent.num_timesteps - before

    def rollout(self) -> int:
        rollout, _, _ = self.agent.collect()
        return int(rollout.action_mask.sum())


class PlainRunner:
    """A plain PyTorch loop: HF ``generate`` with KV cache, reward, one REINFORCE step with Adam."""

    def __init__(self, work: Workload, batch: int, seed: int, device: str = "cpu", dtype=None, kl_coef: float = 0.0):
        """``device`` and ``dtype`` (a ``torch.dtype``; None: float32) place the model (and Adam's state);
        ``kl_coef > 0``: a frozen copy of the model is the reference, and the loss adds ``kl_coef`` times the
        per-token KL estimate ``exp(r - l) - (r - l) - 1`` (r, l: reference and policy log-probs of the sampled
        tokens), as GRPO's loss does: one forward of the reference per iteration."""
        import torch

        from textrl.lm import load_lm

        torch.manual_seed(seed)
        self.device = torch.device(device)
        place = {"device": self.device} | ({"dtype": dtype} if dtype is not None else {})
        self.model, self.tokenizer = load_lm(work.lm, **place)  # eval mode: no dropout, as in textrl
        self.kl_coef, self.reference = kl_coef, None
        if kl_coef > 0:
            self.reference, _ = load_lm(work.lm, **place)
            self.reference.requires_grad_(False)
        self.tokenizer.padding_side = "left"
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE, eps=1e-5)
        self.work, self.batch, self.rng = work, batch, np.random.default_rng(seed)
        self.eos = torch.tensor([self.tokenizer.eos_token_id], device=self.device)

    def _generate(self):
        import torch

        prompts = [self.work.prompts[i] for i in self.rng.integers(len(self.work.prompts), size=self.batch)]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        T = self.work.new_tokens
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,  # the full distribution, as textrl samples it
                top_p=1.0,
                max_new_tokens=T,
                min_new_tokens=T,  # sets the eos logit to -inf at every step: exactly T tokens
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )  # (B, P + T)
        P = enc["input_ids"].shape[1]
        completions = self.tokenizer.batch_decode(out[:, P:], skip_special_tokens=True)
        rewards = torch.tensor(the_fraction(prompts=prompts, completions=completions), device=self.device)  # (B,)
        return enc, out, rewards

    def rollout(self) -> int:
        enc, out, _ = self._generate()
        return out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])

    def iteration(self) -> int:
        import torch
        import torch.nn.functional as F

        enc, out, rewards = self._generate()
        P = enc["input_ids"].shape[1]
        mask = torch.cat([enc["attention_mask"], torch.ones_like(out[:, P:])], dim=1)  # (B, S)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: count positions from the first token

        def logprobs(model):  # (B, T) of the sampled tokens, under the distribution they were sampled from
            logits = model(input_ids=out, attention_mask=mask, position_ids=positions).logits[:, P - 1 : -1]
            logits = logits.index_fill(-1, self.eos, float("-inf"))  # (B, T, V)
            return F.log_softmax(logits, dim=-1).gather(-1, out[:, P:, None]).squeeze(-1)

        logp = logprobs(self.model)
        loss = -(logp * (rewards - rewards.mean())[:, None]).mean()
        if self.reference is not None:
            with torch.no_grad():
                ref = logprobs(self.reference)
            diff = ref - logp
            loss = loss + self.kl_coef * (torch.exp(diff) - diff - 1).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.shape[0] * (out.shape[1] - P)


class SB3Runner:
    """stable-baselines3 PPO over a ``DummyVecEnv`` of B ``TextGenEnv``.

    ``cached=False``: the naive features extractor, re-reading the prefix every step; ``cached=True``:
    :class:`agents.sb3.TransformerActorCriticPolicy` with its prefix KV cache.
    """

    def __init__(self, work: Workload, batch: int, seed: int, cached: bool = False):
        import torch
        from stable_baselines3 import PPO
        from stable_baselines3.common.callbacks import CallbackList
        from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
        from stable_baselines3.common.vec_env import DummyVecEnv

        from envs import TextGenEnv
        from textrl.lm import load_lm, load_tokenizer

        class Trunk(BaseFeaturesExtractor):
            """The HF trunk (GPT-2's ``transformer``, Llama's ``model``, ...) over the full (right-padded)
            observation; the last valid position's state."""

            def __init__(self, observation_space, lm: str):
                model, _ = load_lm(lm)
                super().__init__(observation_space, features_dim=model.config.hidden_size)
                self.trunk = model.base_model
                head = model.get_output_embeddings().weight
                self.lm_head_weight = head.detach().clone()  # (V, E), to initialise the action net

            def forward(self, obs):
                ids, mask = obs["input_ids"].long(), obs["attention_mask"].long()  # SB3 hands Box obs as floats
                hidden = self.trunk(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, C, E)
                return hidden[torch.arange(len(ids)), mask.sum(1) - 1]  # (N, E)

        tokenizer = load_tokenizer(work.lm)
        make = functools.partial(
            TextGenEnv,
            lm=work.lm,
            tokenizer=tokenizer,
            prompts=work.prompts,
            reward=the_fraction,
            max_new_tokens=work.new_tokens,
        )
        self.steps = work.new_tokens
        if cached:
            from agents.sb3 import TransformerActorCriticPolicy

            policy_class, policy_kwargs = TransformerActorCriticPolicy, {"lm": work.lm}
        else:
            policy_class = "MultiInputPolicy"
            policy_kwargs = {
                "features_extractor_class": Trunk,
                "features_extractor_kwargs": {"lm": work.lm},
                "net_arch": [],
                "ortho_init": False,
            }
        self.model = PPO(
            policy_class,
            DummyVecEnv([make] * batch),
            learning_rate=LEARNING_RATE,
            n_steps=self.steps,
            batch_size=batch * self.steps,
            n_epochs=1,
            policy_kwargs=policy_kwargs,
            device="cpu",
            seed=seed,
            verbose=0,
        )
        policy = self.model.policy
        if not cached:
            with torch.no_grad():  # the action net starts as the LM head, so the policy is the same LM
                policy.action_net.weight.copy_(policy.features_extractor.lm_head_weight)
                policy.action_net.bias.zero_()
        eos = torch.tensor([tokenizer.eos_token_id])
        policy.action_net.register_forward_hook(lambda _m, _i, logits: logits.index_fill(-1, eos, float("-inf")))
        self.callback = CallbackList([])
        self.callback.init_callback(self.model)
        self.batch = batch

    def iteration(self) -> int:
        self.model.learn(total_timesteps=self.steps * self.batch)  # resets the envs; one rollout + one train()
        return self.steps * self.batch

    def rollout(self) -> int:
        self.model.collect_rollouts(self.model.env, self.callback, self.model.rollout_buffer, self.steps)
        return self.steps * self.batch


def build_runner(system: str, work: Workload, batch: int, seed: int):
    if system == "plain":
        return PlainRunner(work, batch, seed)
    if system in ("sb3", "sb3-policy"):
        return SB3Runner(work, batch, seed, cached=system == "sb3-policy")
    return TextRLRunner(system, work, batch, seed)


def measure(system: str, work: Workload, batch: int, iters: int, threads: int, seed: int) -> dict:
    """Build one system, warm up, time ``iters`` iterations and rollouts (alternately); tokens/second."""
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" bars
    if threads:
        torch.set_num_threads(threads)
    runner = build_runner(system, work, batch, seed)
    rss_setup = peak_rss_mb()  # imports, model(s), env(s), before any iteration
    expected = batch * work.new_tokens
    full: list[float] = []
    rollout: list[float] = []
    for i in range(iters + 1):  # the first of each is the warm-up
        for kind, fn, out in (("iteration", runner.iteration, full), ("rollout", runner.rollout, rollout)):
            start = time.perf_counter()
            tokens = fn()
            elapsed = time.perf_counter() - start
            if tokens != expected:
                raise RuntimeError(f"{system} {kind} generated {tokens} tokens, expected B x T = {expected}")
            if i:
                out.append(tokens / elapsed)
    return {
        "system": system,
        "batch": batch,
        "iteration": full,
        "rollout": rollout,
        "rss_setup_mb": rss_setup,
        "rss_peak_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def run(system: str, batch: int, args, workdir: Path, work: Workload) -> dict:
    """One measurement, in its own subprocess (or in this process with ``--in-process``)."""
    iters = args.sb3_iters if system in SB3_SYSTEMS else args.iters
    if args.in_process:
        return measure(system, work, batch, iters, args.threads, args.seed)
    command = [sys.executable, __file__, "--worker", system, "--batch", str(batch), "--workdir", str(workdir)]
    command += ["--iters", str(iters), "--threads", str(args.threads), "--seed", str(args.seed)]
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode:
        raise RuntimeError(f"{system} at batch {batch} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the table ------------------------------------------------------------------------------------------


def versions() -> str:
    names = ["torch", "transformers", "gymnasium", "stable-baselines3"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def print_table(results: dict, args, work: Workload, skipped_sb3: list[int], threads: set[int]) -> None:
    """The header (workload, versions, threads) and one markdown row per (system, batch)."""
    runs = "all runs in one process" if args.in_process else "one subprocess per run"
    print(f"Generated tokens/second: median over {args.repeats} run(s) of the median of {args.iters} timed ", end="")
    print(f"iteration(s) ({args.sb3_iters} for SB3) after one warm-up; {runs}")
    print(f"Model: {work.source}; {len(work.prompts)} prompts of {work.prompt_tokens} tokens, B drawn per ", end="")
    print(f'iteration; exactly {work.new_tokens} new tokens (eos suppressed); temperature 1; reward: fraction of "the"')
    print(f"{versions()}; torch threads {', '.join(map(str, sorted(threads)))}; {os.cpu_count()} CPUs\n")
    print("| system | B | iteration tok/s | vs PPO | rollout tok/s | vs PPO | peak RSS MB | RSS after set-up MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        base = results.get(("ppo", batch))
        for system in args.systems:
            r = results.get((system, batch))
            if r is None:
                continue
            cells = [SYSTEMS[system], str(batch)]
            for kind in ("iteration", "rollout"):
                cells += [f"{r[kind]:,.0f}", f"{r[kind] / base[kind]:.2f}x" if base else "-"]
            for kind in ("rss_peak_mb", "rss_setup_mb"):
                cells.append("-" if args.in_process else f"{r[kind]:,.0f}")
            print("| " + " | ".join(cells) + " |")
    if skipped_sb3:
        print(
            f"\nSB3 PPO was not run at batch {', '.join(map(str, skipped_sb3))}: the naive system's training pass ",
            end="",
        )
        print(
            "re-reads every prefix (B x T full forwards), too slow for the default budget (the prefix-cache policy "
            f"runs about B); pass --sb3-max-batch {max(skipped_sb3)}."
        )
    if args.in_process:
        print("\nPeak RSS is not reported with --in-process (all systems share one process).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], help="values of B")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS), help="what to run")
    parser.add_argument("--repeats", type=int, default=3, help="runs (subprocesses) per system and batch size")
    parser.add_argument("--iters", type=int, default=2, help="timed iterations (and rollouts) per run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--sb3-max-batch", type=int, default=16, help="largest B at which SB3 PPO is run")
    parser.add_argument("--sb3-iters", type=int, default=1, help="timed iterations per SB3 run (~15 s each at B=16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="T, tokens generated per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="P, tokens per prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, prompts and sampling")
    parser.add_argument("--tiny-random", action="store_true", help="a tiny random model instead (for tests)")
    parser.add_argument("--in-process", action="store_true", help="run every system in this process (no RSS)")
    parser.add_argument("--worker", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # a subprocess: one measurement, printed as JSON
        work = Workload(**json.loads((args.workdir / "workload.json").read_text()))
        print(json.dumps(measure(args.worker, work, args.batch, args.iters, args.threads, args.seed)))
        return

    with tempfile.TemporaryDirectory(prefix="textrl-bench-") as tmp:
        workdir = Path(tmp)
        work = build_workload(workdir, args.tiny_random, args.prompt_tokens, args.new_tokens, args.seed)
        (workdir / "workload.json").write_text(json.dumps(asdict(work)))
        jobs = [
            (system, batch)
            for batch in args.batch_sizes
            for system in args.systems
            if system not in SB3_SYSTEMS or batch <= args.sb3_max_batch
        ]
        skipped_sb3 = [b for b in args.batch_sizes if SB3_SYSTEMS & set(args.systems) and b > args.sb3_max_batch]
        runs: dict[tuple[str, int], list[dict]] = {job: [] for job in jobs}
        for _ in range(args.repeats):  # round-robin, so drifts in machine load hit every system alike
            for system, batch in jobs:
                runs[system, batch].append(run(system, batch, args, workdir, work))
    results = {
        job: {
            "iteration": statistics.median(statistics.median(r["iteration"]) for r in rs),
            "rollout": statistics.median(statistics.median(r["rollout"]) for r in rs),
            "rss_peak_mb": max(r["rss_peak_mb"] for r in rs),
            "rss_setup_mb": max(r["rss_setup_mb"] for r in rs),
        }
        for job, rs in runs.items()
    }
    threads = {r["threads"] for rs in runs.values() for r in rs}
    print_table(results, args, work, skipped_sb3, threads)


if __name__ == "__main__":
    main()
