"""Train the image branch: an EfficientNet image head and the CNN-RNN label-sequence decoder.

On a GPU the backbone is fine-tuned end to end with both heads (--mode finetune). On a CPU
its first stages run once and their output maps are cached, and the last stage trains with
both heads on the cache (--mode partial); --mode frozen trains the heads alone on cached
features, fastest. Writes WEIGHTS_DIR/image.pt, WEIGHTS_DIR/decoder.pt, their validation
probabilities and WEIGHTS_DIR/image_config.json.

    python train_efficientnet.py --data path/to/dataset
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import build_parser, parse_config, run_main
from pipeline.train.image_config import ImageTrainConfig
from pipeline.train.image import train_image_branch


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(ImageTrainConfig, __doc__, debug=True)


def main(argv: list[str] | None = None) -> dict:
    return train_image_branch(parse_config(ImageTrainConfig, get_args_parser(), argv))


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser()))
