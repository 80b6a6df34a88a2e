"""Throughput benchmark: ``python -m pipeline.tools.bench`` (measures; not a test).

Measures in one run, on real JPEGs of ``--data`` (the first ``--num-images`` rows of its
train.csv stand in for a test set), with the trained checkpoints in ``--weights``:

- ``forward_img_s_by_runtime``: the backbone alone on a batch already in memory, in every
  runtime installed here (torch eager with batch norm and input normalisation folded,
  OpenVINO, ONNX Runtime), each in its best layout (``backbone_forward_layouts_img_s``);
  ``backbone_forward_img_s`` is the fastest: this hardware's limit;
- ``pipeline_img_s``: ``inference.py``'s prediction (``predict_in_chunks``) per image in the
  runtime inference chooses (``runtime``): JPEG decode and resize in DataLoader workers,
  backbone, every head, caption tokenisation and the caption ensemble, fusion and the
  submission file, with an empty feature cache; ``pipeline_torch_img_s``: the same in torch;
- ``bound_img_s``: what the hardware allows the whole path: on CPU the cores over the
  per-image cost of one core (JPEG decode and resize and the fastest runtime's forward, once
  per view, then the caption branch), since decoding runs on the same cores as the forward; on GPU, the slower
  of the GPU forward and the cores decoding; ``pipeline_over_bound`` is the pipeline's share;
- ``at_<R>px``: the forwards, both pipelines and the bound again at ``--also-resolution``
  (speed only: the heads take pooled features of any resolution);
- ``forward_int8_img_s``: OpenVINO's forward after NNCF post-training int8 quantisation,
  calibrated on training images, where NNCF is installed (speed only);
- ``effnet_pytorch_pipeline_img_s``: the same path with efficientnet-pytorch's
  ``efficientnet-b0`` as the backbone (random weights: speed does not depend on them);
- ``train_finetune_img_s``: end-to-end fine-tuning steps (augmentation on the device, forward, backward,
  AdamW, EMA) on real images;
- ``train_cached_head_img_s`` (and ``train_cached_decoder_img_s``): training the image head
  (the label decoder) on cached features;
- a per-image breakdown (decode, backbone, heads, caption) to show where the time goes;
- ``peak_rss_mb``, device, threads, workers, batch size and resolution.

Writes ``--output``/bench.json and prints a table.
"""

from __future__ import annotations

import dataclasses
import platform
import resource
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.choices import usable_cores
from pipeline.config import CommonConfig, build_parser, config_from_args, option, output_option, workers_option
from pipeline.data.augment import BatchAugment
from pipeline.data.dataset import CAPTION_COLUMN, ID_COLUMN, DatasetPaths, LabelSet, read_csv
from pipeline.data.images import ImageDataset
from pipeline.data.transforms import build_transform
from pipeline.engine.distributed import DistContext
from pipeline.engine.loop import ModelEma, TrainStep, epoch_loader, train_one_epoch
from pipeline.engine.openvino_runtime import OpenVinoForward, openvino_version, save_atomically
from pipeline.engine.runtime import (
    autocast_context,
    compute_dtype,
    configure_backends,
    grad_scaler,
    resolve_device,
    reuse_freed_memory,
    seed_everything,
    training_precision,
)
from pipeline.features import CPU_BATCH
from pipeline.fusion import FusionSettings, load_fusion
from pipeline.inference import BranchPredictor, InferenceConfig, load_branch_checkpoints, predict_in_chunks
from pipeline.io import write_json
from pipeline.models.backbones import create_backbone, fuse_for_inference
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.models.heads import ImageHead
from pipeline.models.image_model import RawPixelGraph
from pipeline.train.image_config import ImageTrainConfig, resolve_recipe
from pipeline.train.image_fit import build_image_model, build_optimizer, joint_loss
from pipeline.train.image_inputs import image_inputs

COMPARED_BACKBONE = "efficientnet-b0"


