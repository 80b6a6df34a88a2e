"""Where the time goes: seconds and images per stage of a run (decode, frozen front, trained
top stage, heads, caption, fusion), with the CPU and its instruction set, for the scripts'
JSON summaries (key ``timing``) and the bench.

Stages that overlap (decoding in loader workers while the main process runs the forward) are
each timed where they run: ``decode`` sums the workers' own seconds (core-seconds), the others
are the seconds of the process that runs them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from pipeline.choices import usable_cores
from pipeline.engine.runtime import cpu_model, instruction_set

_LOCK = threading.Lock()
_STAGES: dict[str, list[float]] = {}  # stage -> [seconds, images]


def reset() -> None:
    """Start counting afresh (at the start of a script's run)."""
    with _LOCK:
        _STAGES.clear()


def add(stage: str, seconds: float, images: int) -> None:
    """Count ``seconds`` spent on ``images`` images in ``stage``."""
    with _LOCK:
        total = _STAGES.setdefault(stage, [0.0, 0])
        total[0] += seconds
        total[1] += images


@contextlib.contextmanager
def timed(stage: str, images: int) -> Iterator[None]:
    """Count the block's wall seconds on ``images`` images in ``stage``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        add(stage, time.perf_counter() - started, images)


def summary() -> dict:
    """``{"cpu", "instruction_set", "cores", "stages": {stage: {"seconds", "images", "img_s"}}}``."""
    with _LOCK:
        stages = {
            stage: {
                "seconds": round(seconds, 3),
                "images": int(images),
                "img_s": round(images / seconds, 2) if seconds > 0 else None,
            }
            for stage, (seconds, images) in _STAGES.items()
        }
    return {"cpu": cpu_model(), "instruction_set": instruction_set(), "cores": usable_cores(), "stages": stages}
