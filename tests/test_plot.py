"""`textrl plot`: learning curves read back from real TensorBoard event files and drawn to a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from agents.cli import main
from textrl.logger import RunLogger
from textrl.plot import (
    PlotConfig,
    default_out,
    load_runs,
    load_scalars,
    plot,
    plot_runs,
    select_tags,
    smooth,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Values exactly representable in float32 (TensorBoard stores scalars as float32).
RUN_A = {
    "rollout/reward_mean": [(0, 0.5), (64, 1.25), (128, 2.0)],
    "rollout/kl_ref": [(0, 0.0), (64, 0.125), (128, 0.25)],
    "rollout/reward/keyword": [(0, 0.25), (64, 0.75), (128, 1.0)],
    "rollout/reward/length": [(0, -0.5), (64, -0.25), (128, 0.0)],
    "losses/policy_loss": [(0, 1.5), (64, -0.5), (128, 0.75)],
    "charts/tokens_per_second": [(0, 1000.0), (64, 1024.0), (128, 2048.0)],
}
RUN_B = {
    "rollout/reward_mean": [(0, -1.0), (32, 0.0), (64, 3.5), (96, 4.0)],
    "losses/policy_loss": [(0, 2.0), (96, 1.0)],
}


def write_run(folder: Path, scalars: dict[str, list[tuple[int, float]]]) -> Path:
    """Log ``{tag: [(step, value), ...]}`` through textrl's own RunLogger, one step at a time."""
    logger = RunLogger(folder)
    steps = sorted({step for points in scalars.values() for step, _ in points})
    for step in steps:
        logger.scalars({tag: v for tag, points in scalars.items() for s, v in points if s == step}, step)
    logger.close()
    return folder


def write_sb3_like(folder: Path, tag: str, points: list[tuple[int, float]]) -> Path:
    """An SB3-style log: ``folder/PPO_1/events...`` written with a plain SummaryWriter."""
    writer = SummaryWriter(str(folder / "PPO_1"))
    for step, value in points:
        writer.add_scalar(tag, value, step)
    writer.close()
    return folder


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


@pytest.fixture
def run_a(tmp_path) -> Path:
    return write_run(tmp_path / "run_a", RUN_A)


@pytest.fixture
def run_b(tmp_path) -> Path:
    return write_run(tmp_path / "run_b", RUN_B)


# --- loading ----------------------------------------------------------------------------------------------


def test_load_scalars_returns_what_was_written(run_a):
    loaded = load_scalars(run_a)
    assert set(loaded) == set(RUN_A)
    for tag, points in RUN_A.items():
        steps, values = zip(*points, strict=True)
        assert loaded[tag].steps.dtype == np.int64
        np.testing.assert_array_equal(loaded[tag].steps, steps)
        np.testing.assert_array_equal(loaded[tag].values, values)


def test_load_scalars_keeps_every_point(tmp_path):
    n = 10_500  # more than EventAccumulator's default scalar reservoir (10 000), which would sample some away
    write_sb3_like(tmp_path / "long", "rollout/reward_mean", [(i, float(i)) for i in range(n)])
    series = load_scalars(tmp_path / "long" / "PPO_1")["rollout/reward_mean"]
    np.testing.assert_array_equal(series.steps, np.arange(n))
    np.testing.assert_array_equal(series.values, np.arange(n, dtype=np.float64))


def test_runs_in_subfolders_are_found_and_labelled(tmp_path, run_a):
    sb3 = write_sb3_like(tmp_path / "sb3", "rollout/ep_rew_mean", [(0, 1.0), (2048, 3.0)])
    runs = load_runs([run_a, sb3])
    assert [r.name for r in runs] == ["run_a", "sb3/PPO_1"]
    assert runs[1].path == sb3 / "PPO_1"
    np.testing.assert_array_equal(runs[1].scalars["rollout/ep_rew_mean"].values, [1.0, 3.0])
    # the SB3 reward mean is a default tag, as is textrl's
    assert select_tags(runs) == ["rollout/reward_mean", "rollout/ep_rew_mean", "rollout/kl_ref"]


def test_folders_with_the_same_name_get_distinct_labels(tmp_path):
    first = write_run(tmp_path / "x" / "run", RUN_A)
    second = write_run(tmp_path / "y" / "run", RUN_B)
    assert [r.name for r in load_runs([first, second])] == [first.as_posix(), second.as_posix()]


