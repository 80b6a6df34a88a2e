"""The ONNX Runtime runtime: the frozen graph exported to ONNX once, run by ONNX Runtime's CPU
provider as the other CPU runtimes run: in extraction each loader worker decodes its batches
and runs them in its own single-threaded session, one worker per core; called in the main
process, a session with as many intra-op threads as torch has. With ``int8``, the graph is
quantised statically first (QDQ, per-channel weights with a 7-bit range, calibrated on training
images, the stem and the trained part left in float).

An exported (or quantised) model is kept in ``<model_cache>/onnxruntime/<digest>.onnx``,
verified by the digest written beside it (:class:`pipeline.engine.frozen.ModelFiles`), and
opened once per process.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pipeline.engine.frozen import (
    Calibration,
    FrontAndTail,
    FrozenForward,
    ModelFiles,
    Runtime,
    key_digest,
    threads_here,
)
from pipeline.models.image_model import RawPixelGraph

OPSET = 17
INPUT = "pixels"
# Calibration batches are cut to this many images: enough for the activation ranges, and the
# calibrator keeps every activation of a batch in memory.
CALIBRATION_BATCH = 8


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version, or None where it (or onnx, which the export needs)
    is not installed. Read from the package metadata: importing ONNX Runtime starts its thread
    pools, which a process that only lists the runtimes (and may fork later) should not have."""
    from importlib import metadata

    try:
        metadata.version("onnx")
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return None


class ChannelsLastPixels(nn.Module):
    """``graph`` taking uint8 pixels (B, R, R, 3): the memory order of the channels_last
    batches the loader workers make, so they go in without a copy."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.graph(pixels.permute(0, 3, 1, 2))


def export(module: nn.Module, preprocessing: dict, pooled: bool, path: Path) -> None:
    """``module`` (eval mode, taking normalised images) as an ONNX model of uint8 pixels
    (B, R, R, 3), batch size free, written to ``path``."""
    resolution = preprocessing["resolution"]
    graph = ChannelsLastPixels(RawPixelGraph(module, preprocessing, pooled)).eval()
    example = torch.zeros(1, resolution, resolution, 3, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter traces the module; torch's deprecation notes are not the user's concern.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT],
            output_names=["outputs"],
            dynamic_axes={INPUT: {0: "batch"}, "outputs": {0: "batch"}},
            opset_version=OPSET,
        )


def float_nodes(model: Any, float_prefix: str | None) -> list[str]:
    """Nodes int8 quantisation leaves in float: the first convolution (the stem, whose input
    is the image itself and which loses the most when quantised) and every node whose name
    starts with ``float_prefix`` (the trained part of the backbone, and the pooling)."""
    convolutions = [node.name for node in model.graph.node if node.op_type == "Conv"]
    kept = convolutions[:1]
    if float_prefix is not None:
        kept += [node.name for node in model.graph.node if node.name.startswith(float_prefix)]
    return kept


def quantise(float_path: Path, out: Path, calibration: Calibration, float_prefix: str | None) -> None:
    """``float_path`` quantised statically to int8 into ``out``: QDQ, per-channel int8 weights
    with ``reduce_range`` (7 bits: AVX2 without VNNI saturates its 16-bit accumulations with
    8), uint8 activations with ranges from the calibration images."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (piece for batch in calibration.batches() for piece in torch.split(batch, CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: np.ascontiguousarray(batch.permute(0, 2, 3, 1).numpy())}

    prepared = out.with_name(out.stem + ".prepared.onnx")
    try:
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=float_nodes(model, float_prefix),
        )
    finally:
        prepared.unlink(missing_ok=True)


def export_model(
    module: nn.Module, preprocessing: dict, pooled: bool, precision: str, calibration: Calibration | None, path: Path
) -> None:
    """``module`` as an ONNX model of uint8 pixels (B, R, R, 3) written to ``path``: in float,
    or with ``precision`` int8 quantised statically on ``calibration``'s images (the stem and,
    for a :class:`FrontAndTail`, the tail left in float)."""
    if precision != "int8":
        export(module, preprocessing, pooled, path)
        return
    if calibration is None:
        raise ValueError("int8 needs calibration images")
    with tempfile.TemporaryDirectory(prefix="onnx-float-") as scratch:
        float_path = Path(scratch) / "float.onnx"
        export(module, preprocessing, pooled, float_path)
        # The exported names follow the module path: the tail is graph.module's second child.
        tail = "/graph/module/module.1/" if isinstance(module, FrontAndTail) else None
        quantise(float_path, path, calibration, tail)


# One session per key and process: every chunk of a run uses the first one.
_SESSIONS: dict[str, OnnxForward] = {}
_SESSIONS_LOCK = threading.Lock()


class OnnxForward(FrozenForward):
    """The frozen graph's ONNX model: uint8 batches in, float32 outputs out, run in this
    process's own session, opened on first use: in a loader worker with one thread, elsewhere
    with ``threads`` (a session's thread pool does not survive a fork, and a worker started by
    spawning gets the model's bytes pickled)."""

    in_workers: ClassVar[bool] = True

    def __init__(self, model: bytes, threads: int) -> None:
        self.model, self.threads = model, threads
        self._sessions: dict[int, Any] = {}  # process id -> its session
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"model": self.model, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.model, self.threads = state["model"], state["threads"]
        self._sessions, self._lock = {}, threading.Lock()

    @property
    def session(self) -> Any:
        """This process's session."""
        with self._lock:
            if os.getpid() not in self._sessions:
                self._sessions[os.getpid()] = open_session(self.model, threads_here(self.threads))
            return self._sessions[os.getpid()]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # channels_last (B, 3, R, R) is (B, R, R, 3) in memory: the model's input, no copy.
        nhwc = np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())
        return torch.from_numpy(self.session.run(None, {INPUT: nhwc})[0])


def open_session(model: bytes | Path, threads: int) -> Any:
    """An ONNX Runtime CPU session of ``model`` (its bytes or its file) on ``threads`` threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")

    def version(self) -> str | None:
        return onnxruntime_version()

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
    ) -> OnnxForward:
        digest = key_digest(self.model_key(module, preprocessing, pooled, precision, calibration))
        opened = f"{digest}-{torch.get_num_threads()}"  # the main process's session per thread count
        with _SESSIONS_LOCK:
            if opened not in _SESSIONS:
                model = self._model(module, preprocessing, pooled, precision, digest, model_cache, calibration)
                _SESSIONS[opened] = OnnxForward(model, torch.get_num_threads())
            return _SESSIONS[opened]

    def _model(
        self,
        module: nn.Module,
        preprocessing: dict,
        pooled: bool,
        precision: str,
        digest: str,
        model_cache: Path | None,
        calibration: Calibration | None,
    ) -> bytes:
        """The exported (or quantised) model's bytes, from ``model_cache`` where a verified one
        is kept (a session opens it there: a file ONNX Runtime cannot read is built again)."""

        def build(path: Path) -> None:
            export_model(module, preprocessing, pooled, precision, calibration, path)

        if model_cache is None:
            with tempfile.TemporaryDirectory(prefix="onnx-") as scratch:
                path = Path(scratch) / "model.onnx"
                build(path)
                return path.read_bytes()
        files = ModelFiles(Path(model_cache) / "onnxruntime" / f"{digest}.onnx")
        # Built straight into the cache's temporary name (nothing in memory), then read.
        files.load_or_build(lambda path: open_session(path, 1), lambda: None, lambda _, path: build(path))
        return files.main.read_bytes()
