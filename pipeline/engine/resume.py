"""Per-epoch training state, so ``--resume`` continues an interrupted run where it stopped.

After every completed epoch a training loop saves, atomically, everything the next epoch
depends on: model, optimizer, scheduler (and EMA) states, the random number generators and
the best epoch so far. ``--resume`` restores the last saved epoch and runs the remaining
ones, which gives the same result as a run that was never interrupted: the shuffling
is a function of (seed, epoch) or a saved generator, and dropout draws come from the
restored global generators. Under torchrun each rank draws its own dropout masks and
augmentations, so the file holds every rank's torch, CUDA, NumPy and Python generators and
each rank restores its own; it is refused by a run with another number of processes.

States live in ``weights/resume/<script>/<loop>.pt`` and carry a fingerprint of the
settings and data; a state saved by a different run is refused rather than mixed in.
They are deleted when the script finishes. Inside :meth:`ResumeState.writing_behind` (the
shared epoch loop) a state is copied to the CPU at the epoch's end and written to disk by a
background thread while the next epoch trains, so a 115 MB save is off the GPU's critical
path; the block's end, or the next save, waits for the write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.engine.distributed import DistContext, barrier, gather_to_main
from pipeline.io import CheckpointError, atomic_torch_save, safe_torch_load

# Settings that do not change what is computed, so a resumed run may differ in them.
NEUTRAL_SETTINGS = ("resume", "workers", "device", "weights_dir", "log", "keep_best")


def fingerprint(config: dict, **data: object) -> str:
    """A digest of the settings that shape training plus identities of the data."""
    shaping = {k: v for k, v in config.items() if k not in NEUTRAL_SETTINGS}
    text = json.dumps({"config": shaping, "data": data}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def to_saveable(value: Any) -> Any:
    """NumPy arrays (nested in dicts and lists) wrapped as tensors, which weights-only loading accepts."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, dict):
        return {k: to_saveable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_saveable(v) for v in value]
    return value


def from_saved(value: Any) -> Any:
    """The inverse of :func:`to_saveable`."""
    if isinstance(value, dict):
        if set(value) == {"__ndarray__"}:
            return value["__ndarray__"].numpy()
        return {k: from_saved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_saved(v) for v in value]
    return value


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's global random generators: torch's CPU one, ``device``'s when it is a
    GPU, NumPy's and Python's, in a form weights-only loading accepts."""
    state = np.random.get_state()
    if not isinstance(state, tuple):  # the legacy global generator is MT19937, whose state is a tuple
        raise RuntimeError(f"numpy's global random generator is not MT19937: {state.get('bit_generator')}")
    kind, keys, position, has_gauss, cached = state
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore the generators :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))


class ResumeState:
    """One training loop's per-epoch state: rank 0 writes it after each epoch (with every rank's
    random generators), ``--resume`` reads it on every rank.

    Usage::

        epoch, best = state.begin({"model": m, "optimizer": opt}, best, total_epochs)
        for epoch in range(epoch, total_epochs + 1):
            ...  # train, evaluate, update best
            state.end_epoch(epoch, best)
    """

    def __init__(
        self,
        directory: Path | None,
        loop: str = "",
        digest: str = "",
        resume: bool | str = False,
        context: DistContext = DistContext(),
    ) -> None:
        self.path = Path(directory) / f"{loop}.pt" if directory is not None else None
        self.digest, self.resume, self.context = digest, resume, context
        self.modules: dict[str, Any] = {}
        self._behind = False
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None

    @classmethod
    def off(cls) -> ResumeState:
        """A state that neither saves nor restores (a loop run outside a script)."""
        return cls(None)

    def _load(self) -> dict | None:
        if self.path is None or not self.resume or not self.path.is_file():
            return None
        state = safe_torch_load(self.path)
        if not isinstance(state, dict) or state.get("fingerprint") != self.digest:
            raise CheckpointError(
                f"{self.path}: saved by a run with other settings or data; rerun with the same options, "
                f"or without --resume to start over"
            )
        return state

    def begin(self, modules: dict[str, Any], best: Any, total_epochs: int) -> tuple[int, Any]:
        """(first epoch to run, best so far): ``(1, best)`` for a fresh run; after the last saved
        epoch when resuming (past ``total_epochs`` if the loop had finished)."""
        self.modules = modules
        state = self._load()
        if state is None:
            return 1, best
        saved_world = state.get("world_size")
        if saved_world is None:
            raise CheckpointError(
                f"{self.path}: saved by an older version without per-process random generators; "
                "rerun without --resume to start over"
            )
        if saved_world != self.context.world_size:
            raise CheckpointError(
                f"{self.path}: saved by a run of {saved_world} processes, this one has {self.context.world_size}; "
                f"each process restores its own random generators, so resume with {saved_world} processes, "
                f"or rerun without --resume to start over"
            )
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        set_rng_state(state["rng"][self.context.rank], self.context.device)
        epoch = total_epochs + 1 if state["finished"] else int(state["epoch"]) + 1
        return epoch, from_saved(state["best"])

    def end_epoch(self, epoch: int, best: Any, finished: bool = False) -> None:
        """Record a completed epoch (``finished``: the loop stops here, e.g. early stopping)."""
        if self.path is None:
            return
        # Every rank takes part: rank 0 writes the generators of all of them.
        generators = gather_to_main(rng_state(self.context.device), self.context)
        if not self.context.is_main:
            return
        state = {
            "fingerprint": self.digest,
            "epoch": epoch,
            "finished": finished,
            "modules": {name: module.state_dict() for name, module in self.modules.items()},
            "world_size": self.context.world_size,
            "rng": generators,
            "best": to_saveable(best),
        }
        self.wait()
        if not self._behind:
            atomic_torch_save(state, self.path)
            return
        # A copy on the CPU now (training goes on changing the live tensors), written meanwhile.
        self._writer = threading.Thread(target=self._write, args=(_cpu_copy(state), self.path), name="resume-writer")
        self._writer.start()

    def _write(self, state: dict, path: Path) -> None:
        try:
            atomic_torch_save(state, path)
        except BaseException as err:  # noqa: BLE001 - raised in the training thread by wait()
            self._write_error = err

    def wait(self) -> None:
        """Wait for a state being written behind; raise its error, if the write failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            raise error

    @contextlib.contextmanager
    def writing_behind(self) -> Iterator[None]:
        """Inside the block :meth:`end_epoch` writes in a background thread; leaving the block
        (an exception too) waits until the last state is on disk."""
        self._behind = True
        try:
            yield
        finally:
            self._behind = False
            self.wait()


