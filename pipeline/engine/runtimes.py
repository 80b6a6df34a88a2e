"""The registry of runtimes for the frozen forward passes, and ``--runtime auto``.

Every frozen forward pass (the feature cache, the stage maps, inference, ``--image``, the
bench) asks this module for its runtime by name; none compares names itself:

- ``torch``: PyTorch eager mode, batch norm and the input normalisation folded, one
  single-threaded process per core (:mod:`pipeline.engine.torch_runtime`);
- ``openvino``: the graph converted by OpenVINO and compiled for this CPU
  (:mod:`pipeline.engine.openvino_runtime`);
- ``onnxruntime``: the graph exported to ONNX and run by ONNX Runtime, also in int8
  (:mod:`pipeline.engine.onnx_runtime`);
- ``auto``: the fastest of those that can run here, for this module, resolution and precision,
  found by timing a few batches in each (:func:`choose_fastest`), the result kept in
  ``<cache>/runtime_choice.json`` under the CPU model, its instruction set and the runtimes'
  versions, so a machine measures once.

Adding a runtime: a module implementing :class:`pipeline.engine.frozen.Runtime`, and its line
in :data:`pipeline.choices.RUNTIME_CLASSES`, from which :data:`RUNTIMES` here is built.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.choices import RUNTIME_CLASSES, usable_cores
from pipeline.engine.frozen import Calibration, FrozenForward, Runtime, key_digest
from pipeline.engine.runtime import cpu_model, instruction_set
from pipeline.io import OptionError
from pipeline.models.backbones import state_digest

log = logging.getLogger(__name__)


def _runtime(class_path: str) -> Runtime:
    """An instance of the runtime class that ``module.Class`` names."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)()


RUNTIMES: dict[str, Runtime] = {name: _runtime(class_path) for name, class_path in RUNTIME_CLASSES.items()}
RUNTIME_CHOICES = ("auto", *RUNTIMES)
CHOICE_FILE = "runtime_choice.json"
# ``auto`` times this many batches of this size in each runtime, after one untimed batch.
PROBE_BATCHES, PROBE_BATCH_SIZE = 3, 16


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``; an unknown name is refused, listing the valid ones."""
    if name not in RUNTIMES:
        raise OptionError(f"--runtime {name!r}: valid values are {', '.join(RUNTIME_CHOICES)}")
    return RUNTIMES[name]


def check_runtime(name: str, device: torch.device, precision: str = "fp32") -> Runtime:
    """The runtime ``name`` where it can run here in ``precision``; else a one-line error
    saying why."""
    runtime = get_runtime(name)
    reason = runtime.unavailable(device)
    if reason is not None:
        raise OptionError(f"--runtime {name}: {reason} (use --runtime auto or torch)")
    if precision not in runtime.precisions:
        raise OptionError(
            f"--runtime {name} cannot run precision {precision} (it runs {', '.join(runtime.precisions)})"
        )
    return runtime


def available_runtimes(device: torch.device, precision: str) -> list[str]:
    """The runtimes that can run on ``device`` here in ``precision``, in registry order."""
    return [
        name
        for name, runtime in RUNTIMES.items()
        if runtime.unavailable(device) is None and precision in runtime.precisions
    ]


@dataclass
class Probe:
    """What ``auto`` times: the module that will run, with its preprocessing, output and precision."""

    module: nn.Module
    preprocessing: dict
    pooled: bool
    precision: str
    calibration: Calibration | None = None


def build_forward(
    name: str, probe: Probe, device: torch.device, model_cache: Path | None, cores: int | None = None
) -> FrozenForward:
    """``probe.module`` ready to run in runtime ``name`` (converted models kept in ``model_cache``)."""
    runtime = check_runtime(name, device, probe.precision)
    return runtime.build(
        probe.module,
        probe.preprocessing,
        probe.pooled,
        probe.precision,
        device,
        model_cache,
        cores or usable_cores(),
        probe.calibration,
    )


def probe_pixels(batch_size: int, resolution: int) -> torch.Tensor:
    """A fixed random uint8 batch (B, 3, R, R), channels_last as the loader workers make them."""
    return torch.randint(
        0, 256, (batch_size, resolution, resolution, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    ).permute(0, 3, 1, 2)


class _ForwardPasses(torch.utils.data.Dataset):
    """Item ``k``: one forward pass of a fixed batch, run in a DataLoader worker (one thread)."""

    def __init__(self, forward: FrozenForward, pixels: torch.Tensor, batches: int) -> None:
        self.forward, self.pixels, self.batches = forward, pixels, batches

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, k: int) -> float:
        return float(self.forward(self.pixels).float().mean())


def time_forward(
    forward: FrozenForward,
    resolution: int,
    batches: int = PROBE_BATCHES,
    batch_size: int = PROBE_BATCH_SIZE,
    processes: int = 0,
) -> float:
    """Images per second of ``forward`` on fixed random uint8 batches, in the layout it runs
    in: with ``processes`` > 0 and a forward that runs in the loader workers, that many
    single-threaded workers each running ``batches`` batches (the clock starts at each one's
    first result); else this process, ``batches`` batches after one untimed."""
    pixels = probe_pixels(batch_size, resolution)
    if forward.in_workers and processes > 0:
        from torch.utils.data import DataLoader

        loader = iter(
            DataLoader(
                _ForwardPasses(forward, pixels, (batches + 1) * processes),
                batch_size=None,
                num_workers=processes,
                prefetch_factor=2,
            )
        )
        for _ in range(processes):
            next(loader)
        started, timed = time.perf_counter(), 0
        for _ in loader:
            timed += 1
        return timed * batch_size / (time.perf_counter() - started)
    forward(pixels)
    started = time.perf_counter()
    for _ in forward.run_many((None, pixels) for _ in range(batches)):
        pass
    return batches * batch_size / (time.perf_counter() - started)


def machine_key() -> dict:
    """What a runtime's speed on this machine depends on besides the model: the CPU model, its
    instruction set, the cores this process may use and every runtime's version."""
    return {
        "cpu": cpu_model(),
        "instruction_set": instruction_set(),
        "cores": usable_cores(),
        "versions": {name: runtime.version() for name, runtime in RUNTIMES.items()},
    }


