"""Run folders and TensorBoard logging: ``runs/{env}__{agent}__{seed}__{time}/``.

Scalar namespaces: ``rollout/`` (reward mean/std, each reward component, episode length, KL to the
reference), ``losses/`` (policy, value, entropy, approx_kl, clipfrac, explained_variance), ``charts/``
(learning rate, KL coefficient, tokens per second). Sample completions go to the text tab with their
rewards, the config as a markdown table (and ``config.json`` in the folder).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from textrl.config import config_markdown, save_config

Sample = tuple[str, str, float]
"""(prompt, completion, episode reward)."""


def run_name(env_id: str, agent: str, seed: int | None) -> str:
    """``{env}__{agent}__{seed}__{unix time}`` with the env id made path-safe.

    >>> run_name("textrl/TextGen-v0", "ppo", 1).rsplit("__", 1)[0]
    'textrl_TextGen-v0__ppo__1'
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", env_id)
    return f"{safe}__{agent}__{seed}__{int(time.time())}"


def new_run_dir(parent: Path, name: str, numbered: bool = False, new: bool = True) -> Path:
    """The folder of a run called ``name`` under ``parent``.

    ``numbered`` (an explicit ``tb_log_name``, as in stable-baselines3): ``{name}_{i}``, with ``i`` one past the
    highest existing for a ``new`` run, the highest (or 1) for a continued one. Otherwise ``name`` itself, with
    ``_2``, ``_3``, ... appended when that folder exists (such names carry a time: there is none to continue).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> top = Path(tmp.name)
    >>> new_run_dir(top, "ppo", numbered=True).name, new_run_dir(top, "ppo", numbered=True, new=False).name
    ('ppo_1', 'ppo_1')
    >>> (top / "ppo_1").mkdir(); (top / "ppo_7").mkdir()
    >>> new_run_dir(top, "ppo", numbered=True).name, new_run_dir(top, "ppo", numbered=True, new=False).name
    ('ppo_8', 'ppo_7')
    >>> tmp.cleanup()
    """
    if numbered:
        pattern = re.compile(rf"^{re.escape(name)}_(\d+)$")
        taken = [int(m.group(1)) for p in parent.glob(f"{name}_*") if (m := pattern.match(p.name)) and p.is_dir()]
        latest = max(taken, default=0)
        return parent / f"{name}_{latest + 1 if new or latest == 0 else latest}"
    path, i = parent / name, 1
    while path.exists():
        i += 1
        path = parent / f"{name}_{i}"
    return path


class RunLogger:
    """A TensorBoard writer for one run folder (created lazily, so a run with no logging writes nothing)."""

    def __init__(self, folder: str | Path, config: Any = None, purge_step: int | None = None):
        """``purge_step``: when resuming, hide events at steps >= it (logged after the last checkpoint)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.folder), purge_step=purge_step)
        if config is not None:
            self.writer.add_text("config", config_markdown(config))
            save_config(config, self.folder)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            if value is not None and np.isfinite(value):
                self.writer.add_scalar(key, float(value), step)

    def histogram(self, key: str, values: np.ndarray, step: int) -> None:
        if len(values):
            self.writer.add_histogram(key, np.asarray(values, dtype=np.float64), step)

    def samples(self, prompts: list[str], completions: list[str], rewards: np.ndarray, step: int, n: int = 8) -> None:
        """Log up to ``n`` completions with their rewards as a markdown table."""
        self.writer.add_text("samples", samples_markdown(prompts, completions, rewards, n), step)

    def eval_samples(self, greedy: list[Sample], sampled: list[Sample], step: int) -> None:
        """Log evaluation completions, greedy beside sampled, with their rewards (``eval/samples``)."""
        self.writer.add_text("eval/samples", eval_samples_markdown(greedy, sampled), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def samples_markdown(prompts: list[str], completions: list[str], rewards, n: int = 8) -> str:
    """Up to ``n`` completions with their rewards as a markdown table (newlines shown as ⏎).

    >>> print(samples_markdown(["Hi"], ["there|"], [1.0]))
    |reward|prompt|completion|
    |-|-|-|
    |1.000|Hi|there\\||
    """
    rows = ["|reward|prompt|completion|", "|-|-|-|"]
    for p, c, r in list(zip(prompts, completions, rewards, strict=True))[:n]:
        rows.append(f"|{r:.3f}|{_md(p)}|{_md(c)}|")
    return "\n".join(rows)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎")


def eval_samples_markdown(
    greedy: list[tuple[str, str, float]], sampled: list[tuple[str, str, float]], n: int = 8
) -> str:
    """Up to ``n`` evaluation prompts with their greedy and sampled completions and rewards, as a markdown table.

    >>> print(eval_samples_markdown([("Hi", " there", 1.0)], [("Hi", " you", 0.0)]))
    |prompt|greedy|reward|sampled|reward|
    |-|-|-|-|-|
    |Hi| there|1.000| you|0.000|
    """
    rows = ["|prompt|greedy|reward|sampled|reward|", "|-|-|-|-|-|"]
    for (prompt, g, rg), (_, s, rs) in list(zip(greedy, sampled, strict=True))[:n]:
        rows.append(f"|{_md(prompt)}|{_md(g)}|{rg:.3f}|{_md(s)}|{rs:.3f}|")
    return "\n".join(rows)