def _cpu_copy(value: Any) -> Any:
    """``value`` with every tensor (in dicts, lists, tuples) copied to the CPU, detached."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


class GeneratorState:
    """A ``torch.Generator`` seen as a module with a state dict, so ResumeState can save it."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


def resume_directory(weights_dir: str | Path, script: str) -> Path:
    return Path(weights_dir) / "resume" / script


def start_run(weights_dir: str | Path, script: str, resume: bool | str, context: DistContext = DistContext()) -> Path:
    """The script's resume folder; a fresh (non-resumed) run first clears what an earlier run left.

    ``resume`` a path (``--resume PATH``): the states of that folder, an interrupted run's
    weights folder or its ``resume/<script>`` folder, are copied in first (PATH is left as it
    is; the copies are deleted with the run's own when it finishes)."""
    directory = resume_directory(weights_dir, script)
    if not resume and context.is_main and directory.exists():
        shutil.rmtree(directory)
    if isinstance(resume, str):
        # Every rank checks PATH, so a bad one stops them all; rank 0 copies, the others wait.
        source = Path(resume)
        source = resume_directory(source, script) if resume_directory(source, script).is_dir() else source
        states = sorted(source.glob("*.pt")) if source.is_dir() else []
        if not states:
            raise CheckpointError(
                f"--resume {resume}: no resume states of {script} training there (expected "
                f"{resume_directory(resume, script)}/*.pt, or a folder of such .pt files)"
            )
        if context.is_main and source.resolve() != directory.resolve():
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            for state in states:
                shutil.copy2(state, directory / state.name)
            # The epochs the interrupted run recorded, so the history reads as one run's.
            history = Path(resume) / f"history_{script}.csv"
            if history.is_file() and history.resolve() != (Path(weights_dir) / history.name).resolve():
                shutil.copy2(history, Path(weights_dir) / history.name)
        barrier(context)
    return directory


def finish_run(directory: Path, context: DistContext = DistContext()) -> None:
    """Delete the resume states once the script has written its outputs."""
    if context.is_main and directory.exists():
        shutil.rmtree(directory)
