"""Settings of ``inference.py``, and the parsing of its list options.

Apart from ``pipeline.inference`` so that the script builds its parser (and answers ``--help``)
without loading torch: this module imports only the light settings modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.choices import BRANCHES, RUNTIMES
from pipeline.config import CommonConfig, option, output_option, workers_option
from pipeline.io import OptionError


@dataclass
class InferenceConfig(CommonConfig):
    """Settings of ``inference.py``."""

    branches: str | None = option(
        None,
        "comma-separated branches to use (image,decoder,caption,stacker); "
        "default: every branch with a checkpoint in --weights",
        group="prediction",
    )
    tune: bool = option(
        False,
        "re-tune fusion weights and thresholds on the validation split and "
        "rewrite weights/fusion.json (with a subset of the trained --branches: their own "
        "weights/fusion-BRANCHES.json, leaving fusion.json as it is)",
        group="prediction",
    )
    fusion_weights: str | None = option(
        None,
        "fusion weights by hand, e.g. image=0.5,caption=0.4,decoder=0.1 (overrides fusion.json for this run)",
        group="prediction",
    )
    threshold: float | None = option(
        None, "one global threshold by hand (overrides fusion.json for this run)", group="prediction"
    )
    evaluate: bool = option(
        False, "score every branch alone and fused; write metrics.json and plots", group="prediction"
    )
    report: bool = option(
        True,
        "with --evaluate, also write OUTPUT/report.html: one self-contained page of the "
        "metrics, plots, each label's worst images and a fusion tuner",
        group="prediction",
    )
    eval_csv: str | None = option(None, "labelled CSV to evaluate on instead of the validation split", group="data")
    test_csv: str | None = option(None, "CSV of the images to predict instead of DATA/test.csv", group="data")
    image: list[str] | None = option(
        None,
        "predict these image files instead of a test CSV: files, folders (their image files) or quoted glob "
        "patterns ('photos/*.jpg'), each folder's and pattern's files in sorted order (with --caption: one caption "
        "per file, in that order); prints each image's labels with names and every branch's probabilities",
        group="prediction",
    )
    caption: list[str] | None = option(
        None,
        "the captions of the --image files, one per image (omit to use the image branches alone)",
        group="prediction",
    )
    skip_bad_images: bool = option(
        False,
        "with --image: predict the other files when one is missing or not a readable image (it is "
        "predicted from its --caption, or left out without one, and named in a warning); default: an error",
        group="prediction",
    )
    format: str = option(
        "table",
        "how --image predictions are printed: a readable table or JSON for scripts",
        choices=["table", "json"],
        group="prediction",
    )
    batch_size: int = option(64, "images per batch for feature extraction", group="run")
    runtime: str | None = option(
        None,
        "who runs the backbone: torch, OpenVINO or ONNX Runtime (auto: the fastest here, measured once "
        "per machine and model); default: the runtime the image branch was trained with, whose features its "
        "heads learned from",
        choices=list(RUNTIMES),
        group="run",
    )
    chunk_size: int = option(
        4096,
        "test images per chunk: features, probabilities and fusion run one chunk at a time and the "
        "submission is written as they finish, so memory stays flat however many images there are; each "
        "chunk's features are cached, so an interrupted run resumes at the chunk it stopped in",
        group="run",
    )
    workers: int = workers_option()
    output: str = output_option()

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the option."""
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.chunk_size >= 1, f"--chunk-size must be >= 1, got {self.chunk_size}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (
                self.threshold is None or 0.0 < self.threshold < 1.0,
                f"--threshold must be between 0 and 1 (exclusive), got {self.threshold}",
            ),
            (self.caption is None or self.image is not None, "--caption needs --image: the files it describes"),
            (
                not self.skip_bad_images or self.image is not None,
                "--skip-bad-images acts on --image files only (an unreadable test.csv image is always predicted "
                "from its caption and listed in OUTPUT/unreadable_images.txt)",
            ),
            (
                self.image is None or not (self.evaluate or self.test_csv or self.eval_csv),
                "--image predicts the given files; it does not combine with --evaluate, --test-csv or --eval-csv",
            ),
            # Options that would otherwise be accepted and do nothing.
            (
                self.format == "table" or self.image is not None,
                f"--format {self.format} sets how --image predictions print; without --image it has no effect",
            ),
            (self.report or self.evaluate, "--no-report acts with --evaluate only (the page is written with it)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.fusion_weights is not None:
            parse_weights(self.fusion_weights)  # refused before any file is read


def parse_branch_list(text: str | None) -> list[str] | None:
    """``"image,caption"`` -> ``["image", "caption"]``, with unknown names refused."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BRANCHES]
    if unknown or not names:
        raise OptionError(f"--branches {text!r}: valid branch names are {', '.join(BRANCHES)}")
    return names


def parse_weights(text: str) -> dict[str, float]:
    """``"image=0.5,caption=0.4"`` -> ``{"image": 0.5, "caption": 0.4}``."""
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in BRANCHES or not value:
            raise OptionError(
                f"--fusion-weights {text!r}: expected branch=weight pairs with branches from {', '.join(BRANCHES)}"
            )
        if name in weights:
            raise OptionError(f"--fusion-weights {text!r}: {name} is given twice")
        try:
            weight = float(value)
        except ValueError:
            raise OptionError(f"--fusion-weights {text!r}: {value!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise OptionError(f"--fusion-weights {text!r}: {value!r} must be a finite number >= 0")
        weights[name] = weight
    return weights
