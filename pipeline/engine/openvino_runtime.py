"""The OpenVINO runtime: the frozen graph converted by ``openvino.convert_model`` and compiled
for this CPU (it folds batch norm itself and picks kernels for the instruction set it finds).
Extraction runs it as the torch runtime runs on a CPU: each loader worker decodes its batches
and runs them on its own single-threaded copy, one worker per core; called in the main process
it runs one stream per core.

A converted model is kept in ``<model_cache>/openvino/<digest>.xml`` (+ ``.bin``), verified by
the digest written beside it (:class:`pipeline.engine.frozen.ModelFiles`), and compiled once
per process.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pipeline.engine.frozen import Calibration, FrozenForward, ModelFiles, Runtime, key_digest, threads_here
from pipeline.engine.onnx_runtime import export_model, onnxruntime_version
from pipeline.models.image_model import RawPixelGraph


def import_openvino() -> Any:
    """The ``openvino`` module, imported with OpenVINO's usage telemetry declined for this
    process (ImportError where it is not installed).

    Unless a user has run ``opt_in_out --opt_out``, OpenVINO posts usage events to Google
    Analytics (one on import, several per conversion), each from a process forked off a thread
    of this one (``openvino_telemetry``). This tool runs offline, and a fork from a threaded
    process (torch's and OpenVINO's thread pools, a pytest-xdist worker) can hang. The
    telemetry is one object per process, which the import finds already made, and declined,
    under the tool name it asks for.
    """
    if "openvino" not in sys.modules:
        try:
            import openvino_telemetry
        except ImportError:  # OpenVINO without it sends nothing
            pass
        else:
            openvino_telemetry.Telemetry(
                app_name="OpenVINO", app_version="", tid="", backend="ga4", enable_opt_in_dialog=False
            ).consent = False
    import openvino

    return openvino


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None where it is not installed."""
    try:
        return import_openvino().get_version()
    except ImportError:
        return None


def convert_model(*args: Any, **kwargs: Any) -> Any:
    """``openvino.convert_model`` with its usage events declined (:func:`import_openvino`): the
    converter makes the telemetry anew under its own tool name, declined here before it runs."""
    ov = import_openvino()
    from openvino.tools.ovc.telemetry_utils import init_ovc_telemetry

    init_ovc_telemetry().consent = False
    return ov.convert_model(*args, **kwargs)


