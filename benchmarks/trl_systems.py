"""The TRL systems of ``peers.py``: GRPOTrainer and RLOOTrainer (the installed TRL) and PPOTrainer (TRL 1.12).

Each ``run_*`` builds the trainer on the workload's exported HF folder, runs ``n`` optimisation steps with
``trainer.train()`` and returns one row per step: ``{"tokens", "seconds", "rollout_seconds"}``. A step is
timed between consecutive ``on_step_end`` callbacks (the first from ``on_train_begin``); the rollout is the
time spent in the trainer's own generate-and-score method (generation, reward, the reference and
old-log-prob passes), wrapped with a timer in the worker process only.

This module imports nothing but the standard library at the top: the TRL PPO worker runs it under a
separate interpreter (``--trl-ppo-python``, a venv with ``trl==1.12.0``, the last release with PPOTrainer)
that has torch, transformers and TRL but not textrl.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable

QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",  # TRL's trainers ping the Hub on construction unless this or offline is set
    "TRL_EXPERIMENTAL_SILENCE": "1",  # PPOTrainer lives in trl.experimental and warns about it
    "TOKENIZERS_PARALLELISM": "false",
}
"""Set before TRL is imported: offline, no telemetry, no experimental-API warnings."""

GROUP_SIZE = 4
"""Completions per prompt for GRPO and RLOO (as textrl REINFORCE's ``group_size``)."""


def quiet(logs: bool = False) -> None:
    """Offline, no telemetry, no deprecation warnings; with ``logs`` also no transformers logs or progress bars."""
    import warnings

    os.environ.update(QUIET_ENV)
    warnings.filterwarnings("ignore", category=FutureWarning)  # gradient_checkpointing -> activation_checkpointing
    if logs:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _synchronize() -> None:
    """Wait for queued GPU work, if any (timers read wall-clock time; CUDA runs asynchronously)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _step_timer(rows: list[dict], state: dict):
    """A TrainerCallback appending ``{"seconds", "rollout_seconds", "tokens"}`` at every ``on_step_end``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, st, control, **kwargs):
            state["last"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kwargs):
            _synchronize()
            now = time.perf_counter()
            rows.append(
                {"seconds": now - state["last"], "rollout_seconds": state["rollout"], "tokens": state["tokens"]}
            )
            state.update(last=now, rollout=0.0, tokens=0)

    return StepTimer()


def _common_args(
    out_dir: str, batch: int, learning_rate: float, seed: int, device: str = "cpu", bf16=False, checkpointing=False
) -> dict:
    """The trainer settings every TRL system shares, so the workload cannot drift between them: B samples
    per optimisation step, temperature 1, a constant learning rate, fp32 (``bf16``: TRL's bf16 mixed precision,
    over a model loaded in bf16) and no gradient checkpointing (TRL defaults to bf16 and checkpointing), the CPU
    (``device="cuda"``: the GPU), and no logging, saving, reporting or progress bar. ``checkpointing``: TRL's
    gradient checkpointing on (non-reentrant)."""
    return {
        "output_dir": out_dir,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "temperature": 1.0,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "constant",
        "bf16": bf16,
        "gradient_checkpointing": checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
        "use_cpu": device == "cpu",
        "report_to": "none",
        "logging_strategy": "no",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": seed,
    }