@dataclass
class BenchConfig(CommonConfig):
    """Settings of ``python -m pipeline.tools.bench``."""

    num_images: int = option(1000, "images timed through the inference path (per backbone and repeat)", group="run")
    forward_seconds: float = option(6.0, "how long to time each in-memory backbone forward pass", group="run")
    finetune_batches: int | None = option(None, "fine-tuning steps timed, after 3 untimed ones (default: 4 on "
                                          "CPU, 40 on GPU, where a step takes milliseconds)", group="run")
    finetune_batch_size: int = option(32, "images per fine-tuning step", group="run")
    head_rows: int = option(20000, "cached-feature rows per head-training epoch timed", group="run")
    threads: int = option(0, "torch CPU threads (0: torch's default, one per core)", group="run")
    repeats: int = option(2, "each throughput is measured this many times and the best kept (a "
                          "shared machine's speed varies from run to run)", group="run")
    precision: str | None = option(None, "run the backbone in this precision instead of the one the checkpoint "
                                   "was trained with (speed only: the heads expect the trained one)",
                                   choices=["fp32", "bf16"], group="run")
    compare: bool = option(True, f"also time the inference path with efficientnet-pytorch's {COMPARED_BACKBONE}", group="run")
    also_resolution: int = option(224, "also time the forwards, the pipelines and the bound at this resolution "
                                  "(0: not)", group="run")
    batch_size: int = option(64, "images per batch in the inference path and the forward pass", group="run")
    workers: int = workers_option()
    output: str = output_option()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2)


