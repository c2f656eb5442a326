"""Data-parallel training on CPU with gloo and 2 processes, as torchrun runs it.

- The processes start from the same weights, take the same steps and stay identical; the 2-process update
  equals one process's update on the combined batch (the same rows and sampled tokens) within 1e-5.
- Only rank 0 writes TensorBoard logs and checkpoints, and the checkpoint holds every rank's RNG state.
- A process that dies ends the others with a clear error instead of a hang, and the run resumes exactly.
- Two torchrun launchers (two "nodes" on 127.0.0.1, c10d rendezvous) train together.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.runner import resolve_resume
from textrl import checkpoint as ckpt
from textrl.rollout import Rollout
from textrl.runtime import DistributedError, Runtime

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def launch(args: list[str], world: int = 2, timeout: float = 300, **extra: str) -> list[subprocess.CompletedProcess]:
    """Start ``world`` processes of ``python args...`` with the variables torchrun sets, wait for all."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = _env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        env |= extra
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE
            )
        )
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def updates(llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp")
    results = launch([str(WORKER), str(llama_dir), str(out), "updates"])
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank}:\n{r.stderr[-3000:]}"
    return out


KINDS = ("reinforce", "ppo", "reinforce-lora", "ppo-lora-minibatches")
EQUAL = KINDS[:3]
"""With one minibatch per epoch: several minibatches are drawn per process (a share of each from every
process), which one process drawing from the whole batch does not reproduce row for row."""


def _combined(parts: list[dict[str, torch.Tensor]], pad_id: int) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    """The ranks' rollouts as one batch: prompts left-padded to the longest, completions right-padded."""
    P = max(int(p["prompt_len"]) for p in parts)
    T = max(p["actions"].shape[1] for p in parts)
    cols: dict[str, list[torch.Tensor]] = {}
    for p in parts:
        lead, tail = P - int(p["prompt_len"]), T - p["actions"].shape[1]
        for name in ("ids", "attention_mask"):
            fill = pad_id if name == "ids" else 0
            x = torch.nn.functional.pad(p[name], (lead, 0), value=fill)
            cols.setdefault(name, []).append(torch.nn.functional.pad(x, (0, tail), value=fill))
        for name in ("actions", "logprobs", "values", "rewards", "action_mask", "penalised", "kl"):
            value = pad_id if name == "actions" else 0
            cols.setdefault(name, []).append(torch.nn.functional.pad(p[name], (0, tail), value=value))
    c = {k: torch.cat(v) for k, v in cols.items()}
    B = c["ids"].shape[0]
    rollout = Rollout(
        ids=c["ids"],
        attention_mask=c["attention_mask"],
        prompt_len=P,
        actions=c["actions"],
        logprobs=c["logprobs"],
        values=c["values"],
        rewards=c["rewards"],
        action_mask=c["action_mask"],
        prompt_index=np.zeros(B, dtype=np.int64),
        prompts=[""] * B,
        completions=[""] * B,
        components={},
        terminated=np.zeros(B, dtype=bool),
    )
    return rollout, c["penalised"], c["kl"]


