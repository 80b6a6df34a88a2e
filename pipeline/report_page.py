"""The evaluation page: ``output/report.html``, one self-contained file that opens from disk
(no network, no server). It holds the metrics, the plots, each label's worst validation images
as small embedded thumbnails, the images the branches disagree on most, and a fusion tuner
that re-scores weights and thresholds in the browser from the embedded probabilities."""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipeline.checkpoint import BRANCHES, checkpoint_path
from pipeline.data.dataset import CAPTION_COLUMN, ID_COLUMN, DatasetPaths
from pipeline.data.images import image_file_stat, to_rgb
from pipeline.fusion import FusionSettings, fusion_file
from pipeline.io import atomic_write_text
from pipeline.labels import label_name

log = logging.getLogger(__name__)


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
    branch, else the ablation's own file (as ``inference.resolve_fusion`` chooses)."""
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


def _plot_pr_curves(y_true: np.ndarray, probs_by_branch: dict[str, np.ndarray], fused: np.ndarray,
                    names: list[str]) -> str:
    """Precision-recall curves of every label, one small panel each, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    curves = {**probs_by_branch, "fused": fused}
    cols = min(6, len(names))
    rows = math.ceil(len(names) / cols)
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


def _galleries(y_true: np.ndarray, pred: np.ndarray, fused: np.ndarray, probs_by_branch: dict[str, np.ndarray],
               limits: PageLimits) -> tuple[dict[tuple[int, str], list[int]], list[tuple[int, int]]]:
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


def write_report_page(path: Path, y_true: np.ndarray, probs_by_branch: dict[str, np.ndarray],
                      settings: FusionSettings, label_ids: list[int], metrics: dict[str, dict], images: pd.DataFrame,
                      paths: DatasetPaths, *, source: str, weights_dir: Path, command: str,
                      plots: list[Path] = (), label_names: dict[str, str] | None = None,
                      limits: PageLimits = PageLimits()) -> dict:
    """Write the report page for the evaluated images (``images``: one row per image, in the
    order of ``y_true``) and return what it holds: thumbnail count and bytes, page bytes.

    ``metrics`` is what ``evaluation_report`` returned; ``command`` the inference command line
    that the tuned fusion.json is for; ``plots`` PNG files to embed.
    """
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
            if rank < len(queue) and queue[rank] not in thumbs and \
                    sum(t is not None for t in thumbs.values()) < limits.total:
                data = thumbnail(paths.image_path(ids[queue[rank]]), limits.size, limits.quality)
                thumbs[queue[rank]] = None if data is None else base64.b64encode(data).decode("ascii")
    shown = {i for i in thumbs}
    dropped = sum(1 for queue in queues for i in queue if i not in shown)

    def card(i: int, j: int) -> str:
        truth = ", ".join(names[k] for k in np.flatnonzero(y_true[i])) or "(none)"
        predicted = ", ".join(names[k] for k in np.flatnonzero(pred[i]))
        rows = "".join(f"<tr><td>{html.escape(b)}</td><td>{'n/a' if np.isnan(p[i, j]) else f'{p[i, j]:.3f}'}</td></tr>"
                       for b, p in used.items())
        rows += (f"<tr class='fused'><td>fused</td><td>{fused[i, j]:.3f}</td></tr>"
                 f"<tr><td>threshold</td><td>{thresholds[j]:.3f}</td></tr>")
        picture = (f"<img data-thumb='{i}' alt='{html.escape(ids[i])}'>" if thumbs.get(i) else
                   "<div class='nothumb'>image unreadable</div>")
        return (f"<figure class='card'>{picture}<figcaption><b>{html.escape(ids[i])}</b>"
                f"<div class='cap'>{html.escape(captions[i]) or '<i>no caption</i>'}</div>"
                f"<div>true: {html.escape(truth)}</div><div>predicted: {html.escape(predicted)}</div>"
                f"<table class='probs'><caption>{html.escape(names[j])}</caption>{rows}</table>"
                f"</figcaption></figure>")

    def gallery(items: list[tuple[int, int]], empty: str) -> str:
        cards = [card(i, j) for i, j in items if i in shown]
        return f"<div class='gallery'>{''.join(cards)}</div>" if cards else f"<p class='none'>{empty}</p>"

    label_sections = []
    for j, name in enumerate(names):
        m = metrics.get("fused", {}).get("per_label", {}).get(str(label_ids[j]), {})
        label_sections.append(
            f"<section class='label' id='label-{label_ids[j]}'><h3>{html.escape(name)} "
            f"<small>(id {label_ids[j]}; fused F1 {m.get('f1', float('nan')):.3f}, precision "
            f"{m.get('precision', float('nan')):.3f}, recall {m.get('recall', float('nan')):.3f}, "
            f"{m.get('support', 0)} positives)</small></h3>"
            f"<div class='kinds'><div><h4>missed (true, not predicted; lowest fused score first)</h4>"
            f"{gallery([(i, j) for i in lists[(j, 'missed')]], 'none missed')}</div>"
            f"<div><h4>invented (predicted, not true; highest fused score first)</h4>"
            f"{gallery([(i, j) for i in lists[(j, 'invented')]], 'none invented')}</div></div></section>")

    metric_rows = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(
            f"<td>{'—' if m.get(key) is None else f'{m[key]:.4f}'}</td>"
            for key in ("samples_f1", "micro_f1", "macro_f1", "mAP", "jaccard"))
        + f"<td>{'per label' if name == 'fused' else format(m['thresholds'][0], '.2f')}</td></tr>"
        for name, m in metrics.items())

    thumb_bytes = sum(len(t) * 3 // 4 for t in thumbs.values() if t)
    n_thumbs = sum(t is not None for t in thumbs.values())
    encoded = {b: _array_b64(p) for b, p in used.items()}
    data = {
        "labels": [{"id": int(i), "name": n} for i, n in zip(label_ids, names)],
        "branches": list(settings.branches),
        "n": int(len(y_true)),
        "y": base64.b64encode(np.ascontiguousarray(y_true, dtype=np.uint8).tobytes()).decode("ascii"),
        "probs": {b: {"data": d, "dtype": t} for b, (d, t) in encoded.items()},
        "fusion": asdict(settings),
        "fused_samples_f1": metrics.get("fused", {}).get("samples_f1"),
        "target": str(fusion_target(Path(weights_dir), list(settings.branches))),
        "command": command,
        "source": source,
    }
    stacker_note = (
        "<p class='warn'>The fusion in use is a logistic-regression <b>stacker</b>, which this page does not "
        "reproduce: the tuner starts from its fallback weights and scores weighted fusion, and the fusion.json "
        "it shows replaces the stacker with weighted fusion.</p>" if settings.method == "stacker" else "")
    per_label = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{i}</td><td>{t:.3f}</td></tr>"
        for i, n, t in zip(label_ids, names, thresholds))
    page = PAGE.format(
        title=html.escape(f"Evaluation report: {source}"),
        source=html.escape(source), n=len(y_true), css=CSS,
        metric_rows=metric_rows,
        method=html.escape(settings.method),
        weights=html.escape(", ".join(f"{b} {settings.weights.get(b, 0):g}" for b in settings.branches)),
        threshold=f"{settings.threshold:g}", per_label_rows=per_label, stacker_note=stacker_note,
        plots="".join(f"<img class='plot' alt='{html.escape(Path(p).stem)}' src='data:image/png;base64,{_png(p)}'>"
                      for p in plots),
        pr=_plot_pr_curves(y_true, used, fused, names),
        limits=(f"at most {limits.per_label} per label and kind, {limits.disagreement} in the disagreement "
                f"gallery, {limits.total} distinct images in all, each at most {limits.size} px (JPEG quality "
                f"{limits.quality}); this page embeds {n_thumbs} ({thumb_bytes // 1024} KB)"
                + (f"; {dropped} gallery entries left out by the cap" if dropped else "")),
        labels="".join(label_sections),
        label_index=" · ".join(f"<a href='#label-{i}'>{html.escape(n)}</a>" for i, n in zip(label_ids, names)),
        disagreement=gallery(disagreement, "only one branch, or no disagreement"),
        thumbs=_script_json({str(i): t for i, t in thumbs.items() if t}),
        data=_script_json(data), script=SCRIPT,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    log.info("wrote %s (%d KB, %d thumbnails)", path, len(page.encode()) // 1024, n_thumbs)
    return {"thumbnails": n_thumbs, "thumbnail_bytes": thumb_bytes, "bytes": len(page.encode())}


def _script_json(value: object) -> str:
    # "</" would end the <script> element early; JSON allows "<\/" for it.
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1280px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 small { font-weight: normal; color: #555; }
table.metrics, table.tuner { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; }
table.metrics td, table.metrics th, table.tuner td, table.tuner th { border-bottom: 1px solid #e4e4e4; }
img.plot { max-width: 100%; margin: 0.5em 1em 0.5em 0; border: 1px solid #ddd; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px; }
.kinds { display: flex; flex-wrap: wrap; column-gap: 3em; } /* a label's two short galleries share a row */
.card { margin: 0; width: 190px; border: 1px solid #ddd; border-radius: 4px; padding: 4px; font-size: 12px; background: #fafafa; }
.card img, .nothumb { display: block; margin: 0 auto 4px; max-width: 100%; }
.nothumb { width: 112px; height: 84px; background: #eee; color: #888; text-align: center; line-height: 84px; }
.cap { font-style: italic; color: #444; } .probs { font-size: 11px; } .probs caption { text-align: left; font-weight: bold; }
.probs tr.fused td { font-weight: bold; } .none { color: #777; } .warn { background: #fff3cd; padding: 6px; }
#tuner-error { color: #b00; } .f1 { font-size: 1.4em; font-weight: bold; }
pre { background: #f4f4f4; padding: 8px; overflow: auto; max-height: 24em; }
input[type=range] { width: 240px; vertical-align: middle; } input.thr { width: 5em; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{css}</style></head>
<body>
<h1>{title}</h1>
<p>{n} images of the {source}. Everything on this page is embedded in this one file: it needs no network and no
server. <a href="#metrics">metrics</a> · <a href="#fusion">fusion in use</a> · <a href="#plots">plots</a> ·
<a href="#tuner">tuner</a> · <a href="#labels">labels</a> · <a href="#disagreement">disagreement</a></p>
<p id="page-error" class="warn" hidden></p>

<h2 id="metrics">Metrics</h2>
<table class="metrics"><tr><th>branch</th><th>samples-F1</th><th>micro-F1</th><th>macro-F1</th><th>mAP</th>
<th>Jaccard</th><th>threshold</th></tr>{metric_rows}</table>
<p>Each branch alone is scored at its own best global threshold, the fusion at its thresholds in use.</p>

<h2 id="fusion">Fusion in use</h2>
<p>method <b>{method}</b>; weights {weights}; global threshold {threshold}.</p>{stacker_note}
<details><summary>thresholds in use, per label</summary>
<table class="metrics"><tr><th>label</th><th>id</th><th>threshold</th></tr>{per_label_rows}</table></details>

<h2 id="plots">Plots</h2>
{plots}
<h3>Precision-recall per label</h3>
<img class="plot" alt="precision-recall curves" src="data:image/png;base64,{pr}">

<h2 id="tuner">Fusion tuner</h2>{stacker_note}
<p>Fuses the embedded validation probabilities exactly as <code>pipeline/fusion.py</code> does (the weighted mean
of the branches an image has, each weight divided by their sum; a label is predicted at probability &ge; its
threshold; an image with no label over threshold gets its top label) and scores them as
<code>pipeline/metrics.py</code> does (an image's F1 is 2|T&cap;P| / (|T|+|P|), 0 when both are empty). A
per-label threshold left blank uses the global one. The URL fragment sets the tuner too, e.g.
<code>#w=image:0.5,caption:0.5&amp;t=0.4&amp;pl=</code> (<code>pl=</code> empty clears the per-label thresholds;
<code>pl=1:0.3,3:0.6</code> sets some).</p>
<div id="weights"></div>
<p>global threshold <input type="range" id="t-range" min="0.01" max="0.99" step="0.01">
<span id="t-value"></span></p>
<p><button id="clear-pl">clear per-label thresholds</button> <button id="restore">restore the settings in use</button></p>
<p>samples-F1 <span class="f1" id="tuner-f1">…</span> (in use: <span id="saved-f1"></span>); macro-F1
<span id="tuner-macro"></span> <span id="tuner-error"></span></p>
<table class="tuner" id="pl-table"><tr><th>label</th><th>id</th><th>threshold</th><th>precision</th><th>recall</th>
<th>F1</th><th>positives</th></tr></table>
<h3>fusion.json for these settings</h3>
<p>Save it as <code id="target"></code>, then run <code id="command"></code>. Without per-label thresholds the same
run is <code id="oneoff"></code>.</p>
<p><a id="download" download="fusion.json" href="#">download this fusion.json</a></p>
<pre id="fusion-json"></pre>

<h2 id="labels">Each label's worst images</h2>
<p>Thumbnails: {limits}. The galleries show the fusion in use, not the tuner's settings.</p>
<p>{label_index}</p>
{labels}

<h2 id="disagreement">Where the branches disagree most</h2>
<p>Images with the widest spread between the branches' probabilities for one label (that label is shown).</p>
{disagreement}

<script type="application/json" id="thumbs">{thumbs}</script>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body></html>
"""