def choice_key(probe: Probe) -> dict:
    """The key of ``auto``'s measurement: the machine, the module's tensors, its resolution,
    output and precision."""
    return {
        **machine_key(),
        "state": state_digest(probe.module),
        "resolution": probe.preprocessing["resolution"],
        "pooled": probe.pooled,
        "precision": probe.precision,
    }


def choose_fastest(candidates: list[str], measure: Callable[[str], float], choice_file: Path | None, key: dict) -> str:
    """The candidate with the most images per second by ``measure(name)``, read from
    ``choice_file`` where it holds a measurement under ``key`` (a candidate that fails to run
    is left out, with a warning); the measurement is written there."""
    digest = key_digest(key)
    recorded = _read_choices(choice_file)
    entry = recorded.get(digest)
    if isinstance(entry, dict) and entry.get("key") == key and entry.get("chosen") in candidates:
        return entry["chosen"]
    rates: dict[str, float] = {}
    for name in candidates:
        try:
            rates[name] = round(measure(name), 2)
        except Exception as err:  # noqa: BLE001 - a runtime that cannot run this model is not chosen
            log.warning(
                "--runtime auto: %s could not run this model (%s: %s); not chosen",
                name,
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
            )
    if not rates:
        raise OptionError(f"--runtime auto: none of {', '.join(candidates)} could run this model")
    chosen = max(rates, key=rates.__getitem__)
    log.info("--runtime auto: %s (images/s: %s)", chosen, ", ".join(f"{k} {v}" for k, v in rates.items()))
    if choice_file is not None:
        recorded[digest] = {"key": key, "images_per_second": rates, "chosen": chosen}
        _write_choices(choice_file, recorded)
    return chosen


def _read_choices(choice_file: Path | None) -> dict:
    if choice_file is None or not choice_file.is_file():
        return {}
    try:
        recorded = json.loads(choice_file.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable (%s); measuring again", choice_file, type(err).__name__)
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _write_choices(choice_file: Path, recorded: dict) -> None:
    choice_file.parent.mkdir(parents=True, exist_ok=True)
    partial = choice_file.with_name(f"{choice_file.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(recorded, indent=1, sort_keys=True))
    partial.replace(choice_file)


def resolve_runtime(name: str, device: torch.device, probe: Probe | None = None, cache_dir: Path | None = None) -> str:
    """The runtime that runs ``probe``: ``name`` itself where it can run here (else a one-line
    error); for ``auto`` the fastest measured of those that can (the only one, without a
    measurement, when one can; torch where there is nothing to time)."""
    if name != "auto":
        check_runtime(name, device, probe.precision if probe else "fp32")
        return name
    precision = probe.precision if probe else "fp32"
    candidates = available_runtimes(device, precision)
    if not candidates:
        raise OptionError(f"--runtime auto: no runtime here runs precision {precision}")
    if len(candidates) == 1 or probe is None:
        return candidates[0]
    return choose_fastest(
        candidates,
        lambda runtime: measure_runtime(runtime, probe, device, cache_dir),
        Path(cache_dir) / CHOICE_FILE if cache_dir is not None else None,
        choice_key(probe),
    )


def measure_runtime(name: str, probe: Probe, device: torch.device, model_cache: Path | None) -> float:
    """Images per second of ``probe`` in runtime ``name``, over a few batches, in the layout
    extraction runs it in (on a CPU: one single-threaded process per core)."""
    processes = usable_cores() if device.type == "cpu" else 0
    return time_forward(
        build_forward(name, probe, device, model_cache), probe.preprocessing["resolution"], processes=processes
    )
