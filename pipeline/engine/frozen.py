"""The interface every runtime of the frozen forward passes implements, and the verified
on-disk cache of the models a runtime converts.

A frozen forward pass takes uint8 pixels (B, 3, R, R), laid out channels_last as the loader
workers make them, and gives float outputs: avg+max pooled features (B, 2C) or the module's
maps (B, C, h, w) (:class:`pipeline.models.image_model.RawPixelGraph`). A :class:`Runtime`
builds one (:meth:`Runtime.build`) from a module in eval mode; the registry of runtimes and
the ``auto`` choice are in :mod:`pipeline.engine.runtimes`.

A runtime that converts the module (OpenVINO, ONNX Runtime) keeps the converted files under
a key (:meth:`Runtime.model_key`) with a digest file beside them (:class:`ModelFiles`): files
that are missing, cut off, changed or unreadable are converted again, with a warning naming
the file, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.models.backbones import state_digest

log = logging.getLogger(__name__)

# What the frozen front can compute in: float32, bfloat16 (where the CPU has it), int8
# (post-training static quantisation, calibrated on training images).
FRONT_PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def threads_here(threads: int) -> int:
    """The threads a forward runs on in this process: one in a loader worker (extraction runs
    one worker per core, each running its own batches), else ``threads``."""
    return 1 if torch.utils.data.get_worker_info() is not None else threads


class FrozenForward(ABC):
    """A frozen module ready to run: uint8 pixel batches (B, 3, R, R) in, outputs out."""

    #: True: each loader worker runs its own batches with one thread (the torch layout on a
    #: CPU); False: the main process runs the batches while the workers decode.
    in_workers: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Outputs (B, ...) of one uint8 batch (B, 3, R, R)."""

    def run_many(self, batches: Iterable[tuple[Any, torch.Tensor]]) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """(tag, outputs) of each (tag, uint8 batch), in order; an empty batch is not run
        (its outputs are None). Runtimes with several streams keep a batch on each."""
        for tag, pixels in batches:
            yield tag, (self(pixels) if len(pixels) else None)


@dataclass(frozen=True)
class Calibration:
    """Images that int8 quantisation calibrates on: a callable giving uint8 batches
    (B, 3, R, R) of real training images, and a name for them in cache keys."""

    batches: Callable[[], Iterable[torch.Tensor]]
    digest: str
    image_ids: tuple[str, ...] = ()  # which images, recorded with the weights


class Runtime(ABC):
    """One way of running the frozen forward passes."""

    name: ClassVar[str]
    #: Front precisions it can run (see :data:`FRONT_PRECISIONS`).
    precisions: ClassVar[tuple[str, ...]]

    @abstractmethod
    def version(self) -> str | None:
        """The installed package's version, or None where it is not installed."""

    def unavailable(self, device: torch.device) -> str | None:
        """Why this runtime cannot run on ``device`` here (None: it can)."""
        if self.version() is None:
            return f"the {self.name} package is not installed (pip install -r requirements.txt)"
        if device.type != "cpu":
            return f"{self.name} runs on a CPU; this run's device is {device.type}"
        return None

    def model_key(
        self,
        module: nn.Module,
        preprocessing: dict,
        pooled: bool,
        precision: str,
        calibration: Calibration | None = None,
    ) -> dict:
        """What a converted model depends on: the module's own tensors (a backbone's front and
        the whole backbone differ in them, and two random initialisations share a weights
        name but not their tensors), the preprocessing, pooled or not, the precision, the
        calibration images where quantised and the runtime's version."""
        key = {
            "runtime": self.name,
            "version": self.version(),
            "state": state_digest(module),
            "preprocessing": preprocessing,
            "pooled": pooled,
            "precision": precision,
        }
        if precision == "int8" and calibration is not None:
            key["calibration"] = calibration.digest
        return key

    @abstractmethod
    def build(
        self,
        module: nn.Module,
        preprocessing: dict,
        pooled: bool,
        precision: str,
        device: torch.device,
        model_cache: Path | None,
        cores: int,
        calibration: Calibration | None = None,
    ) -> FrozenForward:
        """``module`` (eval mode, taking normalised images) ready to run in ``precision``;
        converted models kept in ``model_cache`` (None: in this process only)."""