# --- smoothing --------------------------------------------------------------------------------------------


def test_smooth_is_tensorboards_debiased_ema():
    # weight 0.5 on [1, 2, 3]: weights 0.5**(t-i) -> 1, (0.5*1 + 2)/1.5, (0.25*1 + 0.5*2 + 3)/1.75
    np.testing.assert_allclose(smooth([1.0, 2.0, 3.0], 0.5), [1.0, 5 / 3, 17 / 7])
    # weight 0.6 on [0, 10]: m = [0, 4], debias by 1 - 0.6**t = [0.4, 0.64]
    np.testing.assert_allclose(smooth([0.0, 10.0], 0.6), [0.0, 4.0 / 0.64])
    np.testing.assert_allclose(smooth([7.0, 7.0, 7.0, 7.0], 0.9), [7.0] * 4)  # no pull towards 0
    np.testing.assert_array_equal(smooth([3.0, -1.0, 4.0], 0.0), [3.0, -1.0, 4.0])


def test_smooth_passes_non_finite_values_through():
    out = smooth([1.0, np.nan, 3.0], 0.5)
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [1.0, (0.5 * 1 + 3) / 1.5])


@pytest.mark.parametrize("weight", [-0.1, 1.0, 1.5])
def test_smooth_rejects_weights_outside_0_1(weight):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        smooth([1.0, 2.0], weight)


# --- tag selection ----------------------------------------------------------------------------------------


def test_glob_tags_select_the_matching_tags(run_a):
    runs = load_runs([run_a])
    assert select_tags(runs, ["rollout/reward/*"]) == [
        "rollout/reward_mean",
        "rollout/kl_ref",
        "rollout/reward/keyword",
        "rollout/reward/length",
    ]
    assert select_tags(runs, ["rollout/reward/*"], default_tags=False) == [
        "rollout/reward/keyword",
        "rollout/reward/length",
    ]
    # patterns keep their order, matches are not repeated, '*' crosses '/'
    assert select_tags(runs, ["losses/*", "rollout/reward*"], default_tags=False) == [
        "losses/policy_loss",
        "rollout/reward/keyword",
        "rollout/reward/length",
        "rollout/reward_mean",
    ]
    assert select_tags(runs, ["charts/tokens_per_second"], default_tags=False) == ["charts/tokens_per_second"]


# --- drawing ----------------------------------------------------------------------------------------------


def test_png_is_written_at_the_requested_size(run_a, tmp_path):
    out = tmp_path / "figs" / "a.png"
    cfg = PlotConfig(runs=[str(run_a)], tags=["losses/*"], out=str(out), width=643, height=411, title="t")
    path, _, tags = plot(cfg)
    assert path == out
    assert tags == ["rollout/reward_mean", "rollout/kl_ref", "losses/policy_loss"]
    image = read_png(out)
    assert image.shape == (411, 643, 4)
    assert image[..., :3].std() > 0  # something was drawn


def test_default_size_grows_with_the_number_of_subplots(run_a, tmp_path):
    path, _, tags = plot(PlotConfig(runs=[str(run_a)], tags=["rollout/reward/*", "losses/*"]))
    assert len(tags) == 5  # two columns, three rows
    assert read_png(path).shape == (3 * 360, 2 * 560, 4)


def test_several_runs_are_overlaid_with_a_legend(run_a, run_b):
    runs = load_runs([run_a, run_b])
    tags = ["rollout/reward_mean", "rollout/kl_ref", "losses/policy_loss"]
    fig = plot_runs(runs, tags, smooth_weight=0.5)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == tags
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["run_a", "run_b"]
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["run_a"]  # run_b has no KL
    # each run: the raw values (faint) and the smoothed line (labelled), at the logged steps
    raw_a, smooth_a, raw_b, smooth_b = axes[0].get_lines()
    np.testing.assert_array_equal(raw_b.get_xdata(), [0, 32, 64, 96])
    np.testing.assert_array_equal(raw_b.get_ydata(), [-1.0, 0.0, 3.5, 4.0])
    np.testing.assert_allclose(smooth_b.get_ydata(), smooth([-1.0, 0.0, 3.5, 4.0], 0.5))
    assert raw_a.get_alpha() < 1 and smooth_a.get_alpha() is None
    assert raw_a.get_color() == smooth_a.get_color() != raw_b.get_color()


