"""One settings dataclass per script, and the command line built from it.

Every field carries its help text and its ``--help`` group, so ``--help`` documents every
option a script acts on, grouped (data, model, the training modes, decoder, run), and the
resolved settings saved beside the weights (``*_config.json``) read the same as the
command line. A script's dataclass holds only the options that script acts on.

``run_main`` runs a script as a program: the project's own errors, whose messages say what
is wrong and where (file and line, or the option), print as one line, not under a traceback
that only hides them; ``--debug`` (or ``PIPELINE_DEBUG=1``) shows the traceback anyway, and
any other exception, a bug, keeps its own. A script's ``main`` itself raises, for the tests
and other callers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Sequence
from typing import TypeVar
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.dataset import DEMO_DATA, DataFormatError
from pipeline.data.images import ImageReadError
from pipeline.engine.loop import NonFiniteLossError
from pipeline.engine.runtime import usable_cores
from pipeline.fusion import FusionError
from pipeline.io import CheckpointError, OptionError, write_json
from pipeline.models.backbones import BackboneSplitError, BackboneWeightsError

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


def build_parser(config_cls: type, description: str, *, debug: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per dataclass field, in ``GROUPS`` sections; with
    ``debug``, also ``--debug`` for a program run by ``run_main`` (not a setting:
    it changes how an error is shown, not what the run does, so it is no field)."""
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
    if debug:
        sections.get("run", parser).add_argument(
            "--debug", action="store_true",
            help="show the traceback of an error in the input instead of its one-line message (also "
                 "PIPELINE_DEBUG=1)")
    return parser


def config_from_args(config_cls: type, args: argparse.Namespace):
    """The dataclass filled from parsed arguments."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def save_config(config, path: Path) -> None:
    """Write the resolved settings as JSON, atomically."""
    write_json(path, dataclasses.asdict(config), sort_keys=True)


# --- Running a script as a program ----------------------------------------------------------------

DEBUG_ENV = "PIPELINE_DEBUG"
# Exit status of a run refused for its input, as argparse uses for a bad command line.
INPUT_ERROR_STATUS = 2


# FileNotFoundError: every file the scripts open by name (--data, --backbone-weights, ...) is
# one the user gave; its message names it.
USER_ERRORS: tuple[type[BaseException], ...] = (
    DataFormatError, OptionError, FusionError, CheckpointError, BackboneWeightsError, BackboneSplitError,
    ImageReadError, NonFiniteLossError, FileNotFoundError,
)


Config = TypeVar("Config")


def parse_config(config_cls: type[Config], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> Config:
    """The settings of a script from its command line, checked before any work: a value that
    cannot work (``config.validate()``) is an ``OptionError`` naming the option."""
    config = config_from_args(config_cls, parser.parse_args(argv))
    try:
        config.validate()
    except ValueError as err:
        raise OptionError(str(err)) from None
    return config


def debug_requested(parser: argparse.ArgumentParser, argv: Sequence[str]) -> bool:
    """True when ``--debug`` is on the command line or ``PIPELINE_DEBUG`` is set (to other than 0)."""
    if os.environ.get(DEBUG_ENV, "0").strip() not in ("", "0"):
        return True
    known, _ = parser.parse_known_args(argv)
    return bool(getattr(known, "debug", False))


def run_main(main: Callable[[list[str]], object], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main(argv)`` as a program and return its exit status: 0, or 2 after
    printing ``error: MESSAGE`` on stderr for one of ``USER_ERRORS``. With ``--debug`` those
    raise like any other exception, traceback and all."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except USER_ERRORS as err:
        # main parsed argv already, so parsing it again here cannot fail.
        if debug_requested(parser, argv):
            raise
        print(f"error: {err}", file=sys.stderr)
        return INPUT_ERROR_STATUS
    return 0
