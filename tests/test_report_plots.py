"""The report's and the training run's plots: labels named as the dataset names them (a "$" is
text, never mathtext), legends clear of the bars and curves, the positives of each label, ensemble
members numbered as the log numbers them, and training that ends normally without matplotlib."""

from __future__ import annotations

import logging
import sys

import matplotlib
import numpy as np

import train_caption_rnn
from pipeline.checkpoint import checkpoint_path
from pipeline.engine.history import CURVES_FILE, plot_histories, start_history, training_curves_figure
from pipeline.fusion import FusionSettings
from pipeline.report import evaluation_report, per_label_f1_figure
from tests.conftest import TINY_CAPTION_ARGS

matplotlib.use("Agg")

NAMES = {"1": "a $\\frac$ horse", "2": "cost $5 or $6", "3": "plain"}


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def evaluated_case(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random((30, 3)) < 0.4).astype(np.int64)
    probs = {"image": rng.random((30, 3)), "caption": rng.random((30, 3))}
    settings = FusionSettings(branches=["image", "caption"], label_ids=[1, 2, 3],
                              weights={"image": 0.5, "caption": 0.5})
    report = evaluation_report(y, probs, settings, [1, 2, 3], tmp_path, "validation split", NAMES)
    return y, report


def test_label_names_with_dollars_are_plotted_as_text(tmp_path, capsys):
    y, report = evaluated_case(tmp_path)
    assert (tmp_path / "per_label_f1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = per_label_f1_figure(report, [1, 2, 3], NAMES)
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == [f"{i} {NAMES[str(i)]} ({int(y[:, i - 1].sum())})" for i in (1, 2, 3)]
    assert not any(t.get_parse_math() for t in fig.axes[0].get_xticklabels())


def test_per_label_f1_legend_is_clear_of_the_bars(tmp_path):
    _, report = evaluated_case(tmp_path)
    fig = per_label_f1_figure(report, [1, 2, 3], NAMES)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    (ax,) = fig.axes
    legend = fig.legends[0] if fig.legends else ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["image", "caption", "fused"]
    assert not overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))


def write_history(weights, members: int = 3) -> None:
    history = start_history(weights / "history_caption.csv", resume=False)
    for member in range(members):
        for epoch in (1, 2, 3):
            history.for_stage("caption", member).record(epoch, 1.0 / epoch + member, 0.3 * epoch, 1e-3, 1.0)
    image = start_history(weights / "history_image.csv", resume=False)
    for epoch in (1, 2):
        image.for_stage("head").record(epoch, 0.5 / epoch, 0.4, 1e-3, 1.0)


def test_training_curves_number_members_from_1_and_keep_legends_off_the_curves(tmp_path):
    write_history(tmp_path)
    fig = training_curves_figure(tmp_path)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in visible] == ["caption", "image: head"]
    caption = visible[0]
    legend = caption.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["model 1/3", "model 2/3", "model 3/3"]
    assert not overlaps(legend.get_window_extent(renderer), caption.get_window_extent(renderer))
    assert visible[1].get_legend() is None  # one line: nothing to tell apart
    assert plot_histories(tmp_path) == tmp_path / CURVES_FILE


def hide_matplotlib(monkeypatch) -> None:
    """Make ``import matplotlib`` (and its submodules) fail as on a machine without it."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)


def test_without_matplotlib_the_curves_are_skipped_with_one_line(tmp_path, monkeypatch, caplog):
    write_history(tmp_path)
    hide_matplotlib(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.history"):
        assert plot_histories(tmp_path) is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"{CURVES_FILE} not drawn"]
    assert not (tmp_path / CURVES_FILE).exists()


def test_training_ends_normally_without_matplotlib(tiny_dataset, tmp_path, monkeypatch, caplog):
    hide_matplotlib(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.history"):
        train_caption_rnn.main(["--data", str(tiny_dataset), "--weights", str(tmp_path), "--device", "cpu",
                                *TINY_CAPTION_ARGS])
    assert checkpoint_path(tmp_path, "caption").is_file()
    assert (tmp_path / "history_caption.csv").is_file() and not (tmp_path / CURVES_FILE).exists()
    skipped = [r.getMessage() for r in caplog.records if "not drawn" in r.getMessage()]
    assert len(skipped) == 1 and "matplotlib" in skipped[0]


def test_evaluation_without_matplotlib_writes_the_metrics_and_skips_the_plots(tmp_path, monkeypatch, caplog):
    """A machine without matplotlib (a bare GPU image) still evaluates: metrics.json is written,
    the two plots are skipped with one warning, and the page goes without its PR panels."""
    from pipeline.report_page import _plot_pr_curves

    hide_matplotlib(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pipeline.report"):
        _, report = evaluated_case(tmp_path)
    assert (tmp_path / "metrics.json").is_file() and set(report) == {"image", "caption", "fused"}
    assert not (tmp_path / "per_label_f1.png").exists() and not (tmp_path / "f1_vs_threshold.png").exists()
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "per_label_f1.png and f1_vs_threshold.png not drawn"]
    y = np.array([[1, 0], [0, 1]])
    assert _plot_pr_curves(y, {"image": y * 0.9}, y * 0.8, ["a", "b"]) is None