def _pixel_batch(batch_size: int, resolution: int, precision: str, device: torch.device) -> torch.Tensor:
    """A batch as inference hands it to the backbone: raw pixel values in the compute dtype,
    channels_last."""
    pixels = torch.randint(0, 256, (batch_size, resolution, resolution, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return pixels.permute(0, 3, 1, 2).to(device).to(compute_dtype(precision), memory_format=torch.channels_last)


@torch.inference_mode()
def time_backbone_forward(module: torch.nn.Module, batch_size: int, resolution: int, device: torch.device,
                          seconds: float, precision: str) -> float:
    """Images per second of ``module`` in this process (torch's threads) on one in-memory batch."""
    images = _pixel_batch(batch_size, resolution, precision, device)
    model = module.to(device).to(memory_format=torch.channels_last)
    with autocast_context(device, precision):
        model(images)  # warm-up: first-call allocations and kernel selection
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or count == 0:
            model(images)
            count += batch_size
    if device.type == "cuda":
        torch.cuda.synchronize()
    return _rate(count, time.perf_counter() - started)


class _InMemoryForward(torch.utils.data.Dataset):
    """Item ``k``: one forward pass of a fixed in-memory batch, run in a DataLoader worker."""

    def __init__(self, module: torch.nn.Module, batch: torch.Tensor, batches: int, precision: str) -> None:
        self.module, self.batch, self.batches, self.precision = module, batch, batches, precision

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, k: int) -> torch.Tensor:
        with torch.inference_mode(), autocast_context(torch.device("cpu"), self.precision):
            return self.module(self.batch).mean()


def time_forward_in_processes(module: torch.nn.Module, batch_size: int, resolution: int, processes: int,
                              images: int, precision: str) -> float:
    """Images per second of ``processes`` single-threaded workers each running the forward pass
    on an in-memory batch: the CPU layout feature extraction uses, without any decoding."""
    batch = _pixel_batch(batch_size, resolution, precision, torch.device("cpu"))
    model = module.to(memory_format=torch.channels_last)
    batches = max(2 * processes, images // batch_size)
    loader = DataLoader(_InMemoryForward(model, batch, batches, precision), batch_size=None,
                        num_workers=processes, prefetch_factor=4)
    started = time.perf_counter()
    for _ in loader:
        pass
    return _rate(batches * batch_size, time.perf_counter() - started)


def _time_batches(run: Callable[[], object], batch_size: int, seconds: float) -> float:
    """Images per second of calling ``run`` (one batch) for ``seconds``, after a warm-up call."""
    run()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count == 0:
        run()
        count += batch_size
    return _rate(count, time.perf_counter() - started)


def time_openvino_forward(compiled: OpenVinoForward, batch_size: int, resolution: int, seconds: float) -> float:
    """Images per second of OpenVINO in this process, one stream per core, a batch queued on each."""
    batch = _pixel_batch(batch_size, resolution, "fp32", torch.device("cpu")).to(torch.uint8)
    flight = 2 * compiled.streams
    return _time_batches(lambda: list(compiled.run_many((None, batch) for _ in range(flight))),
                         batch_size * flight, seconds)


class _OpenVinoInWorker(torch.utils.data.Dataset):
    """Item ``k``: one forward pass of a fixed batch by a single-threaded OpenVINO model that each
    DataLoader worker compiles from ``model_file`` at its first item."""

    def __init__(self, model_file: Path, batch: np.ndarray, batches: int) -> None:
        self.model_file, self.batch, self.batches, self.compiled = model_file, batch, batches, None

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, k: int) -> float:
        if self.compiled is None:
            import openvino as ov

            self.compiled = ov.Core().compile_model(str(self.model_file), "CPU", {
                "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"})
        return float(self.compiled([self.batch])[0].mean())


def time_openvino_in_processes(model_file: Path, batch_size: int, resolution: int, processes: int,
                               images: int) -> float:
    """Images per second of ``processes`` workers each running its own single-threaded OpenVINO
    model: the per-core layout torch extraction uses, against OpenVINO's own streams. The
    clock starts at each worker's first result, after its compile."""
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, 3, resolution, resolution), dtype=np.uint8)
    batches = max(4 * processes, images // batch_size)
    loader = iter(DataLoader(_OpenVinoInWorker(model_file, batch, batches), batch_size=None,
                             num_workers=processes, prefetch_factor=2))
    for _ in range(processes):
        next(loader)
    started, timed = time.perf_counter(), 0
    for _ in loader:
        timed += 1
    return _rate(timed * batch_size, time.perf_counter() - started)


def time_onnxruntime_forward(module: torch.nn.Module, preprocessing: dict, batch_size: int, seconds: float,
                             scratch: Path) -> float:
    """Images per second of ONNX Runtime (its own threads, one per core) on the exported graph."""
    import onnxruntime

    resolution = preprocessing["resolution"]
    graph = RawPixelGraph(module, preprocessing, pooled=True).eval()
    path = scratch / f"forward{resolution}.onnx"
    pixels = torch.zeros(1, 3, resolution, resolution, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (pixels,), str(path), dynamo=False, input_names=["pixels"],
                          dynamic_axes={"pixels": {0: "batch"}}, opset_version=17)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, 3, resolution, resolution), dtype=np.uint8)
    return _time_batches(lambda: session.run(None, {"pixels": batch}), batch_size, seconds)


