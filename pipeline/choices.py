"""What the command line needs before any work starts: each option's choices and defaults.

Nothing here imports torch, timm or the data stack, so building a script's parser (and
``--help``) takes a fraction of a second; the modules that act on a choice import its names
from here, so the parser and the code never list different values.
"""

from __future__ import annotations

import os
from pathlib import Path

# The branches a run trains, fuses or names in --branches and --fusion-weights.
BRANCHES = ("image", "decoder", "caption", "stacker")
# The dataset ``make demo-data`` generates: every script's default --data.
DEMO_DATA = Path("data/demo")
# The image branch's backbone unless --backbone says otherwise (docs/recipe.md).
DEFAULT_BACKBONE = "tf_efficientnet_lite2"
# --augment: the fine-tuning augmentations of ``pipeline.data.augment``.
AUGMENTS = ("trivial", "light", "none")
# --runtime: who runs the frozen forward passes, by name: the class in pipeline/engine/ that
# implements ``pipeline.engine.frozen.Runtime``. ``pipeline.engine.runtimes`` builds its registry
# from this table, and the parsers read the names without importing torch: adding a runtime is
# its module and a line here.
RUNTIME_CLASSES = {
    "torch": "pipeline.engine.torch_runtime.TorchRuntime",
    "openvino": "pipeline.engine.openvino_runtime.OpenVinoRuntime",
    "onnxruntime": "pipeline.engine.onnx_runtime.OnnxRuntime",
}
RUNTIMES = ("auto", *RUNTIME_CLASSES)
# --precision and --compile (``pipeline.engine.runtime``).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_CHOICES = ("auto", "on", "off")
# --loss of the image head and --rnn of the caption model: the keys of
# ``pipeline.models.heads.LOSSES`` and ``pipeline.models.caption.RNN_TYPES``.
LOSS_NAMES = ("bce", "asl")
RNN_NAMES = ("lstm", "gru")
# --text-encoder of the caption branch besides its own words (WORDS): the keys of
# ``pipeline.text_features.TEXT_ENCODERS``.
TEXT_ENCODER_NAMES = ("minilm",)
WORDS = "words"


def usable_cores() -> int:
    """The cores this process may run on: the default count of loader workers, and of
    single-threaded extraction processes on a CPU."""
    return len(os.sched_getaffinity(0))
