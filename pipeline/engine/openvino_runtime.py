"""Who runs the frozen forward passes: torch, or OpenVINO compiled for this CPU.

Every frozen forward pass (the feature cache, the stage maps, inference, ``--image``)
runs through the runtime ``--runtime`` names:

- ``torch``: PyTorch eager mode, batch norm and the input normalisation folded
  (:func:`pipeline.models.backbones.fuse_for_inference`), one single-threaded process per core;
- ``openvino``: the same graph converted by ``openvino.convert_model`` and compiled for this
  CPU (it folds batch norm itself and picks kernels for the instruction set it finds),
  run in the main process with one stream per core while loader workers decode;
- ``auto``: OpenVINO on a CPU where it is installed, else torch; torch on a GPU.

docs/speed.md, "CPU runtimes", has the measurements behind ``auto``.

A converted model is kept on disk under a key (the module's own tensors, the
preprocessing, pooled or not, precision, OpenVINO version) and compiled once per process.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.io import OptionError
from pipeline.choices import RUNTIMES
from pipeline.models.backbones import state_digest
from pipeline.models.image_model import RawPixelGraph



def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None where it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def resolve_runtime(name: str, device: torch.device) -> str:
    """``torch`` or ``openvino``: ``auto`` is OpenVINO on a CPU where it is installed, else
    torch; asking for OpenVINO on a GPU or without the package is an error."""
    if name not in RUNTIMES:
        raise OptionError(f"--runtime {name!r}: valid values are {', '.join(RUNTIMES)}")
    if name == "torch":
        return "torch"
    if device.type != "cpu":
        if name == "openvino":
            raise OptionError(f"--runtime openvino runs on a CPU; this run's device is {device.type} "
                             "(use --runtime torch or auto)")
        return "torch"
    if openvino_version() is None:
        if name == "openvino":
            raise ImportError("--runtime openvino: the openvino package is not installed "
                              "(pip install -r requirements.txt), or use --runtime torch")
        return "torch"
    return "openvino"


def cpu_has_bf16(core: Any) -> bool:
    """True where OpenVINO computes bf16 in hardware on this CPU."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


# One compiled model per key and process: every chunk of a run uses the first one.
_COMPILED: dict[str, OpenVinoForward] = {}
_COMPILED_LOCK = threading.Lock()


class OpenVinoForward:
    """A frozen module compiled by OpenVINO: uint8 pixel batches in, float32 outputs out.

    Takes the batches channels_last, as the loader workers make them (the transpose is
    compiled into the model's input), and runs one inference stream per core, so a core that
    a decoding worker borrows holds up only its own stream.
    """

    def __init__(self, converted: Any, compiled: Any, streams: int) -> None:
        self.converted = converted  # the model as converted: uint8 NCHW input, any batch size
        self.compiled, self.streams = compiled, streams

    @classmethod
    def cached(cls, module: nn.Module, preprocessing: dict, pooled: bool, precision: str,
               cache_dir: Path | None, cores: int) -> OpenVinoForward:
        """``module`` compiled: from this process's memory, else converted (or read from
        ``cache_dir``, where conversions are kept) and compiled."""
        # Keyed by the tensors themselves: a backbone's front and the whole backbone differ in
        # them, and two random initialisations share a weights name but not their tensors.
        key = {"state": state_digest(module), "preprocessing": preprocessing, "pooled": pooled,
               "precision": precision, "openvino": openvino_version()}
        digest = _digest(key)
        with _COMPILED_LOCK:
            if digest not in _COMPILED:
                _COMPILED[digest] = cls._compile(module, preprocessing, pooled, precision, digest, cache_dir, cores)
            return _COMPILED[digest]

    @classmethod
    def _compile(cls, module: nn.Module, preprocessing: dict, pooled: bool, precision: str, digest: str,
                 cache_dir: Path | None, cores: int) -> OpenVinoForward:
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        core = ov.Core()
        model_file = Path(cache_dir) / "openvino" / f"{digest}.xml" if cache_dir is not None else None
        if model_file is not None and model_file.is_file():
            model = core.read_model(model_file)
        else:
            model = convert(module, preprocessing, pooled)
            if model_file is not None:
                save_atomically(model, model_file)
        resolution = preprocessing["resolution"]
        steps = PrePostProcessor(model.clone())
        steps.input().tensor().set_layout(ov.Layout("NHWC")).set_shape([-1, resolution, resolution, 3])
        steps.input().model().set_layout(ov.Layout("NCHW"))
        laid_out = steps.build()
        hint = "bf16" if precision == "bf16" and cpu_has_bf16(core) else "f32"
        compiled = core.compile_model(laid_out, "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "NUM_STREAMS": cores, "INFERENCE_NUM_THREADS": cores,
            "PERFORMANCE_HINT": "THROUGHPUT"})
        return cls(model, compiled, cores)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Outputs (B, ...) float32 of one uint8 batch (B, 3, R, R)."""
        return next(self.run_many([(None, pixels)]))[1]

    def run_many(self, batches: Iterable[tuple[Any, torch.Tensor]]) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """(tag, outputs) of each (tag, uint8 batch (B, 3, R, R)), in order, with a batch
        in flight on every stream: the next is submitted while the last ones run. An empty
        batch is not run: its outputs are None."""
        import openvino as ov

        # Two requests per stream: a stream finds its next batch waiting when one finishes.
        queue = ov.AsyncInferQueue(self.compiled, 2 * self.streams)
        finished: dict[int, torch.Tensor | None] = {}
        queue.set_callback(lambda request, number: finished.__setitem__(
            number, torch.from_numpy(request.get_output_tensor(0).data.copy())))
        waiting: collections.deque[tuple[int, Any]] = collections.deque()
        for number, (tag, pixels) in enumerate(batches):
            waiting.append((number, tag))
            if len(pixels) == 0:
                finished[number] = None
                continue
            # channels_last (B, 3, R, R) is (B, R, R, 3) in memory: the model's NHWC input.
            queue.start_async({0: np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())}, userdata=number)
            while waiting and waiting[0][0] in finished:
                done, done_tag = waiting.popleft()
                yield done_tag, finished.pop(done)
        queue.wait_all()
        while waiting:
            done, done_tag = waiting.popleft()
            yield done_tag, finished.pop(done)


def convert(module: nn.Module, preprocessing: dict, pooled: bool) -> Any:
    """``module`` (eval mode, taking normalised images) as an OpenVINO model of uint8 pixels
    (B, 3, R, R), batch size free: avg+max pooled features (B, 2C) or its maps (B, C, h, w)."""
    import openvino as ov

    resolution = preprocessing["resolution"]
    graph = RawPixelGraph(module, preprocessing, pooled).eval()
    example = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # The converter traces the module; torch's deprecation of tracing is not the user's concern.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return ov.convert_model(graph, example_input=example, input=[(-1, 3, resolution, resolution), ov.Type.u8])


def save_atomically(model: Any, path: Path) -> None:
    """``path`` (.xml, beside it .bin) written under temporary names, then renamed into place."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.xml")
    ov.save_model(model, partial, compress_to_fp16=False)
    partial.with_suffix(".bin").replace(path.with_suffix(".bin"))
    partial.replace(path)