def time_int8_forward(converted, paths, image_ids: list[str], preprocessing: dict, batch_size: int,
                      seconds: float) -> float | None:
    """Images per second of OpenVINO on its ``converted`` model quantised to int8 by NNCF,
    calibrated on ``image_ids``; None where NNCF is not installed."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    dataset = ImageDataset(paths, image_ids, build_transform(preprocessing, normalize=False),
                           preprocessing["resolution"], blank_dtype=torch.uint8)
    calibration = [dataset[i][0][None].numpy() for i in range(len(dataset))]  # (1, 3, R, R) uint8 each
    core = ov.Core()
    quantised = nncf.quantize(converted.clone(), nncf.Dataset(calibration), subset_size=len(calibration))
    compiled = core.compile_model(quantised, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    requests = ov.AsyncInferQueue(compiled, 2 * usable_cores())
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, 3, preprocessing["resolution"],
                                                        preprocessing["resolution"]), dtype=np.uint8)

    def run() -> None:
        for _ in range(len(requests)):
            requests.start_async({0: batch})
        requests.wait_all()

    return _time_batches(run, batch_size * len(requests), seconds)


def forward_limits(backbone, device: torch.device, precision: str, config: BenchConfig, batch: int,
                   processes: int, scratch: Path) -> dict[str, float]:
    """The backbone's in-memory forward throughput in each runtime and layout that could run it
    here (best of ``--repeats``): torch in this process with its threads at the pipeline's batch
    and at ``--batch-size`` and, on CPU, in one single-threaded process per core; on CPU also
    OpenVINO with a stream per core and in a process per core, and ONNX Runtime."""
    module, preprocessing = backbone.module, backbone.preprocessing
    fused = fuse_for_inference(module, preprocessing)
    resolution = preprocessing["resolution"]
    best = lambda measure: max(measure() for _ in range(config.repeats))  # noqa: E731
    limits = {}
    for size in sorted({batch, config.batch_size}):
        limits[f"torch_threads_batch{size}"] = best(
            lambda: time_backbone_forward(fused, size, resolution, device, config.forward_seconds, precision))
    if processes:
        images = int(limits[f"torch_threads_batch{batch}"] * config.forward_seconds)
        limits[f"torch_processes{processes}_batch{batch}"] = best(
            lambda: time_forward_in_processes(fused, batch, resolution, processes, images, precision))
    if device.type != "cpu":
        return limits
    if openvino_version() is not None:
        compiled = OpenVinoForward.cached(module, preprocessing, True, precision, scratch, usable_cores())
        limits[f"openvino_streams{compiled.streams}_batch{batch}"] = best(
            lambda: time_openvino_forward(compiled, batch, resolution, config.forward_seconds))
        if processes:
            model_file = scratch / f"forward{resolution}.xml"
            save_atomically(compiled.converted, model_file)
            images = int(limits[f"openvino_streams{compiled.streams}_batch{batch}"] * config.forward_seconds)
            limits[f"openvino_processes{processes}_batch{batch}"] = best(
                lambda: time_openvino_in_processes(model_file, batch, resolution, processes, images))
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return limits
    limits[f"onnxruntime_threads_batch{batch}"] = best(
        lambda: time_onnxruntime_forward(module, preprocessing, batch, config.forward_seconds, scratch))
    return limits


def by_runtime(limits: dict[str, float]) -> dict[str, float]:
    """The best layout's images per second of each runtime in ``limits``."""
    best: dict[str, float] = {}
    for layout, rate in limits.items():
        runtime = layout.split("_")[0]
        best[runtime] = max(best.get(runtime, 0.0), rate)
    return best


def time_inference_path(predictor: BranchPredictor, frame: pd.DataFrame, settings: FusionSettings,
                        labels: LabelSet, scratch: Path) -> dict:
    """Seconds and images per second of ``inference.py``'s prediction of ``frame``, chunk size
    and all (an empty feature cache in ``scratch``, so every image is decoded and run)."""
    predictor.cache_dir = scratch / "cache"
    scratch.mkdir(parents=True, exist_ok=True)
    chunk_size = InferenceConfig().chunk_size
    started = time.perf_counter()
    predict_in_chunks(predictor, frame, settings, labels, scratch / "submission.csv", chunk_size, "bench features")
    seconds = time.perf_counter() - started
    return {"img_s": _rate(len(frame), seconds), "seconds": round(seconds, 2), "chunk_size": chunk_size}


def time_decode(paths, image_ids: list[str], preprocessing: dict) -> float:
    """Milliseconds per image to open, decode and resize a JPEG to the uint8 tensor the
    extraction workers hand over, in one single-threaded process."""
    dataset = ImageDataset(paths, image_ids, build_transform(preprocessing, normalize=False),
                           preprocessing["resolution"], blank_dtype=torch.uint8)
    started = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return round(1000 * (time.perf_counter() - started) / max(len(dataset), 1), 3)


def time_caption(predictor: BranchPredictor, frame: pd.DataFrame) -> float | None:
    """Milliseconds per caption of the caption branch alone (tokenise, encode, ensemble)."""
    if "caption" not in predictor.checkpoints:
        return None
    from pipeline.branches.caption import predict_caption_probs

    captions = frame[CAPTION_COLUMN].fillna("").tolist()
    started = time.perf_counter()
    predict_caption_probs(predictor.checkpoints["caption"], captions, predictor.device)
    return round(1000 * (time.perf_counter() - started) / len(captions), 3)