SCRIPT = r"""
"use strict";
function pageError(message) {
  const box = document.getElementById("page-error");
  box.hidden = false;
  box.textContent = "This page failed: " + message;
}
window.addEventListener("error", (event) => pageError(event.message));

// Thumbnails are stored once per image and shared by every gallery that shows it.
const THUMBS = JSON.parse(document.getElementById("thumbs").textContent);
for (const img of document.querySelectorAll("img[data-thumb]")) {
  img.src = "data:image/jpeg;base64," + THUMBS[img.dataset.thumb];
}

const DATA = JSON.parse(document.getElementById("report-data").textContent);
const N = DATA.n, L = DATA.labels.length, B = DATA.branches;

function bytes(b64) {
  const text = atob(b64), out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}
const Y = bytes(DATA.y);
// Probabilities exactly as Python held them (float32 or float64, little-endian); NaN: no input.
const P = {}, AVAIL = {};
for (const b of B) {
  const raw = bytes(DATA.probs[b].data), view = new DataView(raw.buffer);
  const f4 = DATA.probs[b].dtype === "f4", values = new Float64Array(N * L), avail = new Uint8Array(N);
  for (let k = 0; k < N * L; k++) values[k] = f4 ? view.getFloat32(4 * k, true) : view.getFloat64(8 * k, true);
  for (let i = 0; i < N; i++) {
    avail[i] = 1;
    for (let j = 0; j < L; j++) if (Number.isNaN(values[i * L + j])) { avail[i] = 0; break; }
  }
  P[b] = values; AVAIL[b] = avail;
}

// pipeline.fusion.weighted_average, in the same order of operations, so the sums are the same doubles.
function fuse(weights) {
  const out = new Float64Array(N * L);
  for (let i = 0; i < N; i++) {
    let wsum = 0, count = 0;
    for (const b of B) { if (AVAIL[b][i]) { wsum += (weights[b] || 0); count += 1; } }
    for (let j = 0; j < L; j++) {
      let total = 0, plain = 0;
      for (const b of B) {
        if (!AVAIL[b][i]) continue;
        total += (weights[b] || 0) * P[b][i * L + j];
        plain += P[b][i * L + j];
      }
      out[i * L + j] = wsum === 0 ? plain / Math.max(count, 1) : total / wsum;
    }
  }
  return out;
}

// pipeline.metrics.binarize: >= threshold, and an empty row gets its argmax (the first on ties).
function binarize(fused, thr) {
  const pred = new Uint8Array(N * L);
  for (let i = 0; i < N; i++) {
    let any = false, best = 0;
    for (let j = 0; j < L; j++) {
      const p = fused[i * L + j];
      if (p >= thr[j]) { pred[i * L + j] = 1; any = true; }
      if (p > fused[i * L + best]) best = j;
    }
    if (!any) pred[i * L + best] = 1;
  }
  return pred;
}

// pipeline.metrics.samples_f1 and per-label F1 with 0/0 scored as 0.
function score(pred) {
  let sum = 0;
  const tp = new Array(L).fill(0), fp = new Array(L).fill(0), fn = new Array(L).fill(0);
  for (let i = 0; i < N; i++) {
    let t = 0, both = 0, p = 0;
    for (let j = 0; j < L; j++) {
      const y = Y[i * L + j], q = pred[i * L + j];
      t += y; p += q; both += y & q;
      if (y && q) tp[j]++; else if (q) fp[j]++; else if (y) fn[j]++;
    }
    sum += 2 * both / Math.max(t + p, 1);
  }
  const labels = [];
  for (let j = 0; j < L; j++) {
    const precision = tp[j] + fp[j] ? tp[j] / (tp[j] + fp[j]) : 0;
    const recall = tp[j] + fn[j] ? tp[j] / (tp[j] + fn[j]) : 0;
    const denom = 2 * tp[j] + fp[j] + fn[j];
    labels.push({precision, recall, f1: denom ? 2 * tp[j] / denom : 0, support: tp[j] + fn[j]});
  }
  return {samples: sum / N, labels};
}

const SAVED = DATA.fusion;
let state;
function restore() {
  state = {weights: Object.fromEntries(B.map((b) => [b, SAVED.weights[b] || 0])), threshold: SAVED.threshold,
           perLabel: Object.assign({}, SAVED.per_label_thresholds)};
}

function parseFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.has("w")) {
    for (const part of params.get("w").split(",").filter(Boolean)) {
      const [b, w] = part.split(":");
      if (!B.includes(b)) throw new Error("fragment w: " + b + " is not one of the branches " + B.join(", "));
      state.weights[b] = Number(w);
    }
  }
  if (params.has("t")) state.threshold = Number(params.get("t"));
  if (params.has("pl")) {
    state.perLabel = {};
    for (const part of params.get("pl").split(",").filter(Boolean)) {
      const [id, t] = part.split(":");
      state.perLabel[id] = Number(t);
    }
  }
}

function round(x, digits) { return Number(x.toFixed(digits)); }

const weightsBox = document.getElementById("weights"), table = document.getElementById("pl-table");
const controls = {};
for (const b of B) {
  const row = document.createElement("p");
  row.innerHTML = "weight of <b></b> <input type='range' min='0' max='1' step='0.01'> <span></span>";
  row.querySelector("b").textContent = b;
  const range = row.querySelector("input");
  range.id = "w-" + b;
  range.addEventListener("input", () => { state.weights[b] = Number(range.value); update(); });
  controls[b] = [range, row.querySelector("span")];
  weightsBox.appendChild(row);
}
const tRange = document.getElementById("t-range");
tRange.addEventListener("input", () => { state.threshold = Number(tRange.value); update(); });
const cells = DATA.labels.map((label) => {
  const row = table.insertRow();
  row.insertCell().textContent = label.name;
  row.insertCell().textContent = label.id;
  const input = document.createElement("input");
  Object.assign(input, {type: "number", min: "0.01", max: "0.99", step: "0.01", className: "thr"});
  input.addEventListener("change", () => {
    if (input.value === "") delete state.perLabel[label.id]; else state.perLabel[label.id] = Number(input.value);
    update();
  });
  row.insertCell().appendChild(input);
  return {input, stats: [row.insertCell(), row.insertCell(), row.insertCell(), row.insertCell()]};
});
document.getElementById("clear-pl").addEventListener("click", () => { state.perLabel = {}; update(); });
document.getElementById("restore").addEventListener("click", () => { restore(); update(); });
document.getElementById("saved-f1").textContent =
  DATA.fused_samples_f1 === null ? "n/a" : DATA.fused_samples_f1.toFixed(4) + " (metrics.json)";
document.getElementById("target").textContent = DATA.target;

function problem() {
  for (const b of B) {
    const w = state.weights[b];
    if (!Number.isFinite(w) || w < 0) return "weight of " + b + " must be a finite number >= 0";
  }
  if (!B.some((b) => state.weights[b] > 0)) return "every weight is 0; give at least one branch a weight > 0";
  const ts = [["global threshold", state.threshold], ...Object.entries(state.perLabel)];
  for (const [name, t] of ts) if (!(t > 0 && t < 1)) return "threshold " + name + " must be between 0 and 1";
  return "";
}

function update() {
  for (const b of B) { controls[b][0].value = state.weights[b]; controls[b][1].textContent = state.weights[b]; }
  tRange.value = state.threshold;
  document.getElementById("t-value").textContent = state.threshold;
  DATA.labels.forEach((label, j) => {
    cells[j].input.value = label.id in state.perLabel ? state.perLabel[label.id] : "";
    cells[j].input.placeholder = state.threshold;
  });
  const error = problem(), f1 = document.getElementById("tuner-f1");
  document.getElementById("tuner-error").textContent = error;
  if (error) { f1.textContent = "—"; f1.dataset.value = ""; return; }
  const thr = DATA.labels.map((label) => label.id in state.perLabel ? state.perLabel[label.id] : state.threshold);
  const result = score(binarize(fuse(state.weights), thr));
  f1.textContent = result.samples.toFixed(4);
  f1.dataset.value = String(result.samples);
  let macro = 0;
  result.labels.forEach((m, j) => {
    const values = [m.precision.toFixed(3), m.recall.toFixed(3), m.f1.toFixed(3), m.support];
    values.forEach((v, k) => { cells[j].stats[k].textContent = v; });
    macro += m.f1;
  });
  document.getElementById("tuner-macro").textContent = (macro / L).toFixed(4);
  const fusion = Object.assign({}, SAVED, {
    method: "weighted", stacker: null, weights: Object.assign({}, state.weights), threshold: state.threshold,
    per_label_thresholds: Object.fromEntries(Object.entries(state.perLabel).map(([k, v]) => [String(k), v])),
    val_samples_f1: round(result.samples, 5), cv_samples_f1: {},
    tuned_on: {by: "report.html tuner", n_images: N, source: DATA.source},
  });
  // Arrays of numbers (the label ids) on one line each, so the file reads at a glance.
  const text = JSON.stringify(fusion, null, 2).replace(
    /\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]/g, (_, inner) => "[" + inner.split(/,\s+/).join(", ") + "]") + "\n";
  document.getElementById("fusion-json").textContent = text;
  document.getElementById("download").href = "data:application/json;charset=utf-8," + encodeURIComponent(text);
  document.getElementById("command").textContent = DATA.command;
  const weights = B.map((b) => b + "=" + state.weights[b]).join(",");
  document.getElementById("oneoff").textContent =
    DATA.command + " --fusion-weights " + weights + " --threshold " + state.threshold;
  const fragment = "w=" + B.map((b) => b + ":" + state.weights[b]).join(",") + "&t=" + state.threshold + "&pl=" +
    Object.entries(state.perLabel).map(([k, v]) => k + ":" + v).join(",");
  history.replaceState(null, "", "#" + fragment);
}

function fromFragment() {
  let bad = "";
  try { parseFragment(); } catch (err) { bad = err.message; }
  update();
  // After update(), which clears the message box: the fragment's error must stay in view.
  if (bad) document.getElementById("tuner-error").textContent = bad;
}
restore();
fromFragment();
window.addEventListener("hashchange", () => { restore(); fromFragment(); });
"""