@pytest.mark.parametrize("kind", EQUAL)
def test_two_processes_update_as_one_process_on_the_combined_batch(updates, llama_dir, kind):
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    init = [load_file(updates / f"{kind}-init-{r}.safetensors") for r in (0, 1)]
    after = [load_file(updates / f"{kind}-after-{r}.safetensors") for r in (0, 1)]
    parts = [load_file(updates / f"{kind}-rollout-{r}.safetensors") for r in (0, 1)]
    # each rank sampled its own rows: the same prompt groups drawn, a different sampling stream
    assert not torch.equal(parts[0]["actions"], parts[1]["actions"][:, : parts[0]["actions"].shape[1]])
    assert all(torch.equal(init[0][k], init[1][k]) for k in init[0])  # rank 0's weights were broadcast to all
    for name in after[0]:  # one step, the same on every process
        assert torch.equal(after[0][name], after[1][name]), name

    agent = worker.make(kind, str(llama_dir))  # one process (no torchrun variables here)
    assert agent.runtime.world_size == 1
    assert all(torch.equal(init[0][k], v) for k, v in worker.weights(agent).items())
    rollout, penalised, kl = _combined(parts, agent.env.pad_id)
    assert rollout.ids.shape[0] == 8 and int(rollout.action_mask.sum()) == sum(
        int(p["action_mask"].sum()) for p in parts
    )
    with worker.captured_gradients(agent) as grads:
        agent._guarded_train(rollout, penalised, kl)
    # the gradients the steps applied: the all-reduced sum of the ranks' shares is the combined batch's
    theirs = load_file(updates / f"{kind}-grads-{0}.safetensors")
    assert theirs.keys() == grads.keys() and len({k.split(".")[0] for k in grads}) == (2 if "ppo" in kind else 1)
    largest = max(float(g.abs().max()) for g in grads.values())
    assert largest > 1e-3
    for name, g in grads.items():
        torch.testing.assert_close(theirs[name], g, rtol=0, atol=1e-5 * largest, msg=name)
    for name, value in worker.weights(agent).items():  # and so the weights after the update
        torch.testing.assert_close(after[0][name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_processes_stay_identical_and_only_rank_0_writes(updates, kind):
    final = [load_file(updates / f"{kind}-final-{r}.safetensors") for r in (0, 1)]
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name
    counts = [(updates / f"{kind}-iterations-{r}.txt").read_text() for r in (0, 1)]
    assert counts[0] == counts[1]  # the same iterations and token count (the whole batch's) on both
    iterations, tokens = map(int, counts[0].split())
    assert iterations >= 3 and tokens >= 3 * 8 * 6
    (run,) = (updates / f"{kind}-runs").iterdir()  # one run folder, made by rank 0
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints and not list((run / "checkpoints").glob(".step-*"))
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state["world_size"] == 2 and state["num_timesteps"] == tokens
    rng = load_file(checkpoints[-1] / "rng.safetensors")
    assert {"generator", "torch", "generator.rank1", "torch.rank1"} <= rng.keys()
    assert not torch.equal(rng["generator"], rng["generator.rank1"])  # each rank's own stream


def test_a_non_finite_batch_on_one_rank_is_skipped_by_all_and_a_dead_rank_ends_the_others(llama_dir, tmp_path):
    t0 = time.monotonic()
    results = launch([str(WORKER), str(llama_dir), str(tmp_path), "faults"], TEXTRL_DIST_TIMEOUT="60")
    elapsed = time.monotonic() - t0
    # the KL penalty was infinite on rank 1 alone: both skipped that batch, and stayed identical
    counts = [(tmp_path / f"skip-{r}.txt").read_text().split() for r in (0, 1)]
    assert counts[0] == counts[1] and int(counts[0][1]) == 1 and int(counts[0][0]) >= 4
    final = [load_file(tmp_path / f"skip-final-{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert "skipping batch: non-finite KL penalty" in results[0].stdout and "(0 on rank 0)" in results[0].stdout
    assert "skipping batch" not in results[1].stdout  # rank 0 speaks for all
    # then rank 1 died: rank 0 got a clear error at once, not after the timeout
    assert results[1].returncode == 3
    assert results[0].returncode == 1, results[0].stderr[-3000:]
    message = (tmp_path / "error-0.txt").read_text()
    assert message.startswith("rank 0 of 2: ") and "another process died or did not answer" in message
    assert elapsed < 60  # the survivor did not wait out the timeout: the dead peer's connection closed


def test_bad_layouts_are_clear_errors(llama_dir, monkeypatch):
    from agents import PPO, REINFORCE, PPOConfig, REINFORCEConfig
    from envs import TextGenEnv

    env = TextGenEnv(lm=str(llama_dir), prompts=["a b"], max_new_tokens=2, reward=lambda ids: np.zeros(len(ids)))
    two = Runtime(torch.device("cpu"), rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"batch_size 8 does not split over 2 processes in whole groups of 8"):
        REINFORCE(env, lm=str(llama_dir), config=REINFORCEConfig(batch_size=8, group_size=8), runtime=two)
    with pytest.raises(ValueError, match=r"batch_size 6 does not split over 4 processes in whole groups of 1"):
        PPO(
            env,
            lm=str(llama_dir),
            config=PPOConfig(batch_size=6, minibatch_size=2),
            runtime=Runtime(torch.device("cpu"), rank=0, world_size=4),
        )
    # a runtime of 2 processes without a process group: says how to make one
    with pytest.raises(DistributedError, match=r"needs torch\.distributed's process group"):
        REINFORCE(env, lm=str(llama_dir), config=REINFORCEConfig(batch_size=4, group_size=2), runtime=two)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match=r"MASTER_ADDR.*start the processes with torchrun"):
        Runtime.from_env("cpu")


# --- torchrun ------------------------------------------------------------------------------------------

CHILD = r'''
"""`textrl train` under torchrun; TEXTRL_TEST_KILL_AT=k: rank 1 kills itself (SIGKILL) as it logs iteration k."""
import os, signal, sys

from agents import base, cli

kill_at = int(os.environ.get("TEXTRL_TEST_KILL_AT", "0"))
log = base.BaseAgent._log


def logged(self, rollout, stats):
    if self.runtime.rank == 1 and self.iteration == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    log(self, rollout, stats)


base.BaseAgent._log = logged
sys.exit(cli.main(sys.argv[1:]))
'''

TRAIN_ARGS = [
    "train", "--env", "textrl/TextGen-v0", "--agent", "reinforce", "--seed", "5", "--progress", "0",
    "--env-kwargs", json.dumps({"reward": "keyword_reward", "max_new_tokens": 8}),
    "--batch-size", "8", "--group-size", "2", "--kl-target", "1.0",
    "--checkpoint-interval", "1", "--total-timesteps", "384",
]  # fmt: skip
"""The embedded `tiny` LM, 8 episodes of 8 tokens per iteration (4 per process), adaptive KL, a checkpoint every
iteration, 6 iterations."""


def torchrun(args: list[str], cwd: Path, nproc: int = 2, extra: list[str] | None = None, **env: str):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *(extra or [])]
    if not extra:
        launcher += ["--standalone"]
    return subprocess.Popen(
        [*launcher, *args], cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _final(run: Path) -> Path:
    return sorted(p for p in (run / "checkpoints").glob("step-*") if (p / ckpt.MANIFEST).exists())[-1]


def test_torchrun_kill_one_rank_then_resume_continues_exactly(tmp_path):
    (tmp_path / "child.py").write_text(CHILD)
    # the reference: the whole run, uninterrupted, through the real entry point
    ref = torchrun(["-m", "textrl", *TRAIN_ARGS, "--tensorboard-log", "ref"], tmp_path)
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    assert "reward (mean per episode)" in out and out.count("tokens; TensorBoard logs") == 1  # rank 0 reports

    t0 = time.monotonic()
    killed = torchrun(["child.py", *TRAIN_ARGS, "--tensorboard-log", "runs"], tmp_path, TEXTRL_TEST_KILL_AT="4")
    out, err = killed.communicate(timeout=300)
    assert killed.returncode != 0
    assert time.monotonic() - t0 < 120
    assert "ChildFailedError" in err and "Signal 9 (SIGKILL)" in err and "rank      : 1" in err, err[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((resolve_resume(run) / "state.json").read_text())["iteration"] == 3

    resumed = torchrun(["-m", "textrl", "train", "--resume", str(run), "--progress", "0"], tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in out
    (ref_run,) = (tmp_path / "ref").iterdir()
    a, b = _final(ref_run), _final(run)
    assert a.name == b.name
    for name in ("policy/model.safetensors", "value_head.safetensors", "optimizer.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    # each rank's sampling stream (torch's global RNG is saved too, but no part of a run draws from it)
    x, y = load_file(a / "rng.safetensors"), load_file(b / "rng.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in ("generator", "generator.rank1"))
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    for key in ("iteration", "num_timesteps", "kl_controller", "np_rng", "world_size"):
        assert sa[key] == sb[key], key


def test_two_nodes_on_localhost_train_together(tmp_path):
    port = free_port()
    nodes = [
        torchrun(
            ["-m", "textrl", *TRAIN_ARGS, "--total-timesteps", "128", "--tensorboard-log", "runs"],
            tmp_path,
            nproc=1,
            extra=[
                "--nnodes=2",
                f"--node-rank={rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=textrl-test",
            ],
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (_out, err) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert sum("tokens; TensorBoard logs" in out for out, _ in outs) == 1  # one rank 0 reports
    (run,) = (tmp_path / "runs").iterdir()
    state = json.loads((_final(run) / "state.json").read_text())
    assert state["world_size"] == 2 and state["num_timesteps"] >= 128
