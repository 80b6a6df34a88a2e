"""The evaluation report: metrics.json and plots for every branch alone and fused."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.fusion import FusionSettings
from pipeline.io import write_json
from pipeline.labels import label_name
from pipeline.metrics import THRESHOLD_GRID, binarize, evaluate_probs, samples_f1, tune_global_threshold

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

log = logging.getLogger(__name__)


def evaluation_report(
    y_true: np.ndarray,
    probs_by_branch: dict[str, np.ndarray],
    settings: FusionSettings,
    label_ids: list[int],
    output_dir: Path,
    source: str,
    label_names: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Score each branch (at its own best global threshold) and the fusion (at its tuned
    thresholds); write ``metrics.json``, ``per_label_f1.png`` and ``f1_vs_threshold.png``
    (labels named by ``label_names``, the dataset's own, else as ``label_name`` does)."""
    output_dir = Path(output_dir)
    report: dict[str, dict] = {}
    curves: dict[str, np.ndarray] = {}
    for branch, probs in probs_by_branch.items():
        threshold, _ = tune_global_threshold(y_true, probs)
        report[branch] = evaluate_probs(y_true, probs, threshold, label_ids)
        curves[branch] = np.array([samples_f1(y_true, binarize(probs, t)) for t in THRESHOLD_GRID])
    fused = settings.probabilities(probs_by_branch)
    report["fused"] = evaluate_probs(y_true, fused, settings.thresholds(), label_ids)
    report["fused"]["method"] = settings.method
    curves["fused"] = np.array([samples_f1(y_true, binarize(fused, t)) for t in THRESHOLD_GRID])

    payload = {"source": source, "n_images": len(y_true), "branches": report}
    write_json(output_dir / "metrics.json", payload)
    try:
        _save_figure(per_label_f1_figure(report, label_ids, label_names), output_dir / "per_label_f1.png")
        _plot_threshold_curves(curves, output_dir / "f1_vs_threshold.png")
    except ImportError as err:  # the plots are optional; the figures are all in metrics.json
        log.warning("per_label_f1.png and f1_vs_threshold.png not drawn: matplotlib cannot be imported (%s)", err)

    width = max(len(name) for name in report)
    lines = [
        f"Evaluation on {source} ({len(y_true)} images)",
        f"{'branch':<{width}}  samples-F1  micro-F1  macro-F1     mAP  Jaccard",
    ]
    for name, m in report.items():
        lines.append(
            f"{name:<{width}}  {m['samples_f1']:10.4f}  {m['micro_f1']:8.4f}  {m['macro_f1']:8.4f}  "
            f"{(m['mAP'] or 0):6.4f}  {m['jaccard']:7.4f}"
        )
    print("\n".join(lines))
    log.info("wrote %s, per_label_f1.png and f1_vs_threshold.png", output_dir / "metrics.json")
    return report


# Label names are the user's text: a "$" in one must print as "$", never start mathtext.
PLAIN_TEXT: dict[RcKeyType, Any] = {"text.parse_math": False, "text.usetex": False}


def per_label_f1_figure(
    report: dict[str, dict], label_ids: list[int], label_names: dict[str, str] | None = None
) -> Figure:
    """Each label's F1 by branch, bars grouped by label; each label's tick names it and its
    positives, and the legend sits right of the axes, clear of the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report)
    x = np.arange(len(label_ids))
    width = 0.8 / len(names)
    support = next(iter(report.values()))["per_label"]  # the truth's positives: the same for every branch
    with plt.rc_context(PLAIN_TEXT):
        fig, ax = plt.subplots(figsize=(max(8, len(label_ids) * 0.6), 5), layout="constrained")
        for k, name in enumerate(names):
            f1 = [report[name]["per_label"][str(i)]["f1"] for i in label_ids]
            ax.bar(x + (k - (len(names) - 1) / 2) * width, f1, width, label=name)
        ax.set_xticks(
            x,
            [f"{i} {label_name(i, label_names)} ({support[str(i)]['support']})" for i in label_ids],
            rotation=60,
            ha="right",
            fontsize=8,
        )
        ax.set_xlabel("label id, name (positives)")
        ax.set_ylabel("F1")
        ax.set_ylim(0, 1)
        ax.set_title("Per-label F1 by branch")
        fig.legend(loc="outside right upper", fontsize=8)
    return fig


def _save_figure(fig: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(PLAIN_TEXT):
        fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_threshold_curves(curves: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, curve in curves.items():
        best = int(np.argmax(curve))
        ax.plot(THRESHOLD_GRID, curve, label=f"{name} (best {curve[best]:.3f} at {THRESHOLD_GRID[best]:.2f})")
    ax.set_xlabel("global threshold")
    ax.set_ylabel("samples-F1")
    ax.set_title("Samples-F1 against the threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