def physical_bound(forward_img_s: float, decode_ms: float, caption_ms: float | None, cores: int,
                   device: torch.device, views: int = 1) -> float:
    """Images per second the whole inference path could reach on this hardware.

    On CPU every image costs one core, per view (plain, and mirrored with test-time flips),
    ``decode_ms`` + its share of the forward (``cores / forward_img_s``, the forward limit
    using every core), then ``caption_ms``, and the cores run nothing else. On GPU the
    forward runs on the device while the cores decode and run the caption branch, so the
    slower of the two bounds.
    """
    host_ms = views * decode_ms + (caption_ms or 0.0)
    if device.type == "cuda":
        return round(min(forward_img_s / views, 1000.0 * cores / host_ms), 2)
    return round(1000.0 * cores / (host_ms + views * 1000.0 * cores / forward_img_s), 2)


def time_finetune(backbone_name: str, resolution: int, paths, image_ids: list[str], num_labels: int,
                  device: torch.device, batch_size: int, batches: int, workers: int, precision: str) -> float:
    """Images per second of end-to-end fine-tuning steps, as ``--mode finetune`` runs them
    (decoding in loader workers, augmentation on the device, forward, backward, AdamW, EMA; random targets: speed
    only). A few untimed steps first let the loader fill and cuDNN choose its kernels."""
    warmup_batches = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone(backbone_name, resolution=resolution)
    config = ImageTrainConfig(batch_size=batch_size, workers=workers)
    needed = batch_size * (batches + warmup_batches)
    ids = [image_ids[i % len(image_ids)] for i in range(needed)]
    targets = (np.random.default_rng(0).random((needed, num_labels)) < 0.2).astype(np.float32)
    targets[:, 0] = 1.0  # every image has a label, as in real data
    recipe = resolve_recipe(config, "finetune")
    inputs = image_inputs(backbone, paths, ids, ids[:batch_size], targets, targets[:batch_size], device, config.workers,
                          BatchAugment(recipe.augment, device, recipe.scale_jitter))
    model = build_image_model(config, inputs.trunk, backbone.pooled_dim, num_labels, device)
    step = TrainStep(model, joint_loss(config, lambda raw: inputs.prepare(inputs.augment(raw)),
                                       LabelOrder.from_train(targets), device))
    optimizer, _ = build_optimizer(config, model, device, recipe)
    ema, scaler = ModelEma(model), grad_scaler(device, precision)
    loader = DataLoader(inputs.train, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    batch_iter = iter(loader)
    autocast = lambda: autocast_context(device, precision)  # noqa: E731 - a fresh context per step
    warm = [next(batch_iter) for _ in range(warmup_batches)]
    train_one_epoch(step, warm, optimizer, device, 0, autocast=autocast, ema=ema, scaler=scaler, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    train_one_epoch(step, batch_iter, optimizer, device, 1, autocast=autocast, ema=ema, scaler=scaler, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return _rate(batch_size * batches, time.perf_counter() - started)


def time_head_training(make_step: Callable[[int, int], torch.nn.Module], feature_dim: int, num_labels: int,
                       rows: int, device: torch.device) -> float:
    """Rows per second of one epoch of head training on in-memory features (batches of 256)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(rows, feature_dim, generator=generator)
    targets = (torch.rand(rows, num_labels, generator=generator) < 0.2).float()
    targets[:, 0] = 1.0
    step = make_step(feature_dim, num_labels).to(device)
    optimizer = torch.optim.AdamW(step.parameters(), lr=1e-3)
    loader = epoch_loader(TensorDataset(features, targets), 256, DistContext(), shuffle=True, seed=0)
    train_one_epoch(step, [next(iter(loader))], optimizer, device, 0, progress=False)  # warm-up
    started = time.perf_counter()
    train_one_epoch(step, loader, optimizer, device, 1, progress=False)
    return _rate(rows, time.perf_counter() - started)


def _head_step(feature_dim: int, num_labels: int) -> torch.nn.Module:
    head = ImageHead(feature_dim, num_labels, 512, 0.5)
    return TrainStep(head, lambda m, b: torch.nn.functional.binary_cross_entropy_with_logits(m(b[0]), b[1]))


def _decoder_step(feature_dim: int, num_labels: int) -> torch.nn.Module:
    rank = LabelOrder.from_train(np.eye(num_labels, dtype=np.float32), "frequent").rank
    return TrainStep(LabelDecoder(feature_dim, num_labels, 128, 256, 0.3), lambda m, b: m.loss(b[0], b[1], rank))


def time_runtimes(predictor: BranchPredictor, frame: pd.DataFrame, settings: FusionSettings, labels: LabelSet,
                  config: BenchConfig, batch: int, processes: int, caption_ms: float | None, scratch: Path) -> dict:
    """At the predictor's backbone resolution: every runtime's forward, the pipeline in the
    predictor's runtime and in torch, decoding, and the bound from the fastest forward."""
    backbone, device = predictor.backbone, predictor.device
    resolution = backbone.preprocessing["resolution"]
    print(f"timing {backbone.name} forwards at {resolution} px ({predictor.precision}) on in-memory batches ...",
          flush=True)
    limits = forward_limits(backbone, device, predictor.precision, config, batch, processes, scratch)
    out: dict = {"resolution": resolution, "backbone_forward_layouts_img_s": limits,
                 "forward_img_s_by_runtime": by_runtime(limits), "backbone_forward_img_s": max(limits.values())}
    chosen = predictor.runtime
    for runtime in dict.fromkeys([chosen, "torch"]):
        predictor.runtime = runtime
        print(f"timing the inference path in {runtime} at {resolution} px on {len(frame)} images ...", flush=True)
        path = max((time_inference_path(predictor, frame, settings, labels, scratch / f"{runtime}{i}")
                    for i in range(config.repeats)), key=lambda run: run["img_s"])
        prefix = "pipeline" if runtime == chosen else "pipeline_torch"
        out[f"{prefix}_img_s"], out[f"{prefix}_seconds"] = path["img_s"], path["seconds"]
        out["pipeline_chunk_size"] = path["chunk_size"]
    predictor.runtime = chosen
    out.setdefault("pipeline_torch_img_s", out["pipeline_img_s"])
    out["pipeline_speedup_over_torch"] = round(out["pipeline_img_s"] / out["pipeline_torch_img_s"], 2)
    out["pipeline_over_forward"] = round(out["pipeline_img_s"] / out["backbone_forward_img_s"], 3)
    ids = frame[ID_COLUMN].tolist()
    out["decode_resize_ms_per_img"] = min(time_decode(predictor.paths, ids[:200], backbone.preprocessing)
                                          for _ in range(config.repeats))
    out["bound_img_s"] = physical_bound(out["backbone_forward_img_s"], out["decode_resize_ms_per_img"], caption_ms,
                                        usable_cores(), device, len(predictor.views))
    out["pipeline_over_bound"] = round(out["pipeline_img_s"] / out["bound_img_s"], 3)
    return out


def run_benchmark(config: BenchConfig) -> dict:
    """Run every measurement; write bench.json in ``--output``; return the results."""
    seed_everything(config.seed)
    reuse_freed_memory()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    configure_backends(device)
    paths = DatasetPaths.resolve(config.data, config.images)
    checkpoints = load_branch_checkpoints(Path(config.weights_dir), None)
    image_branch = next((b for b in ("image", "decoder") if b in checkpoints), None)
    if image_branch is None:
        raise SystemExit(f"{config.weights_dir}: no image.pt or decoder.pt; run train_efficientnet.py first")
    branches = list(checkpoints)
    labels = LabelSet(tuple(checkpoints[branches[0]]["label_ids"]))
    frame = read_csv(paths.train_csv).head(config.num_images)
    frame = frame[[c for c in (ID_COLUMN, CAPTION_COLUMN) if c in frame.columns]]
    fusion_file = Path(config.weights_dir) / "fusion.json"
    settings = load_fusion(fusion_file) if fusion_file.is_file() else None
    if settings is None or sorted(settings.branches) != sorted(branches):
        settings = FusionSettings(branches=branches, label_ids=list(labels.ids),
                                  weights={b: 1.0 / len(branches) for b in branches})

    results: dict = {
        "data": str(paths.root), "weights": str(config.weights_dir), "images_timed": len(frame),
        "device": str(device), "threads": torch.get_num_threads(), "workers": config.workers,
        "batch_size": config.batch_size, "branches": branches, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch_name:
        scratch = Path(scratch_name)
        predictor = BranchPredictor(checkpoints, paths, scratch / "cache", device, config.batch_size, config.workers)
        if config.precision:
            predictor.precision = config.precision
        backbone, precision, runtime = predictor.backbone, predictor.precision, predictor.runtime
        resolution = backbone.preprocessing["resolution"]
        processes = usable_cores() if device.type == "cpu" and config.workers > 0 else 0
        batch = min(config.batch_size, CPU_BATCH) if processes else config.batch_size
        results.update(backbone=backbone.name, resolution=resolution, precision=precision, runtime=runtime,
                       views=list(predictor.views),
                       pipeline_batch=batch, pipeline_processes=processes, cores=usable_cores())
        ids = frame[ID_COLUMN].tolist()
        results["caption_branch_ms_per_img"] = time_caption(predictor, frame)
        trained_preprocessing = backbone.preprocessing
        for size in [resolution] + ([config.also_resolution] if config.also_resolution not in (0, resolution) else []):
            # The heads take pooled features of any resolution, so speed can be timed at another one.
            backbone.preprocessing = {**trained_preprocessing, "resolution": size}
            measured = time_runtimes(predictor, frame, settings, labels, config, batch, processes,
                                     results["caption_branch_ms_per_img"], scratch / f"{size}px")
            if size == resolution:
                results.update(measured)
            else:
                results[f"at_{size}px"] = measured
        backbone.preprocessing = trained_preprocessing
        results["test_10000_images_minutes"] = round(10000 / results["pipeline_img_s"] / 60, 2)
        if device.type == "cpu" and openvino_version() is not None:
            print("timing OpenVINO int8 (where NNCF is installed) ...", flush=True)
            compiled = OpenVinoForward.cached(backbone.module, trained_preprocessing, True, precision, scratch,
                                              usable_cores())
            results["forward_int8_img_s"] = time_int8_forward(compiled.converted, paths, ids[:300],
                                                              trained_preprocessing, batch, config.forward_seconds)

        if config.compare:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: speed does not depend on them
                compared = create_backbone(COMPARED_BACKBONE, resolution=resolution)
            if compared.feature_dim != backbone.feature_dim:
                raise SystemExit(f"{COMPARED_BACKBONE} gives {compared.feature_dim} features, the trained heads "
                                 f"expect {backbone.feature_dim}; run with --no-compare")
            # Both in torch: the comparison is of the two models' code, not of the runtimes.
            predictor.backbone, predictor.runtime = compared, "torch"
            print(f"timing the inference path with efficientnet-pytorch {COMPARED_BACKBONE} ...", flush=True)
            results["effnet_pytorch_pipeline_img_s"] = max(
                time_inference_path(predictor, frame, settings, labels, scratch / f"compared{i}")["img_s"]
                for i in range(config.repeats))
            forward = max(forward_limits(compared, device, precision, dataclasses.replace(config, repeats=1),
                                         batch, processes, scratch / "compared").get(k, 0.0)
                          for k in (f"torch_threads_batch{batch}", f"torch_processes{processes}_batch{batch}"))
            results["effnet_pytorch_forward_img_s"] = forward
            bound = physical_bound(forward, results["decode_resize_ms_per_img"], results["caption_branch_ms_per_img"],
                                   results["cores"], device, len(predictor.views))
            results["effnet_pytorch_bound_img_s"] = bound
            results["effnet_pytorch_pipeline_over_bound"] = round(results["effnet_pytorch_pipeline_img_s"] / bound, 3)
            results["speedup_over_effnet_pytorch"] = round(
                results["pipeline_torch_img_s"] / results["effnet_pytorch_pipeline_img_s"], 2)
            predictor.backbone, predictor.runtime = backbone, runtime

    print("timing fine-tuning steps ...", flush=True)
    finetune_batches = config.finetune_batches or (40 if device.type == "cuda" else 4)
    results["train_finetune_img_s"] = time_finetune(backbone.name, resolution, paths, ids, len(labels), device,
                                                    config.finetune_batch_size, finetune_batches, config.workers,
                                                    training_precision("auto", device))
    results["train_finetune_batches_timed"] = finetune_batches
    feature_dim = backbone.pooled_dim
    results["train_cached_head_img_s"] = time_head_training(_head_step, feature_dim, len(labels),
                                                            config.head_rows, device)
    results["train_cached_decoder_img_s"] = time_head_training(_decoder_step, feature_dim, len(labels),
                                                               config.head_rows, device)
    results["peak_rss_mb"] = round(_peak_rss_mb())
    results["config"] = dataclasses.asdict(config)

    output = Path(config.output) / "bench.json"
    write_json(output, results)
    print(format_table(results))
    print(f"wrote {output}")
    return results


def format_table(results: dict) -> str:
    """The headline figures as an aligned two-column table."""
    def forwards(at: dict) -> str:
        return ", ".join(f"{runtime} {rate}" for runtime, rate in at["forward_img_s_by_runtime"].items()) + " img/s"

    def pipelines(at: dict) -> str:
        return (f"{at['pipeline_img_s']} img/s in {results['runtime']} ({at['pipeline_speedup_over_torch']}x "
                f"torch's {at['pipeline_torch_img_s']}; {at['pipeline_over_bound']:.0%} of the bound "
                f"{at['bound_img_s']})")

    rows = [
        ("backbone", f"{results['backbone']} @ {results['resolution']} px, {results['precision']}, on "
                     f"{results['device']} ({results['threads']} threads); pipeline batch {results['pipeline_batch']}"),
        ("forward by runtime", forwards(results)),
        ("physical bound", f"{results['bound_img_s']} img/s (decode + fastest forward + caption per core, over "
                           f"{results['cores']} cores)"),
        ("inference pipeline", pipelines(results)),
        ("10,000 test images", f"{results['test_10000_images_minutes']} min"),
    ]
    for key, at in results.items():
        if key.startswith("at_"):
            rows += [(f"forward at {at['resolution']} px", forwards(at)),
                     (f"pipeline at {at['resolution']} px", pipelines(at))]
    if results.get("forward_int8_img_s"):
        rows.append(("OpenVINO int8 forward", f"{results['forward_int8_img_s']} img/s (NNCF, speed only)"))
    if "effnet_pytorch_pipeline_img_s" in results:
        rows.append((f"pipeline with {COMPARED_BACKBONE}",
                     f"{results['effnet_pytorch_pipeline_img_s']} img/s in torch "
                     f"({results['effnet_pytorch_pipeline_over_bound']:.0%} of its bound "
                     f"{results['effnet_pytorch_bound_img_s']}; ours in torch is {results['speedup_over_effnet_pytorch']}x)"))
    rows += [
        ("decode + resize", f"{results['decode_resize_ms_per_img']} ms/img (one process)"),
        ("caption branch", f"{results['caption_branch_ms_per_img']} ms/img"),
        ("fine-tuning", f"{results['train_finetune_img_s']} img/s"),
        ("head on cached features", f"{results['train_cached_head_img_s']} rows/s"),
        ("decoder on cached features", f"{results['train_cached_decoder_img_s']} rows/s"),
        ("peak memory", f"{results['peak_rss_mb']} MB"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def get_args_parser():
    return build_parser(BenchConfig, __doc__)


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    return run_benchmark(config_from_args(BenchConfig, args))


if __name__ == "__main__":
    main()
