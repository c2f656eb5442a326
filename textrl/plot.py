"""Learning curves from TensorBoard logs to a PNG: ``textrl plot runs/my_run [more runs] --tags 'losses/*'``.

A run is a folder that holds ``events.out.tfevents.*`` files (a :class:`textrl.logger.RunLogger` run, a
``textrl pretrain`` run, or a stable-baselines3 ``PPO_1`` folder). A folder given on the command line may
also hold runs in its subfolders (``runs/``, or an SB3 ``tensorboard_log`` folder); each folder with event
files is one run, as in TensorBoard.

The figure has one subplot per tag, x = the logged global step (generated tokens for textrl agents), one
line per run, smoothed with TensorBoard's debiased exponential moving average and the raw values drawn
faintly behind.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_TAGS = (
    "rollout/reward_mean",
    "rollout/ep_rew_mean",
    "rollout/kl_ref",
    "eval/mean_reward",
    "eval/loss",
)
"""Tags plotted by default when a run has them: reward mean (textrl, SB3), KL to the reference, evaluation."""

DPI = 100
"""Dots per inch of the PNG (width and height are given in pixels)."""


@dataclass
class PlotConfig:
    """Settings of `textrl plot`."""

    runs: list[str] = field(default_factory=list)
    """Run folders (holding events.out.tfevents.* files directly or in subfolders)."""
    tags: list[str] = field(default_factory=list)
    """Extra tags to plot; glob patterns allowed, e.g. 'rollout/reward/*' or 'losses/*'."""
    default_tags: bool = True
    """Also plot the default tags that exist: rollout/reward_mean or ep_rew_mean, rollout/kl_ref, eval/..."""
    smooth: float = 0.6
    """Exponential moving average weight in [0, 1), as TensorBoard's slider (0 = raw values only)."""
    out: str | None = None
    """PNG to write (none: <run>/curves.png for one run folder, curves.png for several)."""
    title: str = ""
    """Figure title (empty: the run's name when there is one run)."""
    width: int | None = None
    """Image width in pixels (none: 560 per subplot column)."""
    height: int | None = None
    """Image height in pixels (none: 360 per subplot row)."""


class Series(NamedTuple):
    """One scalar tag of one run, in logging order."""

    steps: np.ndarray
    """Global steps, int64."""
    values: np.ndarray
    """Logged values, float64."""


@dataclass
class Run:
    """The scalars of one folder with event files."""

    name: str
    """Legend label: the folder's name (with its parent's when found inside a given folder)."""
    path: Path
    """The folder holding the event files."""
    scalars: dict[str, Series]
    """Tag -> series."""


def find_run_dirs(folder: str | Path) -> list[Path]:
    """The folder itself if it holds event files, and every subfolder that does, sorted.

    Raises:
        ValueError: if the folder does not exist or no event file is in it or below it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"run folder {str(folder)!r} does not exist")
    dirs = sorted({p.parent for p in folder.rglob("*tfevents*") if p.is_file()})
    if not dirs:
        raise ValueError(f"no TensorBoard event files (events.out.tfevents.*) in {str(folder)!r} or its subfolders")
    return dirs


def load_scalars(folder: str | Path) -> dict[str, Series]:
    """All scalars logged in one folder's event files (every point kept, none sampled away).

    Args:
        folder: a folder holding ``events.out.tfevents.*`` files (subfolders are not read).

    Returns:
        ``{tag: Series}`` for every scalar tag.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()[SCALARS]:
        events = acc.Scalars(tag)
        steps = np.array([e.step for e in events], dtype=np.int64)
        values = np.array([e.value for e in events], dtype=np.float64)
        out[tag] = Series(steps, values)
    return out


