"""What every textrl agent shares: config, env and policy set-up, the learn loop, saving and loading.

An agent subclass only says how to turn a rollout into a parameter update (``train``), like SB3's split of
``collect_rollouts()`` from ``train()``. The loop is: draw prompts (in groups), collect a rollout through
the KV-cached policy, score the reference log-probs in one batched pass, subtract the per-token KL
penalty, ``train``, update the KL coefficient, log, checkpoint.

Guarded training: NaN/inf in the KL penalty, the rewards, values, advantages/returns, a loss or the
gradients stops the run with a :class:`NonFiniteError` naming what was non-finite and where, before that
update is applied and before anything is saved (``nonfinite="raise"``), or discards the batch and counts
it in ``charts/skipped_batches`` (``nonfinite="skip"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import secrets
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from textrl import checkpoint as ckpt
from textrl.advantages import KLController, kl_penalty
from textrl.config import to_jsonable
from textrl.device import resolve_device
from textrl.interrupt import StopRequest, TrainingInterrupted
from textrl.logger import RunLogger, new_run_dir, run_name
from textrl.policy import ActorCritic, action_logprobs, sample, shape_logits
from textrl.rollout import Rollout, Sampling, collect_rollout, decode, left_pad


@dataclass
class AgentConfig:
    """Settings shared by all agents."""

    batch_size: int = 16
    """Episodes per iteration (the vector env's sub-envs)."""
    group_size: int = 1
    """Samples of each prompt per iteration (consecutive rows); batch_size must be a multiple."""
    learning_rate: float = 1e-4
    """Adam learning rate (1e-4 suits the embedded 4M-parameter model; larger LMs want less)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    gamma: float = 1.0
    """Discount over token steps."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient (initial value when adaptive); 0 drops the reference model."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """KL estimator for the penalty: k1 = log p - log q, k3 = (q/p - 1) - log(q/p)."""
    kl_target: float | None = None
    """Target KL per episode for the adaptive controller (Ziegler et al.); None = fixed coefficient."""
    kl_horizon: int = 10000
    """Horizon (in episodes) of the adaptive KL controller."""
    temperature: float = 1.0
    """Sampling temperature during rollouts."""
    top_k: int = 0
    """Top-k sampling during rollouts (0 = off)."""
    top_p: float = 1.0
    """Top-p sampling during rollouts (1.0 = off)."""
    suppress_tokens: list[int] = dataclasses.field(default_factory=list)
    """Token ids never sampled, in rollouts and generate() (e.g. eos: every completion runs to max_new_tokens);
    removed from the distribution trained on and from the reference's too."""
    replay_memory_mb: float = 4096.0
    """Largest rollout record (the activations kept so the update can skip its forward matmuls), in MB; a
    rollout that needs more computes the update's forward instead (0 = never record)."""
    value_model: Literal["shared", "separate"] = "shared"
    """Value head on the policy trunk, or on a separate copy of the LM."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."""
    autocast: Literal["none", "bf16", "fp16"] = "none"
    """Mixed-precision autocast for forwards (off on CPU by default)."""
    log_interval: int = 1
    """Iterations between TensorBoard scalar writes."""
    eval_interval: int = 0
    """Iterations between evaluations on held-out prompts, greedy and sampled, logged under eval/ (0 = off)."""
    eval_prompts: str | None = None
    """Held-out prompts for evaluation: a .txt (one per line) or .jsonl file, as the env takes; None = the env's."""
    eval_episodes: int = 32
    """Prompts per evaluation (the first ones of the evaluation set; each is completed greedily and sampled)."""
    sample_interval: int = 10
    """Iterations between sample-completion text logs."""
    checkpoint_interval: int = 0
    """Iterations between checkpoints during learn() (0 = only at the end, when a folder is set)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    nonfinite: Literal["raise", "skip"] = "raise"
    """On NaN/inf in rewards, advantages, a loss or gradients: stop with an error, or skip the batch (counted)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}: {f.name} must be a finite number, got {value}")
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.group_size >= 1, "group_size must be >= 1"),
            (self.batch_size % self.group_size == 0, "batch_size must be a multiple of group_size"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            (0.0 <= self.gamma <= 1.0, "gamma must be in [0, 1]"),
            (self.kl_coef >= 0, "kl_coef must be >= 0"),
            (self.kl_estimator in ("k1", "k3"), "kl_estimator must be 'k1' or 'k3'"),
            (self.kl_target is None or self.kl_target > 0, "kl_target must be > 0 (or None)"),
            (self.kl_horizon >= 1, "kl_horizon must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (all(isinstance(t, int) and t >= 0 for t in self.suppress_tokens), "suppress_tokens must be ids >= 0"),
            (self.replay_memory_mb >= 0, "replay_memory_mb must be >= 0"),
            (self.value_model in ("shared", "separate"), "value_model must be 'shared' or 'separate'"),
            (self.autocast in ("none", "bf16", "fp16"), "autocast must be 'none', 'bf16' or 'fp16'"),
            (self.log_interval >= 1, "log_interval must be >= 1"),
            (self.eval_interval >= 0, "eval_interval must be >= 0"),
            (self.eval_episodes >= 1, "eval_episodes must be >= 1"),
            (self.sample_interval >= 0, "sample_interval must be >= 0"),
            (self.checkpoint_interval >= 0, "checkpoint_interval must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.nonfinite in ("raise", "skip"), "nonfinite must be 'raise' or 'skip'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {message}")
        resolve_device(self.device)  # an unknown device, or one this machine lacks, fails before anything loads


class NonFiniteError(FloatingPointError):
    """NaN/inf in rewards, values, advantages, a loss or gradients; the message says which and where."""


class SkipBatch(Exception):
    """Raised inside an iteration to discard its batch (``nonfinite="skip"``); caught by ``learn``."""


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary (token -> id), to tell whether a checkpoint fits an env."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()


def make_vector_env(env, batch_size: int):
    """A :class:`envs.TextGenVectorEnv` with ``batch_size`` rows from an env, a vector env or an id."""
    import envs  # noqa: F401  (registers the ids)
    from envs import TextGenEnv, TextGenVectorEnv

    if isinstance(env, str):
        try:
            return gym.make_vec(env, num_envs=batch_size, vectorization_mode="vector_entry_point")
        except gym.error.Error as e:
            raise ValueError(f"cannot make a textrl vector env from {env!r}: {e}") from None
    base = env.unwrapped if isinstance(env, gym.Env) else env
    if isinstance(base, TextGenVectorEnv):
        return base
    if isinstance(base, TextGenEnv):
        return TextGenVectorEnv(num_envs=batch_size, **base.init_kwargs)
    raise TypeError(f"env must be a TextGenEnv, a TextGenVectorEnv or a registered id, got {type(env).__name__}")


def _bump_versions(optimizer: torch.optim.Optimizer, *_) -> None:
    """Mark every parameter of ``optimizer`` as changed in place (an optimizer step post-hook)."""
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


class BaseAgent:
    """Common machinery; subclasses set ``name``, ``config_class`` and implement :meth:`train`."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[AgentConfig]] = AgentConfig

    def __init__(
        self,
        env,
        lm: str | Path | None = None,
        config: AgentConfig | None = None,
        tensorboard_log: str | Path | None = None,
        seed: int | None = None,
        verbose: int = 1,
    ):
        from textrl.lm import load_lm

        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config.validate()
        self.env_id = env if isinstance(env, str) else getattr(getattr(env, "spec", None), "id", None) or "TextGen"
        self.env = make_vector_env(env, self.config.batch_size)
        if self.env.num_envs != self.config.batch_size:  # a vector env passed in sets the batch size
            self.config = dataclasses.replace(self.config, batch_size=self.env.num_envs)
            self.config.validate()
        self.lm = str(lm if lm is not None else self.env.init_kwargs.get("lm", "tiny"))
        self.device = resolve_device(self.config.device)
        model, self.tokenizer = load_lm(self.lm, device=self.device)
        n_actions = self.env.single_action_space.n
        model_vocab = model.get_output_embeddings().weight.shape[0]
        if model_vocab < n_actions:
            raise ValueError(
                f"the policy LM {self.lm!r} has {model_vocab} output tokens but the env's action space has "
                f"{n_actions}: the model does not fit the env's tokenizer (use the env's own LM)"
            )
        bad = [t for t in self.config.suppress_tokens if t >= n_actions]
        if bad or len(set(self.config.suppress_tokens)) >= n_actions:
            what = f"token id {bad[0]} is outside the env's {n_actions} actions" if bad else "every token is suppressed"
            raise ValueError(f"{type(self.config).__name__}: suppress_tokens: {what}")
        use_ref = self.config.kl_coef > 0 or self.config.kl_target is not None
        self.policy = ActorCritic(model, self.config.value_model, reference=use_ref).to(self.device)
        self.policy.replay_memory_mb = self.config.replay_memory_mb
        # fused: one kernel over all parameters (3.5 ms a step instead of 15 ms for the per-tensor loop on CPU)
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(
            self.policy.trainable_parameters(), lr=self.config.learning_rate, eps=1e-5, fused=fused
        )
        # the fused kernel updates parameters without bumping their autograd version counters, which is how
        # the policy's cores tell that a rollout record (replay) is stale: bump them
        self.optimizer.register_step_post_hook(_bump_versions)
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        self.np_rng = np.random.default_rng(seed)
        self.kl_ctl = KLController(self.config.kl_coef, self.config.kl_target, self.config.kl_horizon)
        self.sampling = Sampling(
            self.config.temperature, self.config.top_k, self.config.top_p, tuple(self.config.suppress_tokens)
        )
        self.num_timesteps = 0
        self.iteration = 0
        self.skipped_batches = 0
        self.verbose = verbose
        self.tensorboard_log = tensorboard_log
        self.run_dir: Path | None = None
        self.logger: RunLogger | None = None
        self.train_config: dict[str, Any] | None = None
        """How ``textrl train`` started this run (env spec and keywords, budget, seed), saved with every
        checkpoint so that ``--resume`` rebuilds the same run from the checkpoint alone; None from Python."""
        self._saved: tuple[Path, int] | None = None  # (folder, num_timesteps) of the last checkpoint written
        self._log_interval = self.config.log_interval  # learn(log_interval=) overrides it for one call
        self._eval_env = None  # built on the first evaluation
        if not self.env.engine.rewards.names:
            warnings.warn(
                "the env has no reward: every episode scores 0, so training has nothing to learn from; give the "
                "env a reward (e.g. reward='keyword_reward', or --env-kwargs '{\"reward\": \"keyword_reward\"}')",
                UserWarning,
                stacklevel=2,
            )

    # --- subclass hook ---------------------------------------------------------------------------------

    def train(self, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        """Update the policy from a rollout with KL-penalised per-token ``rewards`` (B, T); return stats."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """JSON-able agent-specific state saved in checkpoints (e.g. a moving-average baseline)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # --- helpers for subclasses ------------------------------------------------------------------------

    def autocast(self):
        if self.config.autocast == "none":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def logprobs_and_entropy(self, logits: torch.Tensor, actions: torch.Tensor):
        """Log-probs (B, T) of ``actions`` and entropies (B, T) under the *sampling* distribution."""
        n = self.env.single_action_space.n
        suppressed = self.sampling.suppress_tokens
        if self.config.ent_coef == 0:
            # The entropy is then only logged: computed outside the graph, the backward skips its
            # full-vocabulary passes (-10% of the update at B=16); its gradient would be 0 * dH.
            # Suppressed tokens are removed chunk by chunk inside (no (B, T, V) copy of the logits).
            shaped = shape_logits(logits[..., :n].float(), **{**vars(self.sampling), "suppress_tokens": ()})
            return action_logprobs(shaped, actions, entropy=True, suppress_tokens=suppressed)
        shaped = shape_logits(logits[..., :n].float(), **vars(self.sampling))
        logp = F.log_softmax(shaped, dim=-1)  # (B, T, V)
        p = logp.exp()
        entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
        return logp.gather(-1, actions[..., None]).squeeze(-1), entropy

    def nonfinite(self, message: str) -> NoReturn:
        """Stop (``nonfinite="raise"``: :class:`NonFiniteError`) or discard this batch (``"skip"``)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.nonfinite == "skip":
            raise SkipBatch(message)
        raise NonFiniteError(
            f"{message}; stopped before applying it (no checkpoint was written for this iteration; "
            "nonfinite='skip' discards such batches instead)"
        )

    def check_finite(self, what: str, x: torch.Tensor) -> None:
        """Call :meth:`nonfinite` when ``x`` holds NaN or inf, naming ``what`` and how many values."""
        bad = ~torch.isfinite(x.detach())
        if bad.any():
            self.nonfinite(
                f"non-finite {what} at iteration {self.iteration + 1} ({int(bad.sum())} of {x.numel()} values)"
            )

    def clip_and_step(self) -> float:
        """Clip gradients, take an optimizer step; return the pre-clip gradient norm.

        A non-finite gradient is not applied: :meth:`nonfinite` names the first parameter that has one.
        """
        params = self.policy.trainable_parameters()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not torch.isfinite(norm):  # checked before clipping, which would spread the NaN to every tensor
            names = [
                name
                for name, p in self.policy.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            where = f" (first in {names[0]}; {len(names)} tensors affected)" if names else ""
            self.nonfinite(f"non-finite gradient norm ({norm.item()}) at iteration {self.iteration + 1}{where}")
        torch.nn.utils.clip_grads_with_norm_(params, self.config.max_grad_norm or float("inf"), norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # --- the loop --------------------------------------------------------------------------------------

    def _draw_prompts(self) -> np.ndarray:
        n_prompts = len(self.env.engine.prompts)
        groups = self.config.batch_size // self.config.group_size
        return np.repeat(self.np_rng.integers(n_prompts, size=groups), self.config.group_size)

    def _start_run(self, tb_log_name: str | None, reset: bool) -> None:
        """Set the counters, the run folder and the logger for a ``learn`` call (see its ``reset_num_timesteps``)."""
        if reset:
            self.num_timesteps = self.iteration = 0
            self._saved = None
            if self.logger is not None:
                self.logger.close()
            self.logger, self.run_dir = None, None
        if self.logger is not None:
            return
        if self.run_dir is None:  # a resumed agent keeps writing into its own run folder
            if self.tensorboard_log is None:
                return
            name = tb_log_name or run_name(self.env_id, self.name, self.seed)
            self.run_dir = new_run_dir(Path(self.tensorboard_log), name, numbered=tb_log_name is not None, new=reset)
        # resuming: hide what a crashed run logged after its last checkpoint (TensorBoard's purge_step)
        purge = self.num_timesteps + 1 if self.num_timesteps else None
        self.logger = RunLogger(self.run_dir, self.config, purge_step=purge)

    def collect(self) -> tuple[Rollout, torch.Tensor, torch.Tensor | None]:
        """One rollout; returns it with the KL-penalised rewards (B, T) and the per-token KL (or None)."""
        with self.autocast():
            rollout = collect_rollout(
                self.policy, self.env, self._draw_prompts(), self.sampling, self.generator, self.device, record=True
            )
        rewards = rollout.rewards.clone()
        kl = None
        if self.policy.ref_model is not None:
            with self.autocast():
                ref = self.policy.reference_logprobs(
                    rollout.ids, rollout.mask, rollout.prompt_len, rollout.actions, self.sampling.suppress_tokens
                )
            kl = kl_penalty(rollout.logprobs, ref, self.config.kl_estimator) * rollout.valid
            rewards = rewards - self.kl_ctl.coef * kl
        return rollout, rewards, kl

    def _guarded_train(self, rollout: Rollout, rewards: torch.Tensor, kl: torch.Tensor | None) -> dict[str, float]:
        """Check the rollout's numbers, then :meth:`train`; a skipped batch returns no loss stats."""
        try:
            self.check_finite("env rewards", rollout.rewards)
            if kl is not None:
                self.check_finite("KL penalty (policy vs reference log-probs)", kl)
            self.check_finite("KL-penalised rewards", rewards)
            return self.train(rollout, rewards)
        except SkipBatch as e:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_batches += 1
            if self.verbose:
                print(f"skipping batch: {e}")
            return {}

    def learn(
        self,
        total_timesteps: int,
        callback: Callable[[BaseAgent, dict[str, float]], bool | None] | None = None,
        log_interval: int | None = None,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
        checkpoint_dir: str | Path | None = None,
    ) -> BaseAgent:
        """Train on ``total_timesteps`` more generated tokens (valid env steps), as stable-baselines3's ``learn``.

        SIGINT (Ctrl-C) or SIGTERM finishes the iteration in progress, writes a checkpoint (when there is a
        folder for one) and raises :class:`textrl.interrupt.TrainingInterrupted`; a second signal stops at once.

        Args:
            total_timesteps: tokens to train on in this call (the last iteration may overshoot it).
            callback: called after every iteration as ``callback(agent, stats)``; returning False stops.
            log_interval: iterations between TensorBoard scalar writes in this call (default: the config's).
            tb_log_name: run-folder name under ``tensorboard_log``, numbered as SB3 does (``{tb_log_name}_1``,
                ``_2``, ...); default ``{env}__{agent}__{seed}__{time}``.
            reset_num_timesteps: True (SB3's default): this call is a new run, whose token and iteration counters
                start at 0 and whose logs and checkpoints go to a new run folder. False: the counters and the run
                folder carry on from the previous call (one curve across calls; a loaded checkpoint continues
                exactly where it stopped).
            progress_bar: show a tqdm bar.
            checkpoint_dir: where ``step-*`` checkpoints go (default: ``<run folder>/checkpoints`` when
                logging, else none).
        """
        if total_timesteps < 1:
            raise ValueError(f"total_timesteps must be >= 1, got {total_timesteps}")
        if reset_num_timesteps and checkpoint_dir is not None and any(Path(checkpoint_dir).glob("step-*")):
            raise ValueError(
                f"checkpoint_dir {checkpoint_dir} already holds checkpoints; a new run (reset_num_timesteps=True) "
                "would mix its own with them: pass reset_num_timesteps=False to continue that run, or another folder"
            )
        self._start_run(tb_log_name, reset_num_timesteps)
        self._log_interval = log_interval if log_interval is not None else self.config.log_interval
        if self._log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {self._log_interval}")
        if checkpoint_dir is None and self.run_dir is not None:
            checkpoint_dir = self.run_dir / "checkpoints"
        with StopRequest("finishing this iteration, then writing a checkpoint") as stop:
            try:
                self._loop(total_timesteps, callback, progress_bar, checkpoint_dir, stop)
                saved = None
                if checkpoint_dir is not None and self._saved != (Path(checkpoint_dir), self.num_timesteps):
                    saved = self.save_checkpoint(checkpoint_dir)
                elif self._saved is not None:
                    saved = self._saved[0] / _step_name(self._saved[1])
                if self.logger is not None:
                    self.logger.flush()
            except KeyboardInterrupt as e:  # a second signal: the iteration in progress is abandoned, unsaved
                if not stop.requested or isinstance(e, TrainingInterrupted):
                    raise
                last = ckpt.latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
                raise TrainingInterrupted(stop.signum, last, self.num_timesteps, abandoned=True) from None
        if stop.requested:
            raise TrainingInterrupted(stop.signum, saved, self.num_timesteps)
        return self

    def _loop(self, total_timesteps: int, callback, progress_bar: bool, checkpoint_dir, stop: StopRequest) -> None:
        """Iterations until ``total_timesteps`` more tokens, a callback's False, or a stop request."""
        from tqdm.auto import tqdm

        start = self.num_timesteps
        with tqdm(total=total_timesteps, disable=not progress_bar) as bar:
            while self.num_timesteps - start < total_timesteps and not stop.requested:
                stats = self._iteration(checkpoint_dir)
                bar.update(min(self.num_timesteps - start, total_timesteps) - bar.n)
                bar.set_postfix(reward=f"{stats['rollout/reward_mean']:.3f}", kl=f"{stats['rollout/kl_ref']:.3f}")
                if callback is not None and callback(self, stats) is False:
                    return

    def _iteration(self, checkpoint_dir: str | Path | None) -> dict[str, float]:
        """One iteration: rollout, update, counters, KL controller, logs, evaluation, periodic checkpoint."""
        t0 = time.perf_counter()
        rollout, rewards, kl = self.collect()
        t_rollout = time.perf_counter() - t0
        stats = self._guarded_train(rollout, rewards, kl)
        elapsed = time.perf_counter() - t0
        tokens = int(rollout.valid.sum())
        self.num_timesteps += tokens
        self.iteration += 1
        episode_kl = float((kl.sum(1)).mean()) if kl is not None else 0.0
        self.kl_ctl.update(episode_kl, self.config.batch_size)  # a non-finite KL leaves it unchanged
        stats.update(self._rollout_stats(rollout, episode_kl, tokens, elapsed, t_rollout))
        self._log(rollout, stats)
        if self.config.eval_interval and self.iteration % self.config.eval_interval == 0:
            stats.update(self.evaluate_and_log())
        interval = self.config.checkpoint_interval
        if checkpoint_dir is not None and interval and self.iteration % interval == 0:
            if self.logger is not None:
                self.logger.flush()  # the logs up to a checkpoint survive a crash after it
            self.save_checkpoint(checkpoint_dir)
        return stats

    def evaluate_and_log(self) -> dict[str, float]:
        """Evaluate on the held-out prompts (``eval_prompts``), greedy and sampled; log under ``eval/``.

        Sampling uses its own fixed seed, so the numbers compare across evaluations and training draws the
        same random numbers as without evaluation. Returns the ``eval/...`` scalars.
        """
        from textrl.evaluation import evaluate_agent

        env = self._evaluation_env()
        episodes = min(self.config.eval_episodes, len(env.engine.prompts))
        stats: dict[str, float] = {}
        results = {}
        for mode in ("greedy", "sampled"):
            result = evaluate_agent(self, episodes=episodes, greedy=mode == "greedy", env=env)
            results[mode] = result
            stats[f"eval/{mode}/reward_mean"] = result.mean
            stats[f"eval/{mode}/reward_stderr"] = result.stderr
            stats[f"eval/{mode}/episode_length"] = result.length
            for name, value in result.components.items():
                stats[f"eval/{mode}/reward/{name}"] = value
        if self.logger is not None:
            self.logger.scalars(stats, self.num_timesteps)
            self.logger.eval_samples(results["greedy"].samples, results["sampled"].samples, self.num_timesteps)
        return stats

    def _evaluation_env(self):
        """The vector env evaluations run on: the training env, or a copy of it on ``eval_prompts``."""
        if self.config.eval_prompts is None:
            return self.env
        if self._eval_env is None:
            kwargs = {**self.env.init_kwargs, "prompts": self.config.eval_prompts, "tokenizer": self.env.tokenizer}
            self._eval_env = type(self.env)(num_envs=self.config.batch_size, **kwargs)
        return self._eval_env

    def _rollout_stats(self, rollout: Rollout, episode_kl: float, tokens: int, elapsed: float, t_rollout: float):
        returns = rollout.episode_returns.cpu().numpy()
        stats = {
            "rollout/reward_mean": float(returns.mean()),
            "rollout/reward_std": float(returns.std()),
            "rollout/episode_length": float(rollout.lengths.float().mean()),
            "rollout/kl_ref": episode_kl,
            "charts/kl_coef": self.kl_ctl.coef,
            "charts/learning_rate": self.optimizer.param_groups[0]["lr"],
            "charts/tokens_per_second": tokens / elapsed,
            "charts/rollout_tokens_per_second": tokens / t_rollout,
            "charts/skipped_batches": self.skipped_batches,
        }
        for name, values in rollout.components.items():
            stats[f"rollout/reward/{name}"] = float(values.mean())
        return stats

    def _log(self, rollout: Rollout, stats: dict[str, float]) -> None:
        if self.verbose >= 2:
            print(f"iter {self.iteration} tokens {self.num_timesteps} " + json.dumps(stats))
        if self.logger is None:
            return
        if self.iteration % self._log_interval == 0:
            self.logger.scalars(stats, self.num_timesteps)
            self.logger.histogram("rollout/rewards", rollout.episode_returns.cpu().numpy(), self.num_timesteps)
        if self.config.sample_interval and (self.iteration == 1 or self.iteration % self.config.sample_interval == 0):
            returns = rollout.episode_returns.cpu().numpy()
            self.logger.samples(rollout.prompts, rollout.completions, returns, self.num_timesteps)

    # --- inference -------------------------------------------------------------------------------------

    def _choose(
        self,
        logits: torch.Tensor,
        deterministic: bool,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Next token per row from logits (B, V): greedy, or sampled (default: the rollout distribution)."""
        sampling = sampling or self.sampling
        logits = logits[:, : self.env.single_action_space.n].float()
        if deterministic:  # the most likely token that may be sampled at all
            return shape_logits(logits, suppress_tokens=sampling.suppress_tokens).argmax(-1)
        return sample(F.softmax(shape_logits(logits, **vars(sampling)), -1), generator or self.generator)

    @torch.no_grad()
    def predict(self, observation: dict[str, np.ndarray], deterministic: bool = False):
        """Next token for an env observation (single or batched), as SB3's ``predict``: ``(actions, None)``."""
        ids, mask = np.asarray(observation["input_ids"]), np.asarray(observation["attention_mask"])
        single = ids.ndim == 1
        if single:
            ids, mask = ids[None], mask[None]
        left_ids, left_mask = left_pad(ids, mask, self.tokenizer.pad_token_id)
        last = left_ids.shape[1] - 1
        logits, _ = self.policy.core.forward(left_ids.to(self.device), left_mask.to(self.device), last)  # (B, 1, V)
        actions = self._choose(logits[:, -1], deterministic).cpu().numpy()
        return (actions[0] if single else actions), None

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int | None = None,
        deterministic: bool = False,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Continue each prompt with the current policy (KV-cached); returns the new text of each.

        A continuation ends at eos, once its text contains a stop string, or after ``max_new_tokens`` tokens,
        exactly as an episode of the env does, and its text is what the env would report as the completion
        (special tokens skipped, the token that completed a stop string kept).

        Args:
            prompts: texts to continue (an empty one starts from the bos/eos token).
            max_new_tokens: most tokens per continuation (default: the env's ``max_new_tokens``).
            deterministic: take the most likely token at each step instead of sampling.
            temperature, top_k, top_p: sampling settings for this call (default: the agent's rollout settings);
                ``suppress_tokens`` always apply.
            stop: stop string(s) for this call (default: the env's ``stop``; ``[]`` for none).
            seed: sample from a generator seeded with it (reproducible, and the agent's own generator, which
                training draws from, is left untouched); default: the agent's generator.
        """
        tok = self.tokenizer
        max_new_tokens = max_new_tokens or self.env.engine.max_new_tokens
        stops = self.env.engine.stop if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
        sampling = dataclasses.replace(
            self.sampling,
            **{k: v for k, v in {"temperature": temperature, "top_k": top_k, "top_p": top_p}.items() if v is not None},
        )
        if sampling.temperature <= 0 or sampling.top_k < 0 or not 0.0 < sampling.top_p <= 1.0:
            raise ValueError(
                f"bad sampling settings: temperature={sampling.temperature} (> 0; use deterministic=True for "
                f"greedy), top_k={sampling.top_k} (>= 0), top_p={sampling.top_p} (in (0, 1])"
            )
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        encoded = [tok(p)["input_ids"] or [start] for p in prompts]
        P = max(map(len, encoded))
        ids = torch.full((len(prompts), P), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), P, dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, P - len(e) :], mask[i, P - len(e) :] = torch.tensor(e), 1
        out, done = [], torch.zeros(len(prompts), dtype=torch.bool, device=self.device)

        def choose(t: int, logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
            token = torch.where(done, tok.pad_token_id, self._choose(logits, deterministic, sampling, generator))
            out.append(token)
            done.logical_or_(token == tok.eos_token_id)
            if stops:  # the env's rule: an episode ends once its completion's text contains a stop string
                so_far = torch.stack(out, 1).tolist()
                for i in torch.nonzero(~done).flatten().tolist():
                    text = tok.decode(so_far[i], skip_special_tokens=True)
                    done[i] = any(s in text for s in stops)
            return None if done.all() else token

        decode(self.policy, ids.to(self.device), mask.to(self.device), max_new_tokens, choose)
        return tok.batch_decode(torch.stack(out, 1).tolist(), skip_special_tokens=True)

    # --- persistence -----------------------------------------------------------------------------------

    def _write(self, folder: Path) -> None:
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
        try:
            self.policy.model.save_pretrained(folder / "policy", safe_serialization=True)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self.tokenizer.save_pretrained(folder / "policy")
        ckpt.save_module(folder / "value_head.safetensors", self.policy.value_head)
        if self.policy.value_model is not None:
            ckpt.save_module(folder / "value_model.safetensors", self.policy.value_model)
        if self.policy.ref_model is not None:
            ckpt.save_module(folder / "reference.safetensors", self.policy.ref_model)
        tensors, skeleton = ckpt.flatten_state(self.optimizer.state_dict())
        ckpt.save_tensors(folder / "optimizer.safetensors", tensors)
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        ckpt.save_tensors(folder / "rng.safetensors", rng)
        env_kwargs = {k: v for k, v in self.env.init_kwargs.items() if _jsonable(v)}
        ckpt.save_json(
            folder / "state.json",
            {
                "format": 1,
                "agent": self.name,
                "config": to_jsonable(self.config),
                "num_timesteps": self.num_timesteps,
                "iteration": self.iteration,
                "skipped_batches": self.skipped_batches,
                "seed": self.seed,
                "lm": self.lm,
                "vocab_size": int(self.env.single_action_space.n),
                "tokenizer_sha256": self._tokenizer_sha256(),
                "kl_controller": self.kl_ctl.state_dict(),
                "np_rng": self.np_rng.bit_generator.state,
                "env_id": self.env_id,
                "env_kwargs": env_kwargs,
                "optimizer": skeleton,
                "run_dir": str(self.run_dir) if self.run_dir else None,
                "train": self.train_config,
                "extra": self.extra_state(),
            },
        )

    def _tokenizer_sha256(self) -> str:
        if getattr(self, "_tokenizer_sha", None) is None:  # computed once: a large vocabulary takes a moment
            self._tokenizer_sha = tokenizer_fingerprint(self.env.engine.tokenizer)
        return self._tokenizer_sha

    def save(self, path: str | Path) -> Path:
        """Save everything needed to resume exactly (weights as safetensors, no pickle), atomically."""
        return ckpt.write_atomic(path, self._write)

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Save ``folder/step-{num_timesteps}`` and prune all but the newest ``keep_checkpoints``.

        Also removes what a killed writer left (hidden ``.step-*.tmp-<pid>`` folders) and newer checkpoints
        that fail verification (left by a crash, after which the run resumed from an earlier one).
        """
        folder = Path(folder)
        ckpt.remove_unfinished(folder)
        path = self.save(folder / _step_name(self.num_timesteps))
        self._saved = (folder, self.num_timesteps)
        others = sorted(p for p in folder.glob("step-*") if p.name != path.name)
        for newer in (p for p in others if p.name > path.name):
            try:
                ckpt.verify(newer)
            except ckpt.CheckpointError:
                shutil.rmtree(newer, ignore_errors=True)
        older = [p for p in others if p.name < path.name]
        for old in older[: max(0, len(older) - (self.config.keep_checkpoints - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path, env=None, tensorboard_log: str | Path | None = None, **overrides: Any):
        """Load a saved agent. ``env`` defaults to the saved env id (when it was a registered one).

        ``overrides`` replace config fields (e.g. ``device="cpu"``).
        """
        folder = ckpt.verify(path)
        state = ckpt.load_json(folder / "state.json")
        if not isinstance(state, dict):
            raise ckpt.CheckpointError(f"{folder / 'state.json'} is not a JSON object")
        if state.get("agent") != cls.name:
            raise ckpt.CheckpointError(f"{folder} holds a {state.get('agent')!r} agent, not {cls.name!r}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing or not isinstance(state["config"], dict):
            raise ckpt.CheckpointError(f"{folder / 'state.json'} is incomplete (missing {missing or ['config']})")
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        config = cls.config_class(**{k: v for k, v in state["config"].items() if k in fields} | overrides)
        config.validate()
        if env is None:
            env_id = state.get("env_id")
            if env_id not in gym.registry:
                raise ValueError(f"{folder} was trained on {env_id!r}, which is not a registered id: pass env=")
            env = gym.make_vec(
                env_id, num_envs=config.batch_size, vectorization_mode="vector_entry_point", **state["env_kwargs"]
            )
        env = make_vector_env(env, config.batch_size)
        _check_tokenizer(folder, state, env)
        agent = cls(env, lm=folder / "policy", config=config, tensorboard_log=tensorboard_log, seed=state["seed"])
        agent._restore(folder, state)
        return agent

    def _restore(self, folder: Path, state: dict) -> None:
        try:
            ckpt.load_module(folder / "value_head.safetensors", self.policy.value_head)
            if self.policy.value_model is not None:
                ckpt.load_module(folder / "value_model.safetensors", self.policy.value_model)
            if self.policy.ref_model is not None:
                ckpt.load_module(folder / "reference.safetensors", self.policy.ref_model)
            optim = ckpt.unflatten_state(state["optimizer"], ckpt.load_tensors(folder / "optimizer.safetensors"))
            self.optimizer.load_state_dict(optim)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            if isinstance(e, ckpt.CheckpointError):
                raise
            raise ckpt.CheckpointError(f"{folder} does not fit this model/config: {e}") from None
        try:
            rng = ckpt.load_tensors(folder / "rng.safetensors")
            self.generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            self.np_rng.bit_generator.state = state["np_rng"]
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.num_timesteps, self.iteration = int(state["num_timesteps"]), int(state["iteration"])
            self.skipped_batches = int(state.get("skipped_batches", 0))
            self.lm = state["lm"]
            self.env_id = state.get("env_id") or self.env_id  # the run's own env id (names, reloads)
            self.train_config = state.get("train")
            self.load_extra_state(state.get("extra") or {})
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
            if isinstance(e, ckpt.CheckpointError):
                raise
            raise ckpt.CheckpointError(f"{folder / 'state.json'} holds a bad value: {type(e).__name__}: {e}") from None
        if self.tensorboard_log is not None:
            if folder.parent.name == "checkpoints" and (folder.parent.parent / "config.json").is_file():
                self.run_dir = folder.parent.parent  # the run folder it sits in, even if it was moved
            elif state.get("run_dir"):
                self.run_dir = Path(state["run_dir"])


def _step_name(num_timesteps: int) -> str:
    """The folder name of the checkpoint at ``num_timesteps`` tokens (zero-padded: names sort by step)."""
    return f"step-{num_timesteps:012d}"


_STATE_KEYS = ("config", "num_timesteps", "iteration", "seed", "lm", "kl_controller", "np_rng", "optimizer")
"""Keys every checkpoint's state.json must have."""


def _check_tokenizer(folder: Path, state: dict, env) -> None:
    """A checkpoint must be resumed on an env with the tokenizer it was trained with."""
    n = int(env.single_action_space.n)
    if "vocab_size" in state and state["vocab_size"] != n:
        raise ckpt.CheckpointError(
            f"{folder} was trained on a vocabulary of {state['vocab_size']} tokens (lm {state.get('lm')!r}) "
            f"but this env has {n}: it comes from a different model; use the env it was trained on"
        )
    if "tokenizer_sha256" in state and state["tokenizer_sha256"] != tokenizer_fingerprint(env.engine.tokenizer):
        raise ckpt.CheckpointError(
            f"{folder} was trained with a different tokenizer than this env's (same size, different tokens; "
            f"lm {state.get('lm')!r}): it comes from a different model; use the env it was trained on"
        )


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