class FrontAndTail(nn.Sequential):
    """A backbone as its frozen front (``self[0]``) then its trained tail (``self[1]``): int8
    quantises the front alone, the tail stays in float as it was trained."""

    def __init__(self, front: nn.Module, tail: nn.Module) -> None:
        super().__init__(front, tail)


def key_digest(key: dict) -> str:
    """A short name of a key (a JSON-able dict)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelFiles:
    """The files of one converted model (``main`` and any companions such as OpenVINO's .bin),
    with ``<main>.sha256.json`` beside them recording each file's size and SHA-256."""

    main: Path
    companions: tuple[str, ...] = ()  # suffixes of files beside ``main``, e.g. (".bin",)

    @property
    def files(self) -> list[Path]:
        return [self.main, *(self.main.with_suffix(suffix) for suffix in self.companions)]

    @property
    def digest_file(self) -> Path:
        return self.main.with_name(self.main.name + ".sha256.json")

    def problem(self) -> str | None:
        """Why the files cannot be used as they are (None: every one is there and matches
        the digest recorded when it was written), naming the file at fault."""
        if not self.main.exists():
            return None if not self.digest_file.exists() else f"{self.main}: missing"
        try:
            recorded = json.loads(self.digest_file.read_text())
        except (OSError, ValueError) as err:
            return f"{self.digest_file}: no readable digest ({type(err).__name__})"
        for path in self.files:
            entry = recorded.get(path.name) if isinstance(recorded, dict) else None
            if not isinstance(entry, dict):
                return f"{self.digest_file}: no digest of {path.name}"
            if not path.exists():
                return f"{path}: missing"
            try:
                size = path.stat().st_size
                if size != entry.get("size"):
                    return f"{path}: {size} bytes, {entry.get('size')} when written (cut off or changed)"
                if _file_sha256(path) != entry.get("sha256"):
                    return f"{path}: content differs from the digest recorded when it was written"
            except OSError as err:
                return f"{path}: cannot be read ({err.strerror or type(err).__name__})"
        return None

    def present(self) -> bool:
        """True when there is something on disk to verify (the main file or its digest)."""
        return self.main.exists() or self.digest_file.exists()

    def write(self, save: Callable[[Path], None]) -> None:
        """Write the files by ``save(temporary main path)`` (which writes the companions beside
        it), then the digest, each renamed into place: a reader never sees a half-written file
        as complete, and an interrupted write leaves files the digest does not match."""
        self.main.parent.mkdir(parents=True, exist_ok=True)
        partial = self.main.with_name(f"{self.main.stem}.{os.getpid()}.partial{self.main.suffix}")
        save(partial)
        temporary = [partial, *(partial.with_suffix(suffix) for suffix in self.companions)]
        digests = {
            final.name: {"size": written.stat().st_size, "sha256": _file_sha256(written)}
            for written, final in zip(temporary, self.files, strict=True)
        }
        self.digest_file.unlink(missing_ok=True)
        for written, final in zip(temporary[1:], self.files[1:], strict=True):
            written.replace(final)
        partial.replace(self.main)
        digest_partial = self.digest_file.with_name(f"{self.digest_file.name}.{os.getpid()}.partial")
        digest_partial.write_text(json.dumps(digests, indent=1, sort_keys=True))
        digest_partial.replace(self.digest_file)

    def load_or_build(
        self, load: Callable[[Path], Any], build: Callable[[], Any], save: Callable[[Any, Path], None]
    ) -> Any:
        """The model read by ``load(main)`` where the files are there, verified and readable;
        else built by ``build()`` and written by ``save(model, path)``, with a warning naming
        the file at fault when there were files that could not be used."""
        if self.present():
            problem = self.problem()
            if problem is None:
                try:
                    return load(self.main)
                except Exception as err:  # noqa: BLE001 - any reader error means: convert again
                    problem = f"{self.main}: unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            log.warning("model cache: %s; converting the model again", problem)
        model = build()
        self.write(lambda path: save(model, path))
        return model
