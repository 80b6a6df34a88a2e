"""The evaluation page: ``output/report.html``, one self-contained file that opens from disk
(no network, no server). It holds the metrics, the plots, each label's worst validation images
as small embedded thumbnails, the images the branches disagree on most, and a fusion tuner
that re-scores weights and thresholds in the browser from the embedded probabilities."""

from __future__ import annotations

import base64
import json
import logging
import math
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
import pandas as pd
from jinja2.utils import htmlsafe_json_dumps
from markupsafe import Markup
from PIL import Image, ImageOps

from pipeline.checkpoint import BRANCHES, checkpoint_path
from pipeline.data.dataset import CAPTION_COLUMN, ID_COLUMN, DatasetPaths
from pipeline.data.images import image_file_stat, to_rgb
from pipeline.fusion import FusionSettings, fusion_file
from pipeline.io import atomic_write_text
from pipeline.labels import label_name

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

log = logging.getLogger(__name__)

# Label names are the user's text: a "$" in one must print as "$", never start mathtext.
PLAIN_TEXT: dict[RcKeyType, Any] = {"text.parse_math": False, "text.usetex": False}


@dataclass(frozen=True)
class PageLimits:
    """What bounds the page's size: thumbnails are the bulk of it."""

    per_label: int = 6  # thumbnails per label and kind (missed, invented)
    disagreement: int = 12  # images in the gallery of branch disagreement
    total: int = 300  # distinct thumbnails in the whole page
    size: int = 112  # longest side of a thumbnail, pixels
    quality: int = 70  # JPEG quality of a thumbnail


def fusion_target(weights_dir: Path, branches: list[str]) -> Path:
    """The file a run with these branches reads its fusion from: fusion.json with every trained
    branch, else the ablation's own file (as ``prediction.resolve_fusion`` chooses)."""
    trained = [b for b in BRANCHES if checkpoint_path(weights_dir, b).is_file()]
    return weights_dir / "fusion.json" if sorted(branches) == sorted(trained) else fusion_file(weights_dir, branches)


def thumbnail(path: Path, size: int, quality: int) -> bytes | None:
    """A JPEG of the image at most ``size`` pixels on its longest side, upright by its EXIF
    orientation; None for a file that is missing or cannot be decoded."""
    if image_file_stat(path) is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.draft("RGB", (size, size))
                ImageOps.exif_transpose(image, in_place=True)
                rgb = to_rgb(image)
        rgb.thumbnail((size, size))
        out = BytesIO()
        rgb.save(out, "JPEG", quality=quality, optimize=True)
        return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None


