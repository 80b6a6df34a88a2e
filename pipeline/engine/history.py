"""Training history: ``WEIGHTS/history_<branch>.csv``, a row per epoch, and the curves drawn from it.

Columns ``stage,member,epoch,train_loss,val_score,lr,seconds``: ``stage`` is the loop
(``head``, ``decoder`` or ``joint`` for the image branch, ``caption`` for the caption
models), ``member`` the caption ensemble member from 0 (empty where there is none; the log
and the plot count them from 1), ``val_score``
the score the loop keeps its best epoch by (empty without a validation split), ``lr`` the
schedule's base learning rate at the epoch's first update (before the layer-wise and head
scales) and ``seconds`` the epoch's training and scoring time.

Each row is appended and flushed to disk as its epoch ends, so a killed run leaves every
epoch it completed. ``--resume`` keeps the file; each loop first drops its own rows from the
epoch it restarts at (an epoch recorded but not saved for resuming runs again), so the file
ends with one row per epoch, as an uninterrupted run's does. Rank 0 alone writes.

With ``--log tensorboard`` the same figures also go to TensorBoard event files in
``WEIGHTS/tensorboard/<branch>/`` (tags ``<stage>[/member<n>]/<column>``); with ``--keep-best K``
the weights of each loop's K best epochs are kept in ``WEIGHTS/best/``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.engine.distributed import DistContext
from pipeline.io import OptionError, atomic_torch_save, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

COLUMNS = ("stage", "member", "epoch", "train_loss", "val_score", "lr", "seconds")
CURVES_FILE = "training_curves.png"
# Stage and branch names are text: a "$" in one must print as "$", never start mathtext.
PLAIN_TEXT: dict[RcKeyType, Any] = {"text.parse_math": False, "text.usetex": False}

log = logging.getLogger(__name__)
LOGS = ("csv", "tensorboard")
# A kept epoch's file: WEIGHTS/best/<branch>-<stage>[-member<n>]-epoch<NNN>.pt
BEST_DIR = "best"


def history_path(weights_dir: str | Path, branch: str) -> Path:
    """Where ``branch``'s history goes: ``WEIGHTS/history_<branch>.csv``."""
    return Path(weights_dir) / f"history_{branch}.csv"


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _read_rows(path: Path) -> list[list[str]]:
    """The data rows of a history file, after checking its header."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(rows[0]) != COLUMNS:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise ValueError(
            f"{path}:1: not a training history (header {found!r}, expected {','.join(COLUMNS)!r}); "
            "move it away or train without --resume"
        )
    return rows[1:]


@dataclass(frozen=True)
class EpochHistory:
    """The writer of one history file; :meth:`for_stage` gives the writer of one loop's rows."""

    path: Path
    context: DistContext = DistContext()
    stage: str = ""
    member: int | None = None
    tensorboard: Any = None  # a torch.utils.tensorboard SummaryWriter, shared by every stage's writer
    keep_best: int = 0

    def for_stage(self, stage: str, member: int | None = None) -> EpochHistory:
        """The same file, writing ``stage``'s rows (of ensemble ``member``)."""
        return replace(self, stage=stage, member=member)

    def _key(self) -> tuple[str, str]:
        return self.stage, "" if self.member is None else str(self.member)

    def begin(self, first_epoch: int) -> None:
        """Drop this loop's rows from ``first_epoch`` on: a resumed loop records them again."""
        if not self.context.is_main:
            return
        rows = _read_rows(self.path)
        kept = [row for row in rows if not ((row[0], row[1]) == self._key() and int(row[2]) >= first_epoch)]
        if len(kept) != len(rows):
            atomic_write_text(self.path, _csv_text([list(COLUMNS), *kept]))

    def group_members(self) -> None:
        """Order the file's rows by stage and ensemble member, each member's epochs in turn:
        members trained at once interleave their rows as they finish epochs, and a resumed run
        must end with the file an uninterrupted one writes."""
        if not self.context.is_main:
            return
        rows = _read_rows(self.path)
        order = {stage: i for i, stage in enumerate(dict.fromkeys(row[0] for row in rows))}
        grouped = sorted(rows, key=lambda row: (order[row[0]], int(row[1] or -1), int(row[2])))
        if grouped != rows:
            atomic_write_text(self.path, _csv_text([list(COLUMNS), *grouped]))

    def record(self, epoch: int, train_loss: float, val_score: float | None, lr: float | None, seconds: float) -> None:
        """Append one epoch's row and flush it to disk."""
        if not self.context.is_main:
            return
        row = [
            *self._key(),
            str(epoch),
            repr(float(train_loss)),
            "" if val_score is None else repr(float(val_score)),
            "" if lr is None else repr(float(lr)),
            f"{seconds:.3f}",
        ]
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            handle.write(_csv_text([row]))
            handle.flush()
            os.fsync(handle.fileno())
        if self.tensorboard is not None:
            prefix = self.stage + ("" if self.member is None else f"/member{self.member}")
            for name, value in (("train_loss", train_loss), ("val_score", val_score), ("lr", lr), ("seconds", seconds)):
                if value is not None:
                    self.tensorboard.add_scalar(f"{prefix}/{name}", float(value), epoch)
            self.tensorboard.flush()

    def _best_prefix(self) -> str:
        branch = self.path.stem.removeprefix("history_")
        return "-".join([branch, self.stage, *([] if self.member is None else [f"member{self.member}"])]) + "-epoch"

    def keep_if_among_best(self, epoch: int, score: float | None, module: Any) -> None:
        """With ``keep_best`` K, save ``module``'s weights when ``score`` is among this loop's K best
        so far, and delete the file that drops out: ``WEIGHTS/best/<branch>-<stage>-epoch<NNN>.pt``,
        a plain dict of ``state_dict``, ``epoch`` and ``score``."""
        if not self.keep_best or score is None or not self.context.is_main:
            return
        folder = self.path.parent / BEST_DIR
        prefix = self._best_prefix()
        kept = [
            (float(name.split("-score")[-1].removesuffix(".pt")), path)
            for path in folder.glob(f"{prefix}*.pt")
            for name in [path.name]
        ]
        kept = sorted(kept, key=lambda pair: -pair[0])
        if len(kept) >= self.keep_best and score <= kept[self.keep_best - 1][0]:
            return
        folder.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
        atomic_torch_save(
            {"state_dict": state, "epoch": epoch, "score": float(score), "stage": self.stage, "member": self.member},
            folder / f"{prefix}{epoch:03d}-score{score:.6f}.pt",
        )
        for _, path in kept[self.keep_best - 1 :]:
            path.unlink()


