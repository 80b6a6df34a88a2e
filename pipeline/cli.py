"""The three programs: train the image branch, train the caption branch, predict.

Each builds its parser from the settings modules alone and imports the work only once the
command line is parsed, so ``--help`` and a mistyped option answer at once instead of after
torch and timm load. The top-level scripts and the installed console commands
(``cml-train-image``, ``cml-train-caption``, ``cml-infer``; pyproject.toml) both call these.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.config import build_parser, parse_config, run_main
from pipeline.inference_config import InferenceConfig
from pipeline.train.caption_config import CaptionTrainConfig
from pipeline.train.image_config import ImageTrainConfig

TRAIN_IMAGE_DOC = """Train the image branch: an EfficientNet image head and the CNN-RNN label-sequence decoder.

On a GPU the backbone is fine-tuned end to end with both heads (--mode finetune). On a CPU
its first stages run once and their output maps are cached, and the last stage trains with
both heads on the cache (--mode partial); --mode frozen trains the heads alone on cached
features, fastest. Writes WEIGHTS_DIR/image.pt, WEIGHTS_DIR/decoder.pt, their validation
probabilities, WEIGHTS_DIR/image_config.json and WEIGHTS_DIR/image_summary.json.

    python train_efficientnet.py --data path/to/dataset      (installed: cml-train-image)
"""

TRAIN_CAPTION_DOC = """Train the caption branch: an LSTM/GRU ensemble over each image's caption, \
a probability per label.

Writes WEIGHTS_DIR/caption.pt, WEIGHTS_DIR/val_probs_caption.csv (validation-split
probabilities for fusion tuning), WEIGHTS_DIR/caption_config.json and
WEIGHTS_DIR/caption_summary.json.

    python train_caption_rnn.py --data path/to/dataset       (installed: cml-train-caption)
"""

INFER_DOC = """Predict labels by fusing the trained branches, and evaluate them.

Loads the checkpoints in --weights-dir (image head, label decoder, caption RNN, stacker), tunes or
reads WEIGHTS_DIR/fusion.json, and writes OUTPUT/submission.csv with one row per image of
test.csv. --evaluate scores every branch alone and fused on the validation split (or on a
labelled CSV given with --eval-csv) and writes OUTPUT/metrics.json and plots. --image
predicts given files instead, each with its --caption, and prints labels with their names.

    python inference.py --data path/to/dataset                (installed: cml-infer)
    python inference.py --image photo.jpg --caption "a man riding a horse" --format json
"""


def train_image_parser() -> argparse.ArgumentParser:
    return build_parser(ImageTrainConfig, TRAIN_IMAGE_DOC, debug=True)


def train_caption_parser() -> argparse.ArgumentParser:
    return build_parser(CaptionTrainConfig, TRAIN_CAPTION_DOC, debug=True)


def infer_parser() -> argparse.ArgumentParser:
    return build_parser(InferenceConfig, INFER_DOC, debug=True)


def train_image(argv: Sequence[str] | None = None) -> dict:
    """``train_efficientnet.py``: returns the run's summary (``image_summary.json``); raises on bad input."""
    config = parse_config(ImageTrainConfig, train_image_parser(), argv)
    from pipeline.train.image import train_image_branch

    return train_image_branch(config)


def train_caption(argv: Sequence[str] | None = None) -> dict:
    """``train_caption_rnn.py``: returns the run's summary (``caption_summary.json``); raises on bad input."""
    config = parse_config(CaptionTrainConfig, train_caption_parser(), argv)
    from pipeline.train.caption import train_caption_branch

    return train_caption_branch(config)


def infer(argv: Sequence[str] | None = None) -> dict:
    """``inference.py``: predicts the --image files, or the test CSV (and evaluates); raises on bad input."""
    config = parse_config(InferenceConfig, infer_parser(), argv)
    if config.image is not None:
        from pipeline.predictor import predict_files

        return predict_files(config)
    from pipeline.inference import run_inference

    return run_inference(config)


# The console commands: the exit status, and one-line errors for bad input (pipeline.config.run_main).


def train_image_command(argv: Sequence[str] | None = None) -> int:
    return run_main(train_image, train_image_parser(), argv)


def train_caption_command(argv: Sequence[str] | None = None) -> int:
    return run_main(train_caption, train_caption_parser(), argv)


def infer_command(argv: Sequence[str] | None = None) -> int:
    return run_main(infer, infer_parser(), argv)
