"""What every textrl agent shares: env and policy set-up and the learn loop.

An agent subclass only says how to turn a rollout into a parameter update (``train``), like SB3's split of
``collect_rollouts()`` from ``train()``. The loop is: draw prompts (in groups), collect a rollout through
the KV-cached policy, score the reference log-probs in one batched pass, subtract the per-token KL
penalty, ``train`` (guarded: :mod:`agents.guards`), update the KL coefficient, log and evaluate
(:mod:`agents.reporting`), checkpoint (:mod:`agents.persistence`). Inference (``predict``, ``generate``) is in
:mod:`agents.inference`, the shared settings in :mod:`agents.config`; :class:`BaseAgent` inherits the mixins.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from agents.config import AgentConfig
from agents.guards import GuardMixin, SkipBatch
from agents.inference import InferenceMixin
from agents.persistence import PersistenceMixin, _step_name
from agents.reporting import ReportingMixin
from textrl import allocator
from textrl import checkpoint as ckpt
from textrl.advantages import KLController, kl_penalty
from textrl.interrupt import StopRequest, TrainingInterrupted
from textrl.logger import RunLogger, new_run_dir, run_name
from textrl.lora import attach, base_identity, is_peft
from textrl.ops import InputMajorAdam
from textrl.policy import ActorCritic, action_logprobs, shape_logits
from textrl.protocol import TextVectorEnv
from textrl.rollout import Rollout, Sampling, collect_rollout
from textrl.runtime import Runtime


def make_vector_env(env, batch_size: int) -> TextVectorEnv:
    """The vector env an agent trains on, from an id, a :class:`envs.TextGenEnv` (``batch_size`` copies), or
    a vector env that implements :class:`textrl.protocol.TextVectorEnv` (taken as it is)."""
    import envs  # noqa: F401  (registers the ids)
    from envs import MultiTurnEnv, MultiTurnVectorEnv, TextGenEnv, TextGenVectorEnv

    if isinstance(env, str):
        try:
            return gym.make_vec(env, num_envs=batch_size, vectorization_mode="vector_entry_point")
        except gym.error.Error as e:
            raise ValueError(f"cannot make a textrl vector env from {env!r}: {e}") from None
    base = env.unwrapped if isinstance(env, gym.Env) else env
    if isinstance(base, MultiTurnEnv):
        return MultiTurnVectorEnv(num_envs=batch_size, **base.init_kwargs)
    if isinstance(base, TextGenEnv):
        return TextGenVectorEnv(num_envs=batch_size, **base.init_kwargs)
    if isinstance(base, TextVectorEnv):
        return base
    raise TypeError(
        f"env must be a registered id, a TextGenEnv, or a vector env with textrl's env protocol "
        f"(textrl.protocol.TextVectorEnv, e.g. TextGenVectorEnv), got {type(env).__name__}"
    )


def _bump_versions(optimizer: torch.optim.Optimizer, *_) -> None:
    """Mark every parameter of ``optimizer`` as changed in place (an optimizer step post-hook)."""
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


class BaseAgent(GuardMixin, ReportingMixin, InferenceMixin, PersistenceMixin):
    """Common machinery; subclasses set ``name``, ``config_class`` and implement :meth:`train`."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[AgentConfig]] = AgentConfig

    def __init__(
        self,
        env,
        lm: str | Path | PreTrainedModel | None = None,
        config: AgentConfig | None = None,
        tensorboard_log: str | Path | None = None,
        seed: int | None = None,
        verbose: int = 1,
        runtime: Runtime | None = None,
        reference_is_base: bool | None = None,
    ):
        """``env``: a textrl env (id, single or vector env); ``lm``: the policy's language model, as a name
        or folder (default: the env's own LM) or a ready ``PreTrainedModel`` (trained in place; the env's
        tokenizer goes with it, and its vocabulary must cover the env's actions); ``runtime``: device and
        process layout (default: one process on ``config.device``, :meth:`textrl.runtime.Runtime.local`);
        ``reference_is_base``: with LoRA, whether the KL reference is the base model with the adapters off
        (default: when this agent attaches fresh adapters, which start at zero) or a frozen copy of the
        starting model (an adapter given to train further: the reference is that adapter as it started)."""
        from textrl.lm import load_lm

        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config.validate()
        self.env_id = env if isinstance(env, str) else getattr(getattr(env, "spec", None), "id", None) or "TextGen"
        self.runtime = runtime if runtime is not None else Runtime.from_env(self.config.device)
        self.device = self.runtime.device
        if self.device.type == "cpu":  # every iteration's large tensors reuse the last one's pages
            allocator.keep_freed_blocks()
        world = self.runtime.world_size
        # data parallel: config.batch_size is the whole batch; each process steps its own env copy of
        # batch_size / world_size rows, made of whole prompt groups (group baselines stay local)
        self.env = make_vector_env(env, self.local_batch_size(self.config, world))
        if self.env.num_envs * world != self.config.batch_size:  # a vector env passed in sets the batch size
            self.config = dataclasses.replace(self.config, batch_size=self.env.num_envs * world)
            self.config.validate()
            self.local_batch_size(self.config, world)
        if isinstance(lm, PreTrainedModel):
            model, self.tokenizer = lm.to(self.device), self.env.tokenizer
            self.lm = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        else:
            self.lm = str(lm if lm is not None else self.env.init_kwargs.get("lm", "tiny"))
            model, self.tokenizer = load_lm(self.lm, device=self.device, dtype=self.runtime.dtype)
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
        fresh = self.config.lora_rank > 0 and not is_peft(model)  # an adapter folder or object comes with its own
        if fresh:
            cfg = self.config
            # peft draws the adapters' A matrices from torch's global RNG: drawn from the run's seed, a seeded
            # run starts from the same adapters every time (and the caller's RNG state is left as it was)
            cuda = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                if seed is not None:
                    torch.manual_seed(seed)
                model = attach(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_layers)
        self.reference_is_base = fresh if reference_is_base is None else reference_is_base
        self.base_identity = base_identity(model) if is_peft(model) else None
        """The base model under LoRA adapters (path and SHA-256 of config and weights), else None."""
        # with agent-made adapters the starting policy is the base itself (peft starts B at zero): the
        # reference is the base with the adapters off, not a copy of the weights
        self.policy = ActorCritic(
            model, self.config.value_model, reference=use_ref, reference_is_base=self.reference_is_base
        ).to(self.device)
        self.policy.replay_memory_mb = self.config.replay_memory_mb
        self.policy.decode_step = self.config.decode_step
        self.policy.activation_checkpointing = self.config.activation_checkpointing
        if self.config.router_aux_coef > 0:
            if not self.policy.has_router:
                raise ValueError(
                    "router_aux_coef > 0 needs a mixture-of-experts policy that runs on the engine; this one "
                    f"runs on {self.policy.runs_on} with no router (set router_aux_coef to 0)"
                )
            self.policy.router_balance = True
        # fused: one kernel over all parameters instead of a loop of small kernels per tensor; InputMajorAdam
        # gives it the engine's CPU weight layout without copies (torch's Adam where no weight is laid out so)
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = InputMajorAdam(
            self.policy.trainable_parameters(), lr=self.config.learning_rate, eps=1e-5, fused=fused
        )
        # the fused kernel updates parameters without bumping their autograd version counters, which is how
        # the policy's cores tell that a rollout record (replay) is stale: bump them
        self.optimizer.register_step_post_hook(_bump_versions)
        if self.runtime.distributed:
            # every process starts from rank 0's weights (as DDP does), and shares its seed: the same prompt
            # draws (each keeps its slice), a sampling stream of its own (seed + rank)
            self.runtime.broadcast_([*self.policy.parameters(), *self.policy.buffers()])
            seed = self.runtime.broadcast_object(seed if seed is not None else secrets.randbits(62))
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed + self.runtime.rank if seed is not None else secrets.randbits(63))
        self.np_rng = np.random.default_rng(seed)
        self.kl_ctl = KLController(self.config.kl_coef, self.config.kl_target, self.config.kl_horizon)
        self.sampling = Sampling.of(self.config)
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
        if not self.env.reward_names:
            warnings.warn(
                "the env has no reward: every episode scores 0, so training has nothing to learn from; give the "
                "env a reward (e.g. reward='keyword_reward', or --env-kwargs '{\"reward\": \"keyword_reward\"}')",
                UserWarning,
                stacklevel=2,
            )

    @staticmethod
    def local_batch_size(config: AgentConfig, world_size: int) -> int:
        """Rows one of ``world_size`` processes steps: ``batch_size / world_size``, in whole prompt groups."""
        rows, group = config.batch_size, config.group_size
        if rows % (world_size * group):
            raise ValueError(
                f"batch_size {rows} does not split over {world_size} processes in whole groups of {group} "
                f"(it must be a multiple of {world_size} x {group} = {world_size * group})"
            )
        return rows // world_size

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

    def batch_count(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The masked count of the whole batch, as :func:`textrl.advantages.masked_mean`'s ``count``: each
        process's loss is then its share of the whole batch's. None in one process (its count is the whole)."""
        if not self.runtime.distributed:
            return None
        return self.runtime.all_reduce(mask.sum()).clamp_min(1)

    def batch_total(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (detached) summed over all processes: whole-batch figures from the processes' shares."""
        return self.runtime.all_reduce(x.detach().clone()) if self.runtime.distributed else x.detach()

    def logprobs_and_entropy(self, logits: torch.Tensor, actions: torch.Tensor):
        """Log-probs (B, T) of ``actions`` and entropies (B, T) under the *sampling* distribution."""
        n = self.env.single_action_space.n
        suppressed = self.sampling.suppress_tokens
        if self.config.ent_coef == 0:
            # The entropy is then only logged: computed outside the graph, the backward skips its
            # full-vocabulary passes (-10% of the update at B=16); its gradient would be 0 * dH.
            # Suppressed tokens are removed chunk by chunk inside (no (B, T, V) copy of the logits), and
            # half-precision logits are taken to float32 chunk by chunk there too: a whole float32 copy is
            # made only where temperature, top-k or top-p reshape the logits first.
            s = self.sampling
            shaped = logits[..., :n]
            if s.temperature != 1.0 or s.top_k or s.top_p < 1.0:
                shaped = shape_logits(shaped.float(), **{**vars(s), "suppress_tokens": ()})
            return action_logprobs(shaped, actions, entropy=True, suppress_tokens=suppressed)
        shaped = shape_logits(logits[..., :n].float(), **vars(self.sampling))
        logp = F.log_softmax(shaped, dim=-1)  # (B, T, V)
        p = logp.exp()
        entropy = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
        return logp.gather(-1, actions[..., None]).squeeze(-1), entropy

    # --- the loop --------------------------------------------------------------------------------------

    def _draw_prompts(self) -> np.ndarray:
        n_prompts = len(self.env.prompts)
        groups = self.config.batch_size // self.config.group_size
        drawn = self.np_rng.integers(n_prompts, size=groups)  # every process draws the whole batch's groups...
        share = groups // self.runtime.world_size
        mine = drawn[self.runtime.rank * share : (self.runtime.rank + 1) * share]  # ...and keeps its slice
        return np.repeat(mine, self.config.group_size)

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
            if self.tensorboard_log is not None and self.runtime.is_main:
                name = tb_log_name or run_name(self.env_id, self.name, self.seed)
                self.run_dir = new_run_dir(
                    Path(self.tensorboard_log), name, numbered=tb_log_name is not None, new=reset
                )
            # every process knows the run folder (its checkpoints are written together); rank 0 made it
            self.run_dir = self.runtime.broadcast_object(self.run_dir)
        if self.run_dir is None or not self.runtime.is_main:  # one process writes the logs
            return
        # resuming: hide what a crashed run logged after its last checkpoint (TensorBoard's purge_step)
        purge = self.num_timesteps + 1 if self.num_timesteps else None
        self.logger = RunLogger(self.run_dir, self.config, purge_step=purge)

    def reference_kl(self, rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference model's log-probs of the rollout's actions and the per-token KL estimate
        (``config.kl_estimator``) against them, both (B, T); the KL is zero off the action positions."""
        with self.autocast():
            ref = self.policy.reference_logprobs(
                rollout.ids, rollout.attention_mask, rollout.prompt_len, rollout.actions, self.sampling.suppress_tokens
            )
        return ref, kl_penalty(rollout.logprobs, ref, self.config.kl_estimator) * rollout.action_mask

    def collect(self) -> tuple[Rollout, torch.Tensor, torch.Tensor | None]:
        """One rollout; returns it with the KL-penalised rewards (B, T) and the per-token KL (or None)."""
        with self.autocast():
            rollout = collect_rollout(
                self.policy, self.env, self._draw_prompts(), self.sampling, self.generator, self.device, record=True
            )
        rewards = rollout.rewards.clone()
        kl = None
        if self.policy.reference:
            _, kl = self.reference_kl(rollout)
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
            if self.verbose and self.runtime.is_main:
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
        with tqdm(total=total_timesteps, disable=not progress_bar or not self.runtime.is_main) as bar:
            while self.num_timesteps - start < total_timesteps and not stop.requested:
                stats = self._iteration(checkpoint_dir, stop)
                bar.update(min(self.num_timesteps - start, total_timesteps) - bar.n)
                bar.set_postfix(reward=f"{stats['rollout/reward_mean']:.3f}", kl=f"{stats['rollout/kl_ref']:.3f}")
                # a callback may see different figures on each process (evaluations run on rank 0 alone):
                # the processes stop together when any callback says so
                if callback is not None and self.runtime.any(callback(self, stats) is False):
                    return

    def _iteration(self, checkpoint_dir: str | Path | None, stop: StopRequest) -> dict[str, float]:
        """One iteration: rollout, update, counters, KL controller, logs, evaluation, periodic checkpoint.

        Data parallel: the counters, the episode KL (which drives the KL controller) and the logged rollout
        figures are the whole batch's, from one all-reduce that also carries each process's stop request (a
        signal that reached one process stops them all after this iteration)."""
        t0 = time.perf_counter()
        comm0 = self.runtime.comm["seconds"]
        rollout, rewards, kl = self.collect()
        t_rollout = time.perf_counter() - t0
        stats = self._guarded_train(rollout, rewards, kl)
        elapsed = time.perf_counter() - t0
        totals = self._rollout_stats(rollout, kl, elapsed, t_rollout, stop.requested)
        stats.update(totals.stats)
        self.num_timesteps += totals.tokens
        self.iteration += 1
        self.kl_ctl.update(stats["rollout/kl_ref"], self.config.batch_size)  # a non-finite KL leaves it unchanged
        stats["charts/kl_coef"] = self.kl_ctl.coef
        if self.runtime.distributed:
            stats["charts/collective_seconds"] = self.runtime.comm["seconds"] - comm0
            if totals.stop and not stop.requested:
                stop.signum = totals.stop_signal
        self._log(rollout, stats)
        if self.config.eval_interval and self.iteration % self.config.eval_interval == 0 and self.runtime.is_main:
            stats.update(self.evaluate_and_log())
        interval = self.config.checkpoint_interval
        if checkpoint_dir is not None and interval and self.iteration % interval == 0:
            if self.logger is not None:
                self.logger.flush()  # the logs up to a checkpoint survive a crash after it
            self.save_checkpoint(checkpoint_dir)
        return stats
