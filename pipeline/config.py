"""One settings dataclass per script, and the command line built from it.

Every field carries its help text and its ``--help`` group, so ``--help`` documents every
option a script acts on, grouped (data, model, the training modes, decoder, run), and the
resolved settings saved beside the weights (``*_config.json``) read the same as the
command line. A script's dataclass holds only the options that script acts on.

``run_main`` runs a script as a program: the project's own errors, whose messages say what
is wrong and where (file and line, or the option), and OS errors (``PATH: reason``: no
permission, a full disk, a file where a folder belongs) print as one line, not under a traceback
that only hides them; ``--debug`` (or ``PIPELINE_DEBUG=1``) shows the traceback anyway, and
any other exception, a bug, keeps its own. A script's ``main`` itself raises, for the tests
and other callers. ``--config FILE`` reads the settings from such a JSON file (a saved
``*_config.json`` or one written by hand); options on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

# Only light imports here: every script builds its parser from this module before anything
# else, and ``--help`` must answer without waiting seconds for torch and timm to load.
from pipeline.choices import DEMO_DATA, usable_cores
from pipeline.io import CheckpointError, OptionError, unique_keys_hook, write_json

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


def option(
    default,
    help: str,  # noqa: A002 - argparse's name
    group: str = "run",
    aliases: tuple[str, ...] = (),
    bounds: tuple[int, int] | None = None,
    **argparse_kwargs,
):
    """A dataclass field that is also a command-line option, shown under ``--help`` section ``group``
    and also accepted under the older spellings ``aliases``. ``bounds`` (lowest, highest), for an
    integer option, are checked as the command line or a ``--config`` file is parsed."""
    if group not in GROUPS:
        raise ValueError(f"option group {group!r}: valid groups are {', '.join(GROUPS)}")
    return field(
        default=default,
        metadata={"help": help, "group": group, "aliases": aliases, "bounds": bounds, **argparse_kwargs},
    )


# NumPy's generator (np.random.seed) takes seeds of 32 bits: one outside them failed in seed_everything.
SEED_BOUNDS = (0, 2**32 - 1)


def seed_option(help: str) -> int:  # noqa: A002 - as option's
    """``--seed``: an integer in ``SEED_BOUNDS``, refused as it is parsed."""
    return option(0, help, bounds=SEED_BOUNDS)


def _bounded(value_type: type, flag: str, bounds: tuple[int, int]) -> Callable[[str], object]:
    """An argparse ``type`` that converts like ``value_type`` and refuses a value outside ``bounds``."""
    low, high = bounds

    def convert(text: str) -> object:
        value = value_type(text)  # a ValueError here is argparse's own "invalid int value"
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; {flag} takes {low}..{high}")
        return value

    convert.__name__ = value_type.__name__  # argparse names the type in its "invalid ... value" message
    return convert


def workers_option() -> int:
    """``--workers``, for the scripts that decode images."""
    return option(
        usable_cores(),
        "DataLoader worker processes decoding images (default: one per core; under torchrun the "
        "processes of a machine share them); feature extraction on CPU runs one single-threaded "
        "decode+forward process per core instead (0: everything in the main process)",
    )


def output_option() -> str:
    """``--output``, for the scripts that write reports."""
    return option("output", "folder for the submission, predictions, reports and plots")


@dataclass
class CommonConfig:
    """The options every script acts on (the command-line contract)."""

    data: str = option(
        str(DEMO_DATA),
        "dataset folder holding train.csv, test.csv and the images in data/ "
        "(the competition's layout); the default is the demo dataset that make demo-data generates",
        "data",
    )
    images: str | None = option(None, "image folder, overriding DATA/data", "data")
    val_fraction: float = option(
        0.15,
        "fraction of train.csv held out for validation and fusion tuning, by a stable hash of "
        "ImageID; must be the same for every script of a run",
        "data",
    )
    weights_dir: str = option(
        "weights", "folder of the checkpoints, validation probabilities and fusion.json", aliases=("--weights",)
    )
    device: str = option("auto", "where to compute: auto picks cuda when available", choices=["auto", "cpu", "cuda"])
    seed: int = seed_option("random seed for the split-independent randomness (initialisation, shuffling)")


@dataclass
class TrainingConfig(CommonConfig):
    """The options both training scripts act on."""

    resume: bool | str = option(
        False,
        "continue an interrupted run from its last completed epoch (same options and data give the "
        "result of an uninterrupted run); per-epoch states live in WEIGHTS_DIR/resume/ until the run finishes. "
        "--resume PATH continues from the states of another folder instead: an interrupted run's weights "
        "folder or its resume/<script> folder (copied here first, PATH is left as it is)",
        metavar="PATH",
    )
    log: str = option(
        "csv",
        "where each epoch's loss, score and learning rate go: csv = WEIGHTS_DIR/history_<branch>.csv "
        "(always written); tensorboard = that and TensorBoard event files in WEIGHTS_DIR/tensorboard/<branch>/ "
        "(tensorboard --logdir WEIGHTS_DIR/tensorboard)",
        choices=["csv", "tensorboard"],
    )
    keep_best: int = option(
        0,
        "also keep the weights of the K best epochs of each training loop (by validation score) in "
        "WEIGHTS_DIR/best/, as plain state dicts with their epoch and score; 0: only the best, in the checkpoint",
        metavar="K",
    )


# A help text that already says its default ("default: 8 partial, 25 end to end").
_STATES_DEFAULT = re.compile(r"\bdefault[:\s]", re.IGNORECASE)


class OneDefaultHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once.

    A default of None means "decided by the run": the help text says how, and "(default: None)"
    would say nothing; a help text that states its default is not given a second one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default is None or _STATES_DEFAULT.search(help_text) or "%(default)" in help_text:
            return help_text
        return super()._get_help_string(action)


class HelpFormatter(OneDefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default once, and the script docstring's paragraphs kept as written."""


