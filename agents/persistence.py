"""Checkpoints: saving an agent (weights as safetensors, no pickle, written atomically), pruning old
checkpoints, and loading one back so that training resumes exactly where it stopped.

The checkpoint format (``state.json`` and the tensor files) is defined here alone; separate from the loop in
:mod:`agents.base`, which only calls :meth:`PersistenceMixin.save_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from textrl import checkpoint as ckpt
from textrl.config import to_jsonable
from textrl.runtime import Runtime


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary (token -> id), to tell whether a checkpoint fits an env."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()


class PersistenceMixin:
    """``save``, ``save_checkpoint``, ``load``; expects BaseAgent's constructor, models, optimizer, RNGs, counters."""

    def _write(self, folder: Path, rng: dict[str, torch.Tensor]) -> None:
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
                "world_size": self.runtime.world_size,
                "lm": self.lm,
                "vocab_size": int(self.env.single_action_space.n),
                "tokenizer_sha256": self._tokenizer_sha256(),
                "kl_controller": self.kl_ctl.state_dict(),
                "np_rng": self.np_rng.bit_generator.state,
                "env_id": self.env_id,
                "env_kwargs": env_kwargs,
                "optimizer": skeleton,
                "run_dir": str(self.run_dir) if self.run_dir else None,
                "lora": self.base_identity,
                "reference_is_base": self.reference_is_base,
                "train": self.train_config,
                "extra": self.extra_state(),
            },
        )

    def _tokenizer_sha256(self) -> str:
        if getattr(self, "_tokenizer_sha", None) is None:  # computed once: a large vocabulary takes a moment
            self._tokenizer_sha = tokenizer_fingerprint(self.env.tokenizer)
        return self._tokenizer_sha

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """The sampling generator's and torch's RNG states: this process's under ``generator`` and ``torch``,
        and with many processes each other rank's under ``generator.rank<r>`` and ``torch.rank<r>`` (gathered
        here: every process calls this together)."""
        mine = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        states = {}
        for rank, theirs in enumerate(self.runtime.all_gather_object(mine)):
            suffix = f".rank{rank}" if rank else ""
            states |= {f"{key}{suffix}": value for key, value in theirs.items()}
        return states

    def save(self, path: str | Path) -> Path:
        """Save everything needed to resume exactly (weights as safetensors, no pickle), atomically.

        Data parallel: every process calls it (each one's RNG state is gathered into the checkpoint); rank 0
        writes, and the others return once the checkpoint is complete.
        """
        rng = self._rng_states()
        if self.runtime.is_main:
            ckpt.write_atomic(path, lambda folder: self._write(folder, rng))
        self.runtime.barrier()
        return Path(path)

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Save ``folder/step-{num_timesteps}`` and prune all but the newest ``keep_checkpoints``.

        Also removes what a killed writer left (hidden ``.step-*.tmp-<pid>`` folders) and newer checkpoints
        that fail verification (left by a crash, after which the run resumed from an earlier one). Data
        parallel: every process calls it, rank 0 alone writes and prunes.
        """
        folder = Path(folder)
        if not self.runtime.is_main:
            path = self.save(folder / _step_name(self.num_timesteps))
            self._saved = (folder, self.num_timesteps)
            return path
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
        from agents.base import make_vector_env  # not at the top: agents.base imports this module

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
        runtime = Runtime.from_env(config.device)  # under torchrun, this process's share of the batch
        rows = cls.local_batch_size(config, runtime.world_size)
        if env is None:
            env_id = state.get("env_id")
            if env_id not in gym.registry:
                raise ValueError(f"{folder} was trained on {env_id!r}, which is not a registered id: pass env=")
            env = gym.make_vec(env_id, num_envs=rows, vectorization_mode="vector_entry_point", **state["env_kwargs"])
        env = make_vector_env(env, rows)
        _check_tokenizer(folder, state, env)
        agent = cls(
            env,
            lm=folder / "policy",
            config=config,
            tensorboard_log=tensorboard_log,
            seed=state["seed"],
            reference_is_base=bool(state.get("reference_is_base", False)),
            runtime=runtime,
        )
        saved, now = (state.get("lora") or {}), (agent.base_identity or {})
        if saved.get("base_sha256") != now.get("base_sha256"):
            raise ckpt.CheckpointError(
                f"{folder} holds LoRA adapters for the base model {saved.get('base')!r} (sha256 "
                f"{str(saved.get('base_sha256'))[:12]}), but the base loaded now is {now.get('base')!r} (sha256 "
                f"{str(now.get('base_sha256'))[:12]}): resume it on the base it was trained on"
            )
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
            self._restore_rng(folder, state, ckpt.load_tensors(folder / "rng.safetensors"))
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

    def _restore_rng(self, folder: Path, state: dict, rng: dict[str, torch.Tensor]) -> None:
        """This process's RNG states; resumed on another number of processes, the rows split differently and
        a rank the checkpoint has no state for keeps its fresh stream (``seed + rank``): not an exact resume."""
        rank, saved_world = self.runtime.rank, int(state.get("world_size", 1))
        if saved_world != self.runtime.world_size and self.runtime.is_main:
            warnings.warn(
                f"{folder} was saved by {saved_world} process(es) and resumes on {self.runtime.world_size}: the "
                "batch splits differently over the processes, so the run does not continue exactly as it would have",
                UserWarning,
                stacklevel=3,
            )
        suffix = f".rank{rank}" if rank else ""
        if f"generator{suffix}" in rng:
            self.generator.set_state(rng[f"generator{suffix}"])
            torch.set_rng_state(rng[f"torch{suffix}"])


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
    if "tokenizer_sha256" in state and state["tokenizer_sha256"] != tokenizer_fingerprint(env.tokenizer):
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