def _png(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _plot_pr_curves(
    y_true: np.ndarray, probs_by_branch: dict[str, np.ndarray], fused: np.ndarray, names: list[str]
) -> str | None:
    """Precision-recall curves of every label, one small panel each, as a base64 PNG; None
    where matplotlib is not installed (the page is then written without its plots)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    curves = {**probs_by_branch, "fused": fused}
    cols = min(6, len(names))
    rows = math.ceil(len(names) / cols)
    with plt.rc_context(PLAIN_TEXT):
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.1, rows * 1.9), squeeze=False, sharex=True, sharey=True)
        for j, ax in enumerate(axes.flat):
            if j >= len(names):
                ax.axis("off")
                continue
            ax.set_title(names[j], fontsize=8)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
            for k, (name, probs) in enumerate(curves.items()):
                known = ~np.isnan(probs[:, j])  # an unreadable image has no image-branch score
                if y_true[known, j].any():
                    precision, recall, _ = precision_recall_curve(y_true[known, j], probs[known, j])
                    ax.plot(recall, precision, lw=1.6 if name == "fused" else 0.9, color=f"C{k}", label=name)
            if not y_true[:, j].any():
                ax.text(0.5, 0.5, "no positives", ha="center", va="center", fontsize=7, transform=ax.transAxes)
        axes.flat[0].legend(fontsize=6, loc="lower left")
        fig.supxlabel("recall", fontsize=8)
        fig.supylabel("precision", fontsize=8)
        fig.tight_layout()
        out = BytesIO()
        fig.savefig(out, format="png", dpi=80)
        plt.close(fig)
    return base64.b64encode(out.getvalue()).decode("ascii")


def _array_b64(a: np.ndarray) -> tuple[str, str]:
    """(base64 little-endian bytes, dtype) of the probabilities exactly as the run holds them, so
    the page fuses the very numbers Python fused and its F1 equals metrics.json's."""
    dtype = "<f4" if a.dtype == np.float32 else "<f8"
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii"), dtype[1:]


def tuner_arrays(
    y_true: np.ndarray, probs_by_branch: dict[str, np.ndarray], label_ids: list[int], names: list[str]
) -> dict:
    """What the page's script (``tunerModel`` in page.js) decodes: the labels, the branches in
    fusion order, the truth as bytes and each branch's probabilities as raw floats."""
    encoded = {b: _array_b64(p) for b, p in probs_by_branch.items()}
    return {
        "labels": [{"id": int(i), "name": n} for i, n in zip(label_ids, names, strict=True)],
        "branches": list(probs_by_branch),
        "n": len(y_true),
        "y": base64.b64encode(np.ascontiguousarray(y_true, dtype=np.uint8).tobytes()).decode("ascii"),
        "probs": {b: {"data": d, "dtype": t} for b, (d, t) in encoded.items()},
    }


def _galleries(
    y_true: np.ndarray, pred: np.ndarray, fused: np.ndarray, probs_by_branch: dict[str, np.ndarray], limits: PageLimits
) -> tuple[dict[tuple[int, str], list[int]], list[tuple[int, int]]]:
    """Per (label, kind): the images it missed (true, not predicted; lowest fused score first) and
    invented (predicted, not true; highest first). And the images whose branches disagree most:
    (image, label of the widest spread between branches)."""
    lists: dict[tuple[int, str], list[int]] = {}
    for j in range(y_true.shape[1]):
        missed = np.flatnonzero((y_true[:, j] == 1) & (pred[:, j] == 0))
        invented = np.flatnonzero((y_true[:, j] == 0) & (pred[:, j] == 1))
        lists[(j, "missed")] = missed[np.argsort(fused[missed, j], kind="stable")][: limits.per_label].tolist()
        lists[(j, "invented")] = invented[np.argsort(-fused[invented, j], kind="stable")][: limits.per_label].tolist()
    disagreement: list[tuple[int, int]] = []
    if len(probs_by_branch) > 1:
        stack = np.stack(list(probs_by_branch.values()))  # (B, N, L)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: an image no branch but one read
            spread = np.nan_to_num(np.nanmax(stack, axis=0) - np.nanmin(stack, axis=0))
        widest = spread.max(axis=1)
        order = np.argsort(-widest, kind="stable")[: limits.disagreement]
        disagreement = [(int(i), int(spread[i].argmax())) for i in order if widest[i] > 0]
    return lists, disagreement


def write_report_page(
    path: Path,
    y_true: np.ndarray,
    probs_by_branch: dict[str, np.ndarray],
    settings: FusionSettings,
    label_ids: list[int],
    metrics: dict[str, dict],
    images: pd.DataFrame,
    paths: DatasetPaths,
    *,
    source: str,
    weights_dir: Path,
    command: Sequence[str],
    plots: Sequence[Path] = (),
    label_names: dict[str, str] | None = None,
    limits: PageLimits = PageLimits(),
) -> dict:
    """Write the report page for the evaluated images (``images``: one row per image, in the
    order of ``y_true``) and return what it holds: thumbnail count and bytes, page bytes.

    ``metrics`` is what ``evaluation_report`` returned; ``command`` the argument list of the
    inference command that the tuned fusion.json is for (the page shows it shell-quoted);
    ``plots`` PNG files to embed.
    """
    if isinstance(command, str):
        raise TypeError("command is the argument list of the command, not a string (the page quotes each argument)")
    path = Path(path)
    names = [label_name(i, label_names) for i in label_ids]
    fused = settings.probabilities(probs_by_branch)
    pred = settings.predict(probs_by_branch)
    thresholds = settings.thresholds()
    used = {b: probs_by_branch[b] for b in settings.branches}
    lists, disagreement = _galleries(y_true, pred, fused, used, limits)
    ids = images[ID_COLUMN].astype(str).tolist()
    captions = images[CAPTION_COLUMN].fillna("").astype(str).tolist() if CAPTION_COLUMN in images else [""] * len(ids)

    # Thumbnails are given out rank by rank across every gallery, so the cap cuts each gallery's
    # tail rather than the last labels' galleries whole.
    queues = [*lists.values(), [i for i, _ in disagreement]]
    thumbs: dict[int, str | None] = {}
    for rank in range(max(map(len, queues), default=0)):
        for queue in queues:
            if (
                rank < len(queue)
                and queue[rank] not in thumbs
                and sum(t is not None for t in thumbs.values()) < limits.total
            ):
                jpeg = thumbnail(paths.image_path(ids[queue[rank]]), limits.size, limits.quality)
                thumbs[queue[rank]] = None if jpeg is None else base64.b64encode(jpeg).decode("ascii")
    shown = {i for i in thumbs}
    dropped = sum(1 for queue in queues for i in queue if i not in shown)

    def card(i: int, j: int) -> dict:
        return {
            "index": i,
            "thumb": bool(thumbs.get(i)),
            "image_id": ids[i],
            "caption": captions[i],
            "truth": ", ".join(names[k] for k in np.flatnonzero(y_true[i])) or "(none)",
            "predicted": ", ".join(names[k] for k in np.flatnonzero(pred[i])),
            "label": names[j],
            "rows": [(b, "n/a" if np.isnan(p[i, j]) else f"{p[i, j]:.3f}") for b, p in used.items()],
            "fused": f"{fused[i, j]:.3f}",
            "threshold": f"{thresholds[j]:.3f}",
        }

    def cards(items: list[tuple[int, int]]) -> list[dict]:
        return [card(i, j) for i, j in items if i in shown]

    label_sections = []
    for j, name in enumerate(names):
        m = metrics.get("fused", {}).get("per_label", {}).get(str(label_ids[j]), {})
        label_sections.append(
            {
                "id": label_ids[j],
                "name": name,
                "support": m.get("support", 0),
                **{key: f"{m.get(key, float('nan')):.3f}" for key in ("f1", "precision", "recall")},
                "missed": cards([(i, j) for i in lists[(j, "missed")]]),
                "invented": cards([(i, j) for i in lists[(j, "invented")]]),
            }
        )
    metric_rows = [
        {
            "name": name,
            "cells": [
                "—" if m.get(key) is None else f"{m[key]:.4f}"
                for key in ("samples_f1", "micro_f1", "macro_f1", "mAP", "jaccard")
            ],
            "threshold": "per label" if name == "fused" else format(m["thresholds"][0], ".2f"),
        }
        for name, m in metrics.items()
    ]

    thumb_bytes = sum(len(t) * 3 // 4 for t in thumbs.values() if t)
    n_thumbs = sum(t is not None for t in thumbs.values())
    data = {
        **tuner_arrays(y_true, used, label_ids, names),
        "fusion": asdict(settings),
        "fused_samples_f1": metrics.get("fused", {}).get("samples_f1"),
        "target": str(fusion_target(Path(weights_dir), list(settings.branches))),
        "command": shlex.join(command),
        "source": source,
    }
    page = _template().render(
        source=source,
        n=len(y_true),
        css=Markup(asset_text("page.css")),
        script=Markup(asset_text("page.js")),
        metric_rows=metric_rows,
        method=settings.method,
        stacker=settings.method == "stacker",
        weights=", ".join(f"{b} {settings.weights.get(b, 0):g}" for b in settings.branches),
        threshold=f"{settings.threshold:g}",
        per_label_rows=[
            {"name": n, "id": i, "threshold": f"{t:.3f}"} for i, n, t in zip(label_ids, names, thresholds, strict=True)
        ],
        plots=[{"alt": Path(p).stem, "png": _png(p)} for p in plots if Path(p).is_file()],
        pr=_plot_pr_curves(y_true, used, fused, names),
        limits=(
            f"at most {limits.per_label} per label and kind, {limits.disagreement} in the disagreement "
            f"gallery, {limits.total} distinct images in all, each at most {limits.size} px (JPEG quality "
            f"{limits.quality}); this page embeds {n_thumbs} ({thumb_bytes // 1024} KB)"
            + (f"; {dropped} gallery entries left out by the cap" if dropped else "")
        ),
        label_sections=label_sections,
        disagreement=cards(disagreement),
        thumbs_json=script_json({str(i): t for i, t in thumbs.items() if t}),
        data_json=script_json(data),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    log.info("wrote %s (%d KB, %d thumbnails)", path, len(page.encode()) // 1024, n_thumbs)
    return {"thumbnails": n_thumbs, "thumbnail_bytes": thumb_bytes, "bytes": len(page.encode())}


def asset_text(name: str) -> str:
    """One of the page's files in ``pipeline/report_assets`` (package data, so an installed
    package finds it as a checkout does)."""
    return (resources.files("pipeline") / "report_assets" / name).read_text(encoding="utf-8")


def _template() -> jinja2.Template:
    # Autoescaping makes every value text (captions, ids, label names); only what the code marks
    # as Markup (the page's own CSS and script, the escaped JSON) goes in as it is.
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(asset_text("page.html"))


def script_json(value: object) -> Markup:
    """``value`` as JSON to sit inside a ``<script>`` element: every ``<``, ``>`` and ``&`` as a
    \\u escape, so no text in it (``</script>``, ``<!--``, ``<script``) can end the element or
    change how the HTML parser reads it, and ``JSON.parse`` still gives back the same value."""
    return Markup(htmlsafe_json_dumps(value, dumps=json.dumps, separators=(",", ":")))
