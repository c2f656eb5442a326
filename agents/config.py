"""The settings every agent shares (:class:`AgentConfig`); PPO's and REINFORCE's configs extend it.

Separate from :mod:`agents.base` because it is plain data with its own validation: the command line, the train
runner and checkpoints (``state.json``'s ``config``) read it without the agent machinery.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from textrl.device import resolve_device
from textrl.rollout import Sampling


@dataclass
class AgentConfig(Sampling):
    """Settings shared by all agents (the sampling settings, :class:`textrl.rollout.Sampling`, first)."""

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
    replay_memory_mb: float = 4096.0
    """Largest rollout record (the activations kept so the update can skip its forward matmuls), in MB; a
    rollout that needs more computes the update's forward instead (0 = never record)."""
    value_model: Literal["shared", "separate"] = "shared"
    """Value head on the policy trunk, or on a separate copy of the LM."""
    lora_rank: int = 0
    """Rank of LoRA adapters to train instead of every weight (peft's LoRA; 0 = full fine-tuning). The base
    stays frozen, the reference is the base with the adapters off, checkpoints hold the adapters."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the adapters' term is multiplied by lora_alpha / lora_rank."""
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: names such as q_proj v_proj, or all-linear (every linear layer of the
    blocks, not the LM head)."""
    lora_layers: list[int] = dataclasses.field(default_factory=list)
    """Indices of the blocks that get adapters (empty = all)."""
    router_aux_coef: float = 0.0
    """Mixture-of-experts policies: weight of the router's load-balancing loss (Switch Transformer's, as
    in pre-training) added to the update's loss, so RL does not collapse the routing onto few experts
    (0 = off)."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."""
    autocast: Literal["none", "bf16", "fp16"] = "none"
    """Mixed-precision autocast for forwards (off on CPU by default)."""
    decode_step: Literal["eager", "static", "graph", "compile"] = "eager"
    """How the engine runs a decode step: eager; or one static-shape step over the whole KV cache, run as it is
    (static), captured as a CUDA graph and replayed (graph: on a GPU, a step costs about its memory traffic
    instead of its kernel launches) or through torch.compile, then a CUDA graph on a GPU (compile: tens of
    seconds of compiling per batch shape; it falls back to an uncompiled step, with a warning, where
    torch.compile cannot run). On a CPU the eager step runs each block as one C++ call where textrl's kernels
    apply, which is faster than compile there. Models the engine does not run, mixtures of experts and LoRA
    rollouts decode eagerly."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the update's backward pass instead of keeping them from its
    forward (torch.utils.checkpoint): the update's activation memory drops to about one block's plus every
    block's input, for about one more forward pass of compute. For long sequences and big batches."""
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
            (self.router_aux_coef >= 0, "router_aux_coef must be >= 0"),
            (self.kl_estimator in ("k1", "k3"), "kl_estimator must be 'k1' or 'k3'"),
            (self.kl_target is None or self.kl_target > 0, "kl_target must be > 0 (or None)"),
            (self.kl_horizon >= 1, "kl_horizon must be >= 1"),
            (self.replay_memory_mb >= 0, "replay_memory_mb must be >= 0"),
            (self.lora_rank >= 0, "lora_rank must be >= 0 (0 = full fine-tuning)"),
            (self.lora_rank == 0 or self.lora_alpha > 0, "lora_alpha must be > 0"),
            (self.lora_rank == 0 or bool(self.lora_targets), "lora_targets must name modules (or all-linear)"),
            (self.lora_rank == 0 or self.value_model == "shared", "LoRA runs need value_model='shared'"),
            (self.value_model in ("shared", "separate"), "value_model must be 'shared' or 'separate'"),
            (self.autocast in ("none", "bf16", "fp16"), "autocast must be 'none', 'bf16' or 'fp16'"),
            (
                self.decode_step in ("eager", "static", "graph", "compile"),
                "decode_step must be 'eager', 'static', 'graph' or 'compile'",
            ),
            (self.log_interval >= 1, "log_interval must be >= 1"),
            (self.eval_interval >= 0, "eval_interval must be >= 0"),
            (self.eval_episodes >= 1, "eval_episodes must be >= 1"),
            (self.sample_interval >= 0, "sample_interval must be >= 0"),
            (self.checkpoint_interval >= 0, "checkpoint_interval must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.nonfinite in ("raise", "skip"), "nonfinite must be 'raise' or 'skip'"),
        ]
        for message in [message for ok, message in checks if not ok] + self.sampling_errors():
            raise ValueError(f"{type(self).__name__}: {message}")
        resolve_device(self.device)  # an unknown device, or one this machine lacks, fails before anything loads
