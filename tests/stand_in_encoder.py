"""Run a script of the repository with every registered text encoder read from the folder in
$STAND_IN_TEXT_ENCODER: ``python tests/stand_in_encoder.py SCRIPT [ARGS...]``.

The tests' child processes (torchrun) read the same tiny stand-in encoder as the test itself
(``stand_in_text_encoders`` in conftest.py), not the real 22M-parameter MiniLM.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import text_features  # noqa: E402

FOLDER = Path(os.environ["STAND_IN_TEXT_ENCODER"])
for name in text_features.TEXT_ENCODERS:
    text_features.TEXT_ENCODERS[name] = lambda: FOLDER
text_features.cpu_threads = lambda threads: contextlib.nullcontext()  # as conftest.stand_in_threads
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