def test_no_smoothing_draws_only_the_raw_values(run_a):
    fig = plot_runs(load_runs([run_a]), ["rollout/reward_mean"], smooth_weight=0.0)
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [0.5, 1.25, 2.0])
    assert fig.axes[0].get_legend() is None and fig.get_suptitle() == "run_a"  # one run: named in the title


def test_default_out_is_inside_a_single_run(run_a, run_b, tmp_path, monkeypatch):
    assert default_out([run_a]) == run_a / "curves.png"
    assert default_out([run_a, run_b]) == Path("curves.png")
    monkeypatch.chdir(tmp_path)
    path, runs, _ = plot(PlotConfig(runs=[str(run_a), str(run_b)]))
    assert path == Path("curves.png") and (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert len(runs) == 2


# --- command line -----------------------------------------------------------------------------------------


def test_cli_plot_writes_the_png_and_a_summary(run_a, run_b, tmp_path, capsys):
    out = tmp_path / "both.png"
    argv = ["plot", str(run_a), str(run_b), "--tags", "losses/*", "--smooth", "0", "--out", str(out)]
    assert main([*argv, "--width", "500", "--height", "700", "--title", "A vs B"]) == 0
    stdout = capsys.readouterr().out
    assert read_png(out).shape == (700, 500, 4)
    assert f"wrote {out} (3 tags, 2 runs)" in stdout
    assert "run_a  rollout/reward_mean: 0.5 -> 2 (3 points)" in stdout
    assert "run_b  rollout/reward_mean: -1 -> 4 (4 points)" in stdout
    assert "run_b  losses/policy_loss: 2 -> 1 (2 points)" in stdout
    assert "run_b  rollout/kl_ref" not in stdout


def test_cli_plot_defaults_to_curves_png_in_the_run(run_a, capsys):
    assert main(["plot", str(run_a), "--default-tags", "false", "--tags", "charts/*"]) == 0
    assert f"wrote {run_a / 'curves.png'} (1 tags, 1 runs)" in capsys.readouterr().out
    assert read_png(run_a / "curves.png").shape == (360, 560, 4)


# --- bad input --------------------------------------------------------------------------------------------


def test_missing_folder_is_named(tmp_path, run_a):
    missing = tmp_path / "no_such_run"
    with pytest.raises(ValueError, match=rf"run folder '{missing}' does not exist"):
        load_runs([run_a, missing])


def test_folder_without_event_files_is_named(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"no TensorBoard event files .* in '{empty}'"):
        load_runs([empty])


def test_unmatched_tag_is_named_with_the_available_tags(run_a, run_b):
    runs = load_runs([run_a, run_b])
    with pytest.raises(ValueError, match=r"tag 'eval/\*' matches no scalar in any run; available tags: ") as e:
        select_tags(runs, ["losses/*", "eval/*"])
    assert "charts/tokens_per_second, losses/policy_loss, rollout/kl_ref" in str(e.value)


def test_no_default_tag_and_no_tags_is_an_error(tmp_path):
    run = write_run(tmp_path / "losses_only", {"losses/entropy": [(0, 1.0)]})
    with pytest.raises(ValueError, match=r"nothing to plot: no run has a default tag .* tags: losses/entropy$"):
        select_tags(load_runs([run]))
    with pytest.raises(ValueError, match=r"nothing to plot: default tags off"):
        select_tags(load_runs([run]), default_tags=False)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tags", "nope/*"], "tag 'nope/*' matches no scalar in any run; available tags: charts/tokens_per_second"),
        (["--smooth", "1"], "--smooth must be in [0, 1), got 1.0"),
        (["--width", "10"], "--width must be at least 50 pixels, got 10"),
    ],
)
def test_cli_bad_input_is_a_clear_error(run_a, capsys, extra, message):
    assert main(["plot", str(run_a), *extra]) == 2
    assert f"textrl plot: error: {message}" in capsys.readouterr().err
    assert not (run_a / "curves.png").exists()


def test_cli_missing_folder_and_no_folder(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "gone")]) == 2
    assert f"textrl plot: error: run folder '{tmp_path / 'gone'}' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plot"])
    assert e.value.code == 2
    assert "the following arguments are required: RUN" in capsys.readouterr().err