def run_group_trainer(
    kind: str,
    lm: str,
    prompts: list[str],
    reward: Callable,
    batch: int,
    new_tokens: int,
    steps: int,
    *,
    learning_rate: float,
    beta: float,
    seed: int,
    suppress_eos: bool = True,
    callbacks: list | None = None,
    lora_rank: int = 0,
    num_iterations: int = 1,
    device: str = "cpu",
    bf16: bool = False,
    gradient_checkpointing: bool = False,
) -> list[dict]:
    """TRL GRPOTrainer (``kind="grpo"``) or RLOOTrainer (``"rloo"``): ``steps`` steps of ``batch`` completions.

    ``num_iterations`` optimisation steps per generation batch (GRPO's mu; 1 by default):
    ``per_device_train_batch_size = generation_batch_size = batch`` (``batch / 4`` prompts x
    ``num_generations=4``), ``gradient_accumulation_steps=1``.
    Exactly ``new_tokens`` per completion: ``max_completion_length = min_new_tokens = new_tokens`` (generate
    sets the eos logit to -inf until then). fp32 (``bf16=False``), no gradient checkpointing, dropout off,
    constant learning rate, no logging, saving or reporting. ``beta`` is the KL coefficient (0 drops the
    reference model; GRPO adds the k3 KL to the per-token loss, RLOO subtracts ``beta`` x the summed k1 KL
    from the reward). RLOO always runs an extra no-grad pass for the old log-probs; GRPO skips it when
    generation and optimisation are aligned, as here. ``lora_rank > 0`` trains peft LoRA adapters of that rank
    (``peft_config``: alpha 2 x rank, dropout 0, every linear layer of the blocks, ``"all-linear"``) instead of
    every weight; the reference is then the base with the adapters off. ``device="cuda"``: on the GPU;
    ``bf16``: the policy and reference loaded in bf16 (``model_init_kwargs``) and TRL's ``bf16=True``.

    Returns:
        The per-step rows.
    """
    quiet()
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    if batch % GROUP_SIZE:
        raise ValueError(f"{kind}: batch {batch} is not a multiple of num_generations={GROUP_SIZE}")
    tokenizer = AutoTokenizer.from_pretrained(lm)
    out_dir = tempfile.mkdtemp(prefix=f"textrl-peers-{kind}-")  # nothing is saved there; removed at the end
    args = Config(
        **_common_args(out_dir, batch, learning_rate, seed, device, bf16, gradient_checkpointing),
        model_init_kwargs={"dtype": "bfloat16"} if bf16 else None,
        num_generations=GROUP_SIZE,
        num_iterations=num_iterations,
        max_completion_length=new_tokens,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"min_new_tokens": new_tokens} if suppress_eos else None,
        beta=beta,
        max_steps=steps,
        disable_dropout=True,
        dataloader_num_workers=0,
    )
    rows: list[dict] = []
    state = {"last": 0.0, "rollout": 0.0, "tokens": 0}
    lora = {}
    if lora_rank > 0:
        from peft import LoraConfig

        lora["peft_config"] = LoraConfig(
            r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = Trainer(
        model=lm,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[_step_timer(rows, state), *(callbacks or [])],
        **lora,
    )
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every log
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t0 = time.perf_counter()
        out = generate(inputs)
        _synchronize()
        state["rollout"] += time.perf_counter() - t0
        state["tokens"] += int(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = timed_generate
    torch.manual_seed(seed)
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return rows


def sequence_reward_model(reward: Callable, tokenizer, prompt_len: int):
    """A TRL-1.12-PPO "reward model" (an ``nn.Module``) around a plain sequence reward function.

    PPOTrainer scores with ``model.score(getattr(model, model.base_model_prefix)(input_ids, ...).hidden_states[-1])``
    and reads the score at the last completion position. Here the "backbone" passes the token ids and the
    attention mask through as its hidden state and ``score`` decodes the completions (after ``prompt_len``),
    calls the reward function and writes each row's reward at every position. No parameters, no dropout.
    """
    from types import SimpleNamespace

    import torch
    from torch import nn

    class PassThrough(nn.Module):
        def forward(self, input_ids, attention_mask, **_):
            hidden = torch.stack([input_ids, attention_mask.long()], -1).float()  # (B, S, 2)
            return SimpleNamespace(hidden_states=(hidden,))

    class RewardModel(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = PassThrough()

        def score(self, hidden):
            ids, mask = hidden[..., 0].long(), hidden[..., 1].bool()  # (B, S) each
            completions = [
                tokenizer.decode(row[prompt_len:][m[prompt_len:]].tolist(), skip_special_tokens=True)
                for row, m in zip(ids, mask, strict=True)
            ]
            scores = torch.tensor(reward(completions=completions), dtype=torch.float32)  # (B,)
            return scores[:, None, None].expand(-1, ids.shape[1], 1)  # (B, S, 1)

    return RewardModel()


def run_trl_ppo(
    lm: str,
    prompts: list[str],
    reward: Callable,
    batch: int,
    new_tokens: int,
    steps: int,
    *,
    learning_rate: float,
    kl_coef: float,
    seed: int,
) -> list[dict]:
    """TRL 1.12 ``trl.experimental.ppo.PPOTrainer``: ``steps`` PPO updates of ``batch`` prompts.

    One optimisation step per batch: ``num_ppo_epochs=1``, ``num_mini_batches=1``,
    ``gradient_accumulation_steps=1``; ``response_length=new_tokens``, temperature 1, the reward function
    wrapped by :func:`sequence_reward_model`, the value model an ``AutoModelForSequenceClassification``
    (``num_labels=1``) of the same folder (TRL's design: a separate critic trunk), the reference a frozen copy
    that TRL always runs (``kl_coef=0`` only zeroes the penalty). fp32, no gradient checkpointing, dropout off
    (TRL disables it), no sample generations, logging or saving. EOS (and pad, which PPOTrainer would read as
    the end of a response) are suppressed by a forward hook on the policy's and reference's LM head, so
    sampling, the stored log-probs and the update all see the same distribution.

    The rollout runs from the start of generation to the first training forward through the policy-and-value
    wrapper (generation, the reference, value and reward passes, GAE and TRL's ``gc.collect()`` in between).
    """
    quiet()
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(lm)
    banned = torch.tensor(sorted({tokenizer.eos_token_id, tokenizer.pad_token_id}))

    def suppress(_module, _inputs, logits):
        return logits.index_fill(-1, banned, float("-inf"))

    policy = AutoModelForCausalLM.from_pretrained(lm)
    ref_policy = AutoModelForCausalLM.from_pretrained(lm)
    for model in (policy, ref_policy):
        model.get_output_embeddings().register_forward_hook(suppress)
    value_model = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    prompt_len = len(tokenizer(prompts[0])["input_ids"])
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    if {len(ids) for ids in dataset["input_ids"]} != {prompt_len}:
        raise ValueError("trl-ppo: every prompt must have the same number of tokens")
    out_dir = tempfile.mkdtemp(prefix="textrl-peers-trl-ppo-")  # nothing is saved there; removed at the end
    args = PPOConfig(
        **_common_args(out_dir, batch, learning_rate, seed),
        num_mini_batches=1,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=batch,
        total_episodes=steps * batch,
        response_length=new_tokens,
        stop_token=None,
        missing_eos_penalty=None,
        kl_coef=kl_coef,
        num_sample_generations=0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=sequence_reward_model(reward, tokenizer, prompt_len),
        train_dataset=dataset,
        value_model=value_model,
        eval_dataset=dataset,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every step's metrics
    rows: list[dict] = []
    state = {"last": 0.0, "rollout": 0.0, "tokens": 0, "start": 0.0}
    trainer.add_callback(_step_timer(rows, state))

    batch_generation = ppo_module.batch_generation
    forward = ppo_module.forward

    def timed_batch_generation(model, queries, *args, **kwargs):
        state["start"] = time.perf_counter()  # the rollout's first work
        query_responses, logits = batch_generation(model, queries, *args, **kwargs)
        state["tokens"] += query_responses[:, queries.shape[1] :].numel()
        return query_responses, logits

    def timed_forward(model, *args, **kwargs):
        if model is trainer.model and state["rollout"] == 0.0:  # the first training forward of the step
            state["rollout"] = time.perf_counter() - state["start"]
        return forward(model, *args, **kwargs)

    ppo_module.batch_generation = timed_batch_generation
    ppo_module.forward = timed_forward
    torch.manual_seed(seed)
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return rows