def start_history(
    path: str | Path, resume: bool | str, context: DistContext = DistContext(), log: str = "csv", keep_best: int = 0
) -> EpochHistory:
    """The history writer of a training run: a fresh run starts the file over (and clears the
    branch's kept best epochs); ``resume`` keeps the rows an interrupted run left (checking the
    file is a history). ``log`` ``tensorboard`` also writes TensorBoard event files."""
    path = Path(path)
    if log not in LOGS:
        raise OptionError(f"--log {log!r}: valid values are {', '.join(LOGS)}")
    writer = None
    if context.is_main:
        if resume and path.is_file():
            _read_rows(path)
        else:
            atomic_write_text(path, _csv_text([list(COLUMNS)]))
            branch = path.stem.removeprefix("history_")
            for kept in (path.parent / BEST_DIR).glob(f"{branch}-*-epoch*.pt"):
                kept.unlink()
        if log == "tensorboard":
            writer = _tensorboard_writer(path.parent / "tensorboard" / path.stem.removeprefix("history_"))
    return EpochHistory(path, context, tensorboard=writer, keep_best=keep_best)


def _tensorboard_writer(log_dir: Path) -> Any:
    """A SummaryWriter into ``log_dir``, or an OptionError naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise OptionError(
            "--log tensorboard needs the tensorboard package: pip install tensorboard==2.21.0 "
            "(pinned in requirements.txt)"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


def read_history(path: str | Path) -> pd.DataFrame:
    """A history file as a frame: ``member`` nullable integers, empty scores NaN."""
    path = Path(path)
    rows = _read_rows(path)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["member"] = pd.array([int(v) if v else None for v in frame["member"]], dtype="Int64")
    frame["epoch"] = frame["epoch"].astype(int)
    for column in ("train_loss", "val_score", "lr", "seconds"):
        frame[column] = pd.to_numeric(frame[column].replace("", np.nan), errors="raise").astype(float)
    return frame


def _panels(weights_dir: Path) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) of each branch and stage with a history; a stage named as its branch (the
    caption models' one loop) is titled by the branch alone."""
    panels: list[tuple[str, pd.DataFrame]] = []
    for path in sorted(weights_dir.glob("history_*.csv")):
        frame = read_history(path)
        branch = path.stem.removeprefix("history_")
        panels.extend(
            (branch if stage == branch else f"{branch}: {stage}", part)
            for stage, part in frame.groupby("stage", sort=False)
        )
    return panels


def training_curves_figure(weights_dir: str | Path) -> Figure | None:
    """The figure of ``plot_histories`` (a matplotlib Figure), None when there is no history.
    Ensemble members are numbered from 1, as the training log numbers them ("model 2/5"),
    and each panel's legend sits below its axes, clear of the curves."""
    panels = _panels(Path(weights_dir))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    with plt.rc_context(PLAIN_TEXT):
        fig, axes = plt.subplots(
            rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False, layout="constrained"
        )
        # The grid's last row may hold spare axes, more than the panels: they are hidden below.
        for ax, (title, part) in zip(axes.flat, panels, strict=False):
            score_ax = ax.twinx()
            members = part.groupby("member", sort=True, dropna=False)
            for color, (member, lines) in enumerate(members):
                lines = lines.sort_values("epoch")
                ax.plot(
                    lines["epoch"],
                    lines["train_loss"],
                    "-o",
                    color=f"C{color}",
                    ms=3,
                    # member: the ensemble member's index, or NA where the stage trained one model
                    label=f"model {member + 1}/{len(members)}" if isinstance(member, (int, np.integer)) else None,
                )
                score_ax.plot(lines["epoch"], lines["val_score"], "--s", color=f"C{color}", ms=3)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.set_ylabel("train loss (solid)")
            score_ax.set_ylabel("val score (dashed)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if len(members) > 1:
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(len(members), 5))
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
    return fig


def plot_histories(weights_dir: str | Path) -> Path | None:
    """Draw every ``history_<branch>.csv`` in ``weights_dir`` into ``training_curves.png``:
    one panel per branch and stage, train loss (solid, left axis) and validation score
    (dashed, right axis) against the epoch, a line per ensemble member. None when there
    is no history, or when matplotlib is not installed (the plot is optional: training
    still ends normally, and the log says the plot was skipped)."""
    weights_dir = Path(weights_dir)
    try:
        fig = training_curves_figure(weights_dir)
    except ImportError as err:
        log.warning(
            "%s not drawn: matplotlib cannot be imported (%s); the histories are in %s", CURVES_FILE, err, weights_dir
        )
        return None
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    with plt.rc_context(PLAIN_TEXT):
        fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    out = weights_dir / CURVES_FILE
    atomic_write_bytes(out, image.getvalue())
    return out