def load_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Load every run in the given folders (see :func:`find_run_dirs`), labelled for a legend."""
    if not folders:
        raise ValueError("no run folder given")
    runs = []
    for folder in folders:
        top = Path(folder)
        for path in find_run_dirs(top):
            name = top.name if path == top else (Path(top.resolve().name) / path.relative_to(top)).as_posix()
            runs.append(Run(name, path, load_scalars(path)))
    names = [r.name for r in runs]
    for run in runs:  # two folders of the same name: label them by their whole path
        if names.count(run.name) > 1:
            run.name = run.path.as_posix()
    return runs


def available_tags(runs: Sequence[Run]) -> list[str]:
    """Every scalar tag of any run, sorted."""
    return sorted({tag for run in runs for tag in run.scalars})


def select_tags(runs: Sequence[Run], patterns: Sequence[str] = (), default_tags: bool = True) -> list[str]:
    """The tags to plot: the :data:`DEFAULT_TAGS` any run has, then the matches of each pattern in order.

    Args:
        runs: loaded runs.
        patterns: tag names or ``fnmatch`` globs (``*`` also matches ``/``).
        default_tags: include the default tags that exist.

    Returns:
        Tags without repeats; each pattern's matches sorted.

    Raises:
        ValueError: if a pattern matches no tag of any run, or nothing is left to plot; the message lists
            the available tags.
    """
    available = available_tags(runs)
    chosen = [t for t in DEFAULT_TAGS if t in available] if default_tags else []
    for pattern in patterns:
        matches = fnmatch.filter(available, pattern)
        if not matches:
            raise ValueError(f"tag {pattern!r} matches no scalar in any run; available tags: {', '.join(available)}")
        chosen += [t for t in matches if t not in chosen]
    if not chosen:
        why = f"no run has a default tag ({', '.join(DEFAULT_TAGS)})" if default_tags else "default tags off"
        raise ValueError(f"nothing to plot: {why} and no --tags; available tags: {', '.join(available)}")
    return chosen


def smooth(values: Sequence[float] | np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average debiased for its zero start.

    ``s_t = m_t / (1 - weight**t)`` with ``m_t = weight * m_{t-1} + (1 - weight) * x_t`` and ``m_0 = 0``,
    i.e. the average of ``x_1..x_t`` with weights ``weight**(t - i)``. Non-finite values pass through
    unchanged and do not enter the average.

    >>> smooth([1.0, 2.0, 3.0], 0.5).round(4).tolist()
    [1.0, 1.6667, 2.4286]
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    values = np.asarray(values, dtype=np.float64)
    out = values.copy()
    last, n = 0.0, 0
    for i, x in enumerate(values):
        if np.isfinite(x):
            last = weight * last + (1.0 - weight) * x
            n += 1
            out[i] = last / (1.0 - weight**n)
    return out


def plot_runs(
    runs: Sequence[Run],
    tags: Sequence[str],
    smooth_weight: float = 0.6,
    title: str = "",
    width: int | None = None,
    height: int | None = None,
) -> Figure:
    """One subplot per tag, one line per run (legend: run names when there are several).

    Args:
        runs: loaded runs; a run without a tag is left out of that subplot.
        tags: tags to plot, one subplot each.
        smooth_weight: EMA weight (see :func:`smooth`); when > 0 the raw values are drawn faintly behind.
        title: figure title (default: the run's name when there is one run).
        width: image width in pixels (default 560 per column).
        height: image height in pixels (default 360 per row).

    Returns:
        An Agg-backed figure (no display needed); ``fig.savefig(path)`` writes it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: `textrl --help` stays quick
    from matplotlib.figure import Figure

    ncols = min(len(tags), 2)
    nrows = math.ceil(len(tags) / ncols)
    width = width or 560 * ncols
    height = height or 360 * nrows
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for k, tag in enumerate(tags):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for run, color in zip(runs, colors, strict=True):
            series = run.scalars.get(tag)
            if series is None:
                continue
            if smooth_weight > 0:
                ax.plot(series.steps, series.values, color=color, alpha=0.25, linewidth=1)
                ax.plot(series.steps, smooth(series.values, smooth_weight), color=color, label=run.name)
            else:
                ax.plot(series.steps, series.values, color=color, label=run.name)
        ax.set_title(tag, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    title = title or (runs[0].name if len(runs) == 1 else "")
    if title:
        fig.suptitle(title)
    return fig


def default_out(folders: Sequence[str | Path]) -> Path:
    """``<folder>/curves.png`` for one run folder, ``curves.png`` for several."""
    return Path(folders[0]) / "curves.png" if len(folders) == 1 else Path("curves.png")


def summary_lines(runs: Sequence[Run], tags: Sequence[str]) -> list[str]:
    """One line per run and tag: ``run  tag: first -> last (n points)``."""
    lines = []
    for run in runs:
        for tag in tags:
            s = run.scalars.get(tag)
            if s is not None and len(s.values):
                lines.append(f"{run.name}  {tag}: {s.values[0]:.4g} -> {s.values[-1]:.4g} ({len(s.values)} points)")
    return lines


def plot(cfg: PlotConfig) -> tuple[Path, list[Run], list[str]]:
    """Load ``cfg.runs``, draw the chosen tags and write the PNG.

    Returns:
        The PNG's path, the runs and the tags plotted.

    Raises:
        ValueError: on a missing folder, a folder without event files, a tag that matches nothing,
            or a bad smoothing weight or image size.
    """
    if not 0.0 <= cfg.smooth < 1.0:
        raise ValueError(f"--smooth must be in [0, 1), got {cfg.smooth}")
    for name, pixels in (("width", cfg.width), ("height", cfg.height)):
        if pixels is not None and pixels < 50:
            raise ValueError(f"--{name} must be at least 50 pixels, got {pixels}")
    runs = load_runs(cfg.runs)
    tags = select_tags(runs, cfg.tags, cfg.default_tags)
    fig = plot_runs(runs, tags, cfg.smooth, cfg.title, cfg.width, cfg.height)
    out = Path(cfg.out) if cfg.out else default_out(cfg.runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out, runs, tags