def build_parser(config_cls: type, description: str, *, debug: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with one ``--option`` per dataclass field, in ``GROUPS`` sections; with
    ``debug``, for a script run by ``run_main`` and parsed by ``parse_config``, also ``--debug``
    and ``--config`` (neither is a setting: one changes how an error is shown, the other where
    the settings come from, so neither is a field or saved)."""
    # allow_abbrev=False: a prefix (--epoch, --thresh) is refused, not read as the option it starts.
    parser = argparse.ArgumentParser(
        usage="%(prog)s [options]", description=description, formatter_class=HelpFormatter, allow_abbrev=False
    )
    hints = typing.get_type_hints(config_cls)
    fields = dataclasses.fields(config_cls)
    sections = {
        name: parser.add_argument_group(title)
        for name, title in GROUPS.items()
        if any(f.metadata["group"] == name for f in fields)
    }
    for f in fields:
        meta = dict(f.metadata)
        help_text, section, aliases = meta.pop("help"), sections[meta.pop("group")], meta.pop("aliases")
        bounds = meta.pop("bounds")
        flags = ["--" + f.name.replace("_", "-"), *aliases]
        hint = hints[f.name]
        value_type = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if set(typing.get_args(hint)) == {bool, str}:  # --flag alone (True) or --flag VALUE
            section.add_argument(*flags, dest=f.name, nargs="?", const=True, default=f.default, help=help_text, **meta)
            continue
        if value_type is bool:  # bool, or bool | None where None means "decided by the run"
            section.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
            continue
        if typing.get_origin(value_type) is list:
            meta.setdefault("nargs", "+")
            value_type = typing.get_args(value_type)[0]
        if value_type not in (int, float, str):
            value_type = str
        if bounds is not None:
            value_type = _bounded(value_type, flags[0], bounds)
        section.add_argument(*flags, dest=f.name, type=value_type, default=f.default, help=help_text, **meta)
    if debug:
        sections.get("run", parser).add_argument(
            "--debug",
            action="store_true",
            help="show the traceback of an error in the input instead of its one-line message (also PIPELINE_DEBUG=1)",
        )
        sections.get("run", parser).add_argument(
            "--config",
            metavar="FILE",
            default=None,
            help="read the settings from this JSON object of option names (with _ for -) and values, such "
            "as a saved WEIGHTS_DIR/*_config.json; options given on the command line override it",
        )
    return parser


def config_from_args(config_cls: type, args: argparse.Namespace):
    """The dataclass filled from parsed arguments."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


# The key of a saved ``*_config.json`` that records what the command line asked for where the
# run resolved it (``"mode": "auto"`` beside the ``"mode": "partial"`` it ran); never read back.
REQUESTED_KEY = "requested"


def save_config(config, path: Path, requested: dict[str, object] | None = None) -> None:
    """Write the resolved settings as JSON, atomically, with the ``requested`` values beside them."""
    write_json(
        path, {**dataclasses.asdict(config), **({REQUESTED_KEY: requested} if requested else {})}, sort_keys=True
    )


# --- Running a script as a program ----------------------------------------------------------------

DEBUG_ENV = "PIPELINE_DEBUG"
# Exit status of a run refused for its input, as argparse uses for a bad command line.
INPUT_ERROR_STATUS = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors whose message says what is wrong with the input: printed as one line.

    Imported here, when a script has parsed its options, not at the top: they live in the
    modules that load torch. OSError: every file the scripts open by name (--data,
    --backbone-weights, ...) is one the user gave, and every folder they write into
    (--weights-dir, --output) one the user chose, so an OS error (no such file, permission denied,
    a read-only file system, disk full, a file where a folder belongs, a name too long) is about
    the user's paths: said with the path and the reason. Every write is atomic, so what such an
    error interrupts leaves the previous files intact."""
    from pipeline.data.dataset import DataFormatError
    from pipeline.data.images import ImageReadError
    from pipeline.engine.loop import NonFiniteLossError
    from pipeline.fusion import FusionError
    from pipeline.models.backbones import BackboneWeightsError
    from pipeline.models.stages import BackboneSplitError

    return (
        DataFormatError,
        OptionError,
        FusionError,
        CheckpointError,
        BackboneWeightsError,
        BackboneSplitError,
        ImageReadError,
        NonFiniteLossError,
        OSError,
    )


Config = TypeVar("Config")


def _json_kind(value: object) -> str:
    """A JSON value's type as the file spells it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _checked_value(f: dataclasses.Field, hint: object, value: object, path: Path) -> object:
    """``value`` of key ``f.name`` if it is one the option takes, else an ``OptionError`` naming
    the file, the key and the type expected."""
    flag = "--" + f.name.replace("_", "-")
    optional = type(None) in typing.get_args(hint)
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
    if value is None and optional:
        return None
    if set(typing.get_args(hint)) == {bool, str}:
        ok, expected = isinstance(value, (bool, str)), "true, false or a path"
    elif item is not None:
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, item) for v in value)
        expected = f"a non-empty list of {item.__name__}"
    elif kind is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif kind is float:
        # A hand-written 1 means 1.0; true is no number, here as on the command line.
        ok, expected = False, "a number"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ok, value = True, float(value)
    elif kind is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, expected = isinstance(value, str), "a string"
    bounds = f.metadata.get("bounds")
    if ok and bounds is not None and not bounds[0] <= value <= bounds[1]:
        ok, expected = False, f"{expected} in {bounds[0]}..{bounds[1]}"
    if not ok:
        expected += " or null" if optional else ""
        raise OptionError(f"--config {path}: key {f.name!r} ({flag}) is {json.dumps(value)}; it takes {expected}")
    choices = f.metadata.get("choices")
    if choices is not None:
        # A list here is a list option's (a scalar option's value passed the checks above as no list).
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in choices]
        if bad:
            raise OptionError(
                f"--config {path}: key {f.name!r} ({flag}) is {json.dumps(bad[0])}; "
                f"valid: {', '.join(map(str, choices))}"
            )
    return value


