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

from pipeline.train.image_config import ImageTrainConfig
from pipeline.config import build_parser, config_from_args
from pipeline.train.image import train_image_branch


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(ImageTrainConfig, __doc__)


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    return train_image_branch(config_from_args(ImageTrainConfig, args))


if __name__ == "__main__":
    main()
