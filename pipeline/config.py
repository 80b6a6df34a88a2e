"""One settings dataclass per script, and the command line built from it.

Every field carries its help text, so ``--help`` documents every option and the resolved
settings saved beside the weights (``*_config.json``) read the same as the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import write_json
from pipeline.engine.runtime import default_workers

DEMO_DATA = Path("data/demo")


def option(default, help: str, **argparse_kwargs):  # noqa: A002 - mirrors argparse's name
    """A dataclass field that is also a command-line option."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class CommonConfig:
    """The options shared by all three scripts (the command-line contract)."""

    data: str | None = option(
        None, "dataset folder holding train.csv, test.csv and the images in data/ "
        "(the competition's layout); default: the demo dataset in data/demo, generated if missing")
    images: str | None = option(None, "image folder, overriding DATA/data")
    weights: str = option("weights", "folder for checkpoints, validation probabilities and fusion.json")
    output: str = option("output", "folder for the submission, reports and plots")
    device: str = option("auto", "where to compute: auto picks cuda when available", choices=["auto", "cpu", "cuda"])
    seed: int = option(0, "random seed for the split-independent randomness (initialisation, shuffling)")
    val_fraction: float = option(
        0.15, "fraction of train.csv held out for validation and fusion tuning, by a stable hash of "
        "ImageID; must be the same for every script of a run")
    batch_size: int = option(64, "images or captions per batch")
    workers: int = option(default_workers(),
                          "DataLoader worker processes decoding images (default: one per core; under torchrun "
                          "the processes of a machine share them); feature extraction on CPU runs one "
                          "single-threaded decode+forward process per core instead (0: everything in the main "
                          "process)")

    @property
    def data_dir(self) -> Path:
        return Path(self.data) if self.data else DEMO_DATA


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the script docstring's paragraphs as written."""


def build_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per dataclass field."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        value_type = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if value_type not in (int, float, str):
            value_type = str
        parser.add_argument(flag, type=value_type, default=f.default, help=help_text, **meta)
    return parser


def config_from_args(config_cls: type, args: argparse.Namespace):
    """The dataclass filled from parsed arguments."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def save_config(config, path: Path) -> None:
    """Write the resolved settings as JSON, atomically."""
    write_json(path, dataclasses.asdict(config), sort_keys=True)


@dataclass
class TrainingConfig(CommonConfig):
    """The options shared by the two training scripts."""

    resume: bool = option(
        False, "continue an interrupted run from its last completed epoch (same options and data give the "
        "result of an uninterrupted run); per-epoch states live in WEIGHTS/resume/ until the run finishes")