def read_config_file(config_cls: type, path: str | Path) -> dict[str, object]:
    """The settings in a ``--config`` file, by field name, each checked as the command line
    checks its option: a JSON object whose keys are ``config_cls``'s fields (everything
    ``save_config`` writes), values of the option's type and among its choices.

    A key that is no option of the script is refused, not skipped: a typo left unread would
    run with the default the file meant to change."""
    path = Path(path)

    unique_keys = unique_keys_hook(
        lambda keys: OptionError(f"--config {path}: key(s) {keys} given twice; give each once")
    )

    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise OptionError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise OptionError(f"--config {path}: is a directory, not a JSON file") from None
    except json.JSONDecodeError as err:
        raise OptionError(f"--config {path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise OptionError(f"--config {path}: not UTF-8 text; a config file is plain JSON") from None
    except RecursionError:
        raise OptionError(
            f"--config {path}: JSON nested too deeply to read; a config file is one flat object of settings"
        ) from None
    except OSError as err:  # a symlink loop, no permission, a name too long...
        raise OptionError(f"--config {path}: {err.strerror or err}") from None
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if not isinstance(raw, dict):
        raise OptionError(
            f"--config {path}: holds {_json_kind(raw)}, not a JSON object of settings "
            f"(keys: {', '.join(sorted(fields))})"
        )
    # What a saved file's run was asked for: a record for the reader, not a setting.
    raw.pop(REQUESTED_KEY, None)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise OptionError(f"--config {path}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(config_cls)
    return {name: _checked_value(fields[name], hints[name], value, path) for name, value in raw.items()}


def parse_config(config_cls: type[Config], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> Config:
    """The settings of a script from its command line, checked before any work: a value that
    cannot work (``config.validate()``) is an ``OptionError`` naming the option.

    With ``--config FILE`` the file's settings replace the defaults and the command line is
    parsed again, so an option given there wins over the file."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:
        parser.set_defaults(**read_config_file(config_cls, args.config))
        args = parser.parse_args(argv)
    config = config_from_args(config_cls, args)
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


def run_main(
    main: Callable[[list[str]], object],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a script's ``main(argv)`` as a program and return its exit status: 0, or 2 after
    printing ``error: MESSAGE`` on stderr for one of ``user_errors()`` or the script's own
    ``errors``. With ``--debug`` those raise like any other exception, traceback and all."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except Exception as err:
        # Not ``except user_errors()``: that would import torch after --help's SystemExit too.
        # main parsed argv already, so parsing it again here cannot fail.
        if not isinstance(err, (*user_errors(), *errors)) or debug_requested(parser, argv):
            raise
        print(f"error: {error_message(err)}", file=sys.stderr)
        return INPUT_ERROR_STATUS
    return 0


def error_message(err: BaseException) -> str:
    """The one line ``run_main`` prints for a user error: its message, or for an OS error raised
    by the system (which carries the path) ``PATH: reason`` without the errno prefix."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        target = f" -> {err.filename2}" if err.filename2 is not None else ""
        reason = err.strerror
        if err.errno == errno.ENOTDIR or (err.errno == errno.EEXIST and os.path.isfile(err.filename)):
            reason += " (a file stands where a folder belongs)"
        return f"{err.filename}{target}: {reason}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)
