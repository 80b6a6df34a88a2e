"""One settings dataclass per script, and the command line built from it.

Every field carries its help text and its ``--help`` group, so ``--help`` documents every
option a script acts on, grouped (data, model, the training modes, decoder, run), and the
resolved settings saved beside the weights (``*_config.json``) read the same as the
command line. A script's dataclass holds only the options that script acts on.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.dataset import DEMO_DATA
from pipeline.engine.runtime import usable_cores
from pipeline.io import write_json

# ``--help`` sections, in the order shown; an option names its section with ``group=``.
GROUPS = {
    "data": "data (the dataset and its validation split)",
    "model": "model (what is built)",
    "training": "training",
    "frozen": "frozen mode (the heads train on cached pooled features)",
    "finetune": "partial and finetune modes (the backbone trains with the heads)",
    "decoder": "CNN-RNN label decoder",
    "prediction": "prediction and fusion",
    "run": "run (files, device, reproducibility)",
}


def option(default, help: str, group: str = "run", aliases: tuple[str, ...] = (),  # noqa: A002 - argparse's name
           **argparse_kwargs):
    """A dataclass field that is also a command-line option, shown under ``--help`` section ``group``
    and also accepted under the older spellings ``aliases``."""
    if group not in GROUPS:
        raise ValueError(f"option group {group!r}: valid groups are {', '.join(GROUPS)}")
    return field(default=default, metadata={"help": help, "group": group, "aliases": aliases, **argparse_kwargs})


def workers_option() -> int:
    """``--workers``, for the scripts that decode images."""
    return option(usable_cores(),
                  "DataLoader worker processes decoding images (default: one per core; under torchrun the "
                  "processes of a machine share them); feature extraction on CPU runs one single-threaded "
                  "decode+forward process per core instead (0: everything in the main process)")


def output_option() -> str:
    """``--output``, for the scripts that write reports."""
    return option("output", "folder for the submission, predictions, reports and plots")


@dataclass
class CommonConfig:
    """The options every script acts on (the command-line contract)."""

    data: str = option(
        str(DEMO_DATA), "dataset folder holding train.csv, test.csv and the images in data/ "
        "(the competition's layout); the default is the demo dataset that make demo-data generates", "data")
    images: str | None = option(None, "image folder, overriding DATA/data", "data")
    val_fraction: float = option(
        0.15, "fraction of train.csv held out for validation and fusion tuning, by a stable hash of "
        "ImageID; must be the same for every script of a run", "data")
    weights_dir: str = option("weights", "folder of the checkpoints, validation probabilities and fusion.json",
                              aliases=("--weights",))
    device: str = option("auto", "where to compute: auto picks cuda when available", choices=["auto", "cpu", "cuda"])
    seed: int = option(0, "random seed for the split-independent randomness (initialisation, shuffling)")


@dataclass
class TrainingConfig(CommonConfig):
    """The options both training scripts act on."""

    resume: bool = option(
        False, "continue an interrupted run from its last completed epoch (same options and data give the "
        "result of an uninterrupted run); per-epoch states live in WEIGHTS_DIR/resume/ until the run finishes")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the script docstring's paragraphs as written."""


def build_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per dataclass field, in ``GROUPS`` sections."""
    parser = argparse.ArgumentParser(usage="%(prog)s [options]", description=description,
                                     formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(config_cls)
    fields = dataclasses.fields(config_cls)
    sections = {name: parser.add_argument_group(title)
                for name, title in GROUPS.items() if any(f.metadata["group"] == name for f in fields)}
    for f in fields:
        meta = dict(f.metadata)
        help_text, section, aliases = meta.pop("help"), sections[meta.pop("group")], meta.pop("aliases")
        flags = ["--" + f.name.replace("_", "-"), *aliases]
        hint = hints[f.name]
        value_type = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if value_type is bool:  # bool, or bool | None where None means "decided by the run"
            section.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                 help=help_text)
            continue
        if typing.get_origin(value_type) is list:
            meta.setdefault("nargs", "+")
            value_type = typing.get_args(value_type)[0]
        if value_type not in (int, float, str):
            value_type = str
        section.add_argument(*flags, dest=f.name, type=value_type, default=f.default, help=help_text, **meta)
    return parser


def config_from_args(config_cls: type, args: argparse.Namespace):
    """The dataclass filled from parsed arguments."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def save_config(config, path: Path) -> None:
    """Write the resolved settings as JSON, atomically."""
    write_json(path, dataclasses.asdict(config), sort_keys=True)