def cpu_has_bf16(core: Any) -> bool:
    """True where OpenVINO computes bf16 in hardware on this CPU."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# One model per key and process: every chunk of a run uses the first one.
_COMPILED: dict[str, OpenVinoForward] = {}
_COMPILED_LOCK = threading.Lock()


class OpenVinoForward(FrozenForward):
    """A frozen module compiled by OpenVINO: uint8 pixel batches in, float32 outputs out.

    Takes the batches channels_last, as the loader workers make them (the transpose is
    compiled into the model's input). Each process compiles its own copy when it first runs
    one: a loader worker a single stream on one thread, any other process one stream per core.
    A single stream is left unpinned: OpenVINO pins it to the first core, the same core in
    every process that runs one. A worker that decodes
    and runs its own batches keeps its core busy without a decoding process preempting its
    stream (docs/speed.md has the measurement).
    """

    in_workers: ClassVar[bool] = True

    def __init__(self, laid_out: Any, hint: str, streams: int) -> None:
        self.laid_out = laid_out  # the model as compiled: uint8 NHWC input, any batch size
        self.hint, self.streams = hint, streams
        self._compiled: dict[int, Any] = {}  # process id -> its compiled copy
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """What a worker started by spawning (not forking) gets: the model serialised, no
        compiled copy (each process compiles its own)."""
        ov = import_openvino()
        with tempfile.TemporaryDirectory(prefix="openvino-pickle-") as scratch:
            xml = Path(scratch) / "model.xml"
            ov.save_model(self.laid_out, xml, compress_to_fp16=False)
            return {
                "xml": xml.read_bytes(),
                "bin": xml.with_suffix(".bin").read_bytes(),
                "hint": self.hint,
                "streams": self.streams,
            }

    def __setstate__(self, state: dict) -> None:
        ov = import_openvino()
        weights = ov.Tensor(np.frombuffer(state["bin"], dtype=np.uint8).copy())
        self.laid_out = ov.Core().read_model(state["xml"].decode(), weights)
        self.hint, self.streams = state["hint"], state["streams"]
        self._compiled, self._lock = {}, threading.Lock()

    def compiled(self) -> tuple[Any, int]:
        """(this process's compiled copy, its streams), compiled on first use."""
        streams = threads_here(self.streams)
        with self._lock:
            if os.getpid() not in self._compiled:
                settings = {
                    "INFERENCE_PRECISION_HINT": self.hint,
                    "NUM_STREAMS": streams,
                    "INFERENCE_NUM_THREADS": streams,
                    "PERFORMANCE_HINT": "THROUGHPUT",
                    **({"ENABLE_CPU_PINNING": False} if streams == 1 else {}),
                }
                core = import_openvino().Core()
                self._compiled[os.getpid()] = core.compile_model(self.laid_out, "CPU", settings)
            return self._compiled[os.getpid()], streams

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Outputs (B, ...) float32 of one uint8 batch (B, 3, R, R), B >= 1."""
        ((_, outputs),) = self.run_many([(None, pixels)])
        if outputs is None:  # run_many runs no empty batch
            raise ValueError("OpenVINO forward: an empty batch (0 images) has no outputs to compute")
        return outputs

    def run_many(self, batches: Iterable[tuple[Any, torch.Tensor]]) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """(tag, outputs) of each (tag, uint8 batch (B, 3, R, R)), in order, with a batch
        in flight on every stream: the next is submitted while the last ones run. An empty
        batch is not run: its outputs are None."""
        # Two requests per stream: a stream finds its next batch waiting when one finishes. The
        # outputs are read here, in order, with no callback: a Python callback makes OpenVINO's
        # stream threads take the GIL, and a compiled model freed later joins those threads
        # while holding it, which deadlocked (it hung the test suite in a fixture's teardown).
        compiled, streams = self.compiled()
        free = [compiled.create_infer_request() for _ in range(2 * streams)]
        in_flight: collections.deque[tuple[Any, Any]] = collections.deque()  # (request or None, tag)

        def oldest() -> tuple[Any, torch.Tensor | None]:
            request, tag = in_flight.popleft()
            if request is None:
                return tag, None
            request.wait()
            free.append(request)
            return tag, torch.from_numpy(request.get_output_tensor(0).data.copy())

        try:
            for tag, pixels in batches:
                if len(pixels) == 0:
                    in_flight.append((None, tag))
                    continue
                while not free:
                    yield oldest()
                request = free.pop()
                # channels_last (B, 3, R, R) is (B, R, R, 3) in memory: the model's NHWC input.
                request.start_async({0: np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())})
                in_flight.append((request, tag))
            while in_flight:
                yield oldest()
        finally:  # the caller stopped early: no request is left running
            for request, _ in in_flight:
                if request is not None:
                    request.wait()


class OpenVinoRuntime(Runtime):
    name = "openvino"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "int8")

    def version(self) -> str | None:
        return openvino_version()

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
    ) -> OpenVinoForward:
        """``module`` compiled: from this process's memory, else converted (or read from
        ``model_cache``, where conversions are kept) and compiled."""
        if precision == "int8" and onnxruntime_version() is None:
            raise ImportError("openvino int8 reads the model ONNX Runtime's quantisation makes: install onnxruntime")
        digest = key_digest(self.model_key(module, preprocessing, pooled, precision, calibration))
        built = f"{digest}-{cores}"  # compiled for a number of streams
        with _COMPILED_LOCK:
            if built not in _COMPILED:
                _COMPILED[built] = _build(
                    module, preprocessing, pooled, precision, digest, model_cache, cores, calibration
                )
            return _COMPILED[built]


def model_files(model_cache: Path, digest: str) -> ModelFiles:
    """Where the converted model of ``digest`` is kept: ``.xml`` and ``.bin`` and their digest."""
    return ModelFiles(Path(model_cache) / "openvino" / f"{digest}.xml", (".bin",))


def _build(
    module: nn.Module,
    preprocessing: dict,
    pooled: bool,
    precision: str,
    digest: str,
    model_cache: Path | None,
    cores: int,
    calibration: Calibration | None,
) -> OpenVinoForward:
    ov = import_openvino()
    from openvino.preprocess import PrePostProcessor

    core = ov.Core()
    make = (
        (lambda: convert_quantised(module, preprocessing, pooled, calibration))
        if precision == "int8"
        else (lambda: convert(module, preprocessing, pooled))
    )
    model = (
        make()
        if model_cache is None
        else model_files(model_cache, digest).load_or_build(core.read_model, make, save_model)
    )
    if precision == "int8":
        laid_out = model  # quantised from ONNX Runtime's export, which takes NHWC pixels already
    else:
        resolution = preprocessing["resolution"]
        steps = PrePostProcessor(model.clone())
        steps.input().tensor().set_layout(ov.Layout("NHWC")).set_shape([-1, resolution, resolution, 3])
        steps.input().model().set_layout(ov.Layout("NCHW"))
        laid_out = steps.build()
    hint = "bf16" if precision == "bf16" and cpu_has_bf16(core) else "f32"
    return OpenVinoForward(laid_out, hint, cores)


def convert(module: nn.Module, preprocessing: dict, pooled: bool) -> Any:
    """``module`` (eval mode, taking normalised images) as an OpenVINO model of uint8 pixels
    (B, 3, R, R), batch size free: avg+max pooled features (B, 2C) or its maps (B, C, h, w)."""
    ov = import_openvino()

    resolution = preprocessing["resolution"]
    graph = RawPixelGraph(module, preprocessing, pooled).eval()
    example = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # The converter traces the module; torch's deprecation of tracing is not the user's concern.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return convert_model(graph, example_input=example, input=[(-1, 3, resolution, resolution), ov.Type.u8])


def convert_quantised(module: nn.Module, preprocessing: dict, pooled: bool, calibration: Calibration | None) -> Any:
    """``module`` quantised to int8 as the ONNX Runtime runtime quantises it (QDQ, per-channel
    7-bit weights, the stem and a trained tail in float), read by OpenVINO, which runs the
    quantise-dequantise pairs as int8 kernels. Input: uint8 pixels (B, R, R, 3)."""
    with tempfile.TemporaryDirectory(prefix="openvino-int8-") as scratch:
        path = Path(scratch) / "int8.onnx"
        export_model(module, preprocessing, pooled, "int8", calibration, path)
        return convert_model(str(path))


def save_model(model: Any, path: Path) -> None:
    """``model`` written as ``path`` (.xml) and the .bin beside it, in float32."""
    ov = import_openvino()

    ov.save_model(model, path, compress_to_fp16=False)
