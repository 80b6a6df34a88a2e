"""Throughput benchmark: ``python -m pipeline.tools.bench`` (measures; not a test).

Measures in one run, on real JPEGs of ``--data`` (the first ``--num-images`` rows of its
train.csv stand in for a test set), with the trained checkpoints in ``--weights``:

- ``forward``: the backbone alone on in-memory batches at the pipeline's batch, in every
  runtime that runs here (the registry, :mod:`pipeline.engine.runtimes`) and each precision it
  runs of fp32, bf16 (where the CPU has it) and int8 (calibrated on training images):
  images per second with every core, in the layout extraction uses, and milliseconds per image
  on one core; ``forward_img_s_by_runtime`` at the pipeline's precision, whose fastest is
  ``backbone_forward_img_s``;
- ``pipeline_img_s``: ``inference.py``'s prediction (``predict_in_chunks``) per image in the
  runtime inference chooses (``runtime``): JPEG decode and resize in DataLoader workers,
  backbone, every head, caption tokenisation and the caption ensemble, fusion and the
  submission file, with an empty feature cache; ``pipeline_torch_img_s``: the same in torch;
- ``bound_img_s``: a rate no pipeline can exceed: on CPU the cores over the serial sum of one
  image's single-core stage costs (per view decode and resize and the fastest runtime's
  forward, then the caption branch: :func:`serial_bound`); on GPU the slower of the GPU
  forward and the cores decoding; ``pipeline_over_bound`` is the pipeline's share;
- ``at_<R>px``: the forwards, both pipelines and the bound again at ``--also-resolution``
  (speed only: the heads take pooled features of any resolution);
- ``effnet_pytorch_pipeline_img_s``: the same path with efficientnet-pytorch's
  ``efficientnet-b0`` as the backbone (random weights: speed does not depend on them);
- ``train_finetune_img_s``: end-to-end fine-tuning steps (augmentation on the device, forward, backward,
  AdamW, EMA) on real images;
- ``train_cached_head_img_s`` (and ``train_cached_decoder_img_s``): training the image head
  (the label decoder) on cached features;
- ``timing``: where the time goes, stage by stage (decode, frozen front, heads, caption,
  fusion), with the CPU's instruction set;
- ``peak_rss_mb``, device, threads, workers, batch size and resolution.

Writes ``--output``/bench.json and prints a table.
"""

from __future__ import annotations

import dataclasses
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
from pipeline.engine.frozen import Calibration, FrozenForward
from pipeline.engine.loop import ModelEma, TrainStep, epoch_loader, train_one_epoch
from pipeline.engine.runtime import (
    autocast_context,
    configure_backends,
    cpu_model,
    cpu_threads,
    grad_scaler,
    instruction_set,
    native_bf16,
    resolve_device,
    reuse_freed_memory,
    seed_everything,
    training_precision,
)
from pipeline.engine.runtimes import RUNTIMES, Probe, available_runtimes, build_forward, probe_pixels, time_forward
from pipeline.features import CPU_BATCH, calibration_images
from pipeline.fusion import FusionSettings, load_fusion
from pipeline.inference_config import InferenceConfig
from pipeline.io import write_json
from pipeline.models.backbones import Backbone, create_backbone
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.models.heads import ImageHead
from pipeline.prediction import BranchPredictor, Inputs, load_branch_checkpoints, predict_in_chunks
from pipeline.train.image_config import FINETUNE, ImageTrainConfig, resolve_recipe
from pipeline.train.image_fit import build_image_model, build_optimizer, joint_loss
from pipeline.train.image_inputs import image_inputs

COMPARED_BACKBONE = "efficientnet-b0"


@dataclass
class BenchConfig(CommonConfig):
    """Settings of ``python -m pipeline.tools.bench``."""

    num_images: int = option(1000, "images timed through the inference path (per backbone and repeat)", group="run")
    forward_seconds: float = option(6.0, "how long to time each in-memory backbone forward pass", group="run")
    finetune_batches: int | None = option(
        None,
        "fine-tuning steps timed, after 3 untimed ones (default: 4 on CPU, 40 on GPU, where a step takes milliseconds)",
        group="run",
    )
    finetune_batch_size: int = option(32, "images per fine-tuning step", group="run")
    head_rows: int = option(20000, "cached-feature rows per head-training epoch timed", group="run")
    threads: int = option(0, "torch CPU threads (0: torch's default, one per core)", group="run")
    repeats: int = option(
        2,
        "each throughput is measured this many times and the best kept (a "
        "shared machine's speed varies from run to run)",
        group="run",
    )
    precision: str | None = option(
        None,
        "run the backbone in this precision instead of the one the checkpoint "
        "was trained with (speed only: the heads expect the trained one)",
        choices=["fp32", "bf16"],
        group="run",
    )
    compare: bool = option(
        True, f"also time the inference path with efficientnet-pytorch's {COMPARED_BACKBONE}", group="run"
    )
    also_resolution: int = option(
        224, "also time the forwards, the pipelines and the bound at this resolution (0: not)", group="run"
    )
    batch_size: int = option(64, "images per batch in the inference path and the forward pass", group="run")
    calibration_images: int = option(
        300, "training images int8 calibrates on, for the int8 forwards (0: no int8)", group="run"
    )
    workers: int = workers_option()
    output: str = output_option()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2)


def time_forward_in_processes(
    forward: FrozenForward, batch_size: int, resolution: int, processes: int, seconds: float
) -> float:
    """Images per second of ``processes`` single-threaded workers each running ``forward`` on an
    in-memory batch for about ``seconds``: the CPU layout extraction uses, without any decoding."""
    single = time_forward_here(forward, batch_size, resolution, min(seconds, 1.0))
    batches = max(2, int(single * seconds / batch_size))
    return round(time_forward(forward, resolution, batches, batch_size, processes), 2)


def _time_batches(run: Callable[[], object], batch_size: int, seconds: float) -> float:
    """Images per second of calling ``run`` (one batch) for ``seconds``, after a warm-up call."""
    run()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count == 0:
        run()
        count += batch_size
    return _rate(count, time.perf_counter() - started)


def time_forward_here(forward: FrozenForward, batch_size: int, resolution: int, seconds: float) -> float:
    """Images per second of ``forward`` in this process on an in-memory batch, four batches in
    flight (a runtime with several streams keeps each busy)."""
    batch = probe_pixels(batch_size, resolution)
    flight = 4
    result = _time_batches(
        lambda: list(forward.run_many((None, batch) for _ in range(flight))), batch_size * flight, seconds
    )
    return result


def bench_precisions(device: torch.device, int8: bool) -> list[str]:
    """The precisions the forward table shows: fp32; bf16 where the device computes it
    natively; int8 where there are calibration images."""
    return ["fp32", *(["bf16"] if native_bf16(device) else []), *(["int8"] if int8 else [])]


def forward_table(
    module: torch.nn.Module,
    preprocessing: dict,
    device: torch.device,
    precisions: list[str],
    batch: int,
    processes: int,
    seconds: float,
    repeats: int,
    scratch: Path,
    calibration: Calibration | None,
    runtimes: list[str] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{runtime: {precision: {"img_s", "single_core_ms"}}}`` of ``module``'s frozen forward at
    the pipeline's batch, on in-memory batches, for every runtime that runs here and each of
    its ``precisions``: ``img_s`` with every core, in the layout extraction runs it in (on a
    CPU: one single-threaded process per core; on a GPU: this process);
    ``single_core_ms``: milliseconds per image on one core (one thread), the cost the bound
    charges."""
    resolution = preprocessing["resolution"]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in runtimes or list(RUNTIMES):
        for precision in precisions:
            if name not in available_runtimes(device, precision):
                continue
            probe = Probe(module, preprocessing, True, precision, calibration)
            print(f"  {name} {precision} ...", flush=True)
            try:
                forward = build_forward(name, probe, device, scratch, usable_cores())
                if forward.in_workers and processes:
                    img_s = max(
                        time_forward_in_processes(forward, batch, resolution, processes, seconds)
                        for _ in range(repeats)
                    )
                else:
                    img_s = max(time_forward_here(forward, batch, resolution, seconds) for _ in range(repeats))
                entry = {"img_s": img_s}
                if device.type == "cpu":
                    with cpu_threads(1):
                        one = build_forward(name, probe, device, scratch, 1)
                        single = max(time_forward_here(one, batch, resolution, seconds / 2) for _ in range(repeats))
                    entry["single_core_ms"] = round(1000.0 / single, 3)
            except Exception as err:  # noqa: BLE001 - a runtime that cannot run this model is shown as such
                print(f"  {name} {precision}: could not run ({type(err).__name__}: {str(err)[:200]})", flush=True)
                continue
            table.setdefault(name, {})[precision] = entry
    return table


def serial_bound(decode_ms: float, forward_ms: float, caption_ms: float | None, cores: int, views: int = 1) -> float:
    """Images per second no CPU pipeline can exceed: 1 / the sum of one image's stage times,
    each stage given the whole machine, one after the other.

    Each ``*_ms`` is the stage's cost per image on one core (decode and resize; the fastest
    runtime's forward at the pipeline's batch, per view; the caption branch), measured alone
    with one thread, the most a core does per second; a stage given every core takes at best
    that over ``cores``. However a pipeline overlaps its stages, each image needs that much
    core time, so ``cores`` cores finish at most ``1000 * cores / sum`` images a second.
    """
    per_image_ms = views * (decode_ms + forward_ms) + (caption_ms or 0.0)
    return round(1000.0 * cores / per_image_ms, 2)


def gpu_bound(forward_img_s: float, decode_ms: float, caption_ms: float | None, cores: int, views: int = 1) -> float:
    """On a GPU the forward runs on the device while the cores decode and run the caption
    branch: the slower of the two."""
    host_ms = views * decode_ms + (caption_ms or 0.0)
    return round(min(forward_img_s / views, 1000.0 * cores / host_ms), 2)


def time_inference_path(
    predictor: BranchPredictor,
    frame: pd.DataFrame,
    inputs: Inputs,
    settings: FusionSettings,
    labels: LabelSet,
    scratch: Path,
) -> dict:
    """Seconds and images per second of ``inference.py``'s prediction of ``frame``, chunk size
    and all (an empty feature cache in ``scratch``, so every image is decoded and run)."""
    scratch.mkdir(parents=True, exist_ok=True)
    chunk_size = InferenceConfig().chunk_size
    started = time.perf_counter()
    predict_in_chunks(
        predictor,
        frame,
        dataclasses.replace(inputs, cache_dir=scratch / "cache"),
        settings,
        labels,
        scratch / "submission.csv",
        chunk_size,
        "bench features",
    )
    seconds = time.perf_counter() - started
    return {"img_s": _rate(len(frame), seconds), "seconds": round(seconds, 2), "chunk_size": chunk_size}


def time_decode(paths, image_ids: list[str], preprocessing: dict) -> float:
    """Milliseconds per image to open, decode and resize a JPEG to the uint8 tensor the
    extraction workers hand over, in one single-threaded process."""
    dataset = ImageDataset(
        paths,
        image_ids,
        build_transform(preprocessing, normalize=False),
        preprocessing["resolution"],
        blank_dtype=torch.uint8,
    )
    started = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return round(1000 * (time.perf_counter() - started) / max(len(dataset), 1), 3)


def time_caption(predictor: BranchPredictor, frame: pd.DataFrame, threads: int = 0) -> float | None:
    """Milliseconds per caption of the caption branch alone (tokenise, encode, ensemble), with
    ``threads`` torch threads (0: as set)."""
    if "caption" not in predictor.checkpoints:
        return None
    from pipeline.branches.caption import predict_caption_probs

    captions = frame[CAPTION_COLUMN].fillna("").tolist()
    with cpu_threads(threads):
        started = time.perf_counter()
        predict_caption_probs(predictor.checkpoints["caption"], captions, predictor.device)
        return round(1000 * (time.perf_counter() - started) / len(captions), 3)


def _backbone(predictor: BranchPredictor) -> Backbone:
    """The predictor's image backbone: main() refuses weights without an image branch."""
    if predictor.backbone is None:
        raise SystemExit("error: the benchmark times the image branch, and the weights loaded no backbone")
    return predictor.backbone


def time_heads_and_fusion(predictor: BranchPredictor, settings: FusionSettings, rows: int) -> dict[str, float]:
    """Milliseconds per image of the image heads (head and beam-search decoder) on in-memory
    pooled features (with the class attention's logits and caption vectors where the heads read
    them), and of fusion on their probabilities."""
    generator = torch.Generator().manual_seed(0)
    heads = predictor.heads
    attended = 0 if heads.attention is None else heads.attention.weight.shape[0]  # its logits follow the pooled
    features = torch.randn(rows, _backbone(predictor).pooled_dim + attended, generator=generator)
    captions = (
        torch.randn(rows, heads.decoder.caption_dim, generator=generator).numpy()
        if heads.decoder is not None and heads.decoder.caption_dim
        else None
    )
    readable = torch.ones(rows, dtype=torch.bool)
    started = time.perf_counter()
    probs = heads.probabilities(features, readable, predictor.device, captions=captions)
    heads_ms = 1000 * (time.perf_counter() - started) / rows
    probs.update({branch: probs[next(iter(probs))] for branch in settings.branches if branch not in probs})
    started = time.perf_counter()
    settings.predict({branch: probs[branch] for branch in settings.branches})
    return {"heads": round(heads_ms, 4), "fusion": round(1000 * (time.perf_counter() - started) / rows, 4)}


def time_finetune(
    backbone_name: str,
    resolution: int,
    paths,
    image_ids: list[str],
    num_labels: int,
    device: torch.device,
    batch_size: int,
    batches: int,
    workers: int,
    precision: str,
) -> float:
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
    recipe = resolve_recipe(config, FINETUNE)
    augment = BatchAugment(recipe.augment, device, recipe.scale_jitter)
    inputs = image_inputs(
        backbone, paths, ids, ids[:batch_size], targets, targets[:batch_size], device, config.workers, augment
    )
    model = build_image_model(config, inputs.trunk, backbone.pooled_dim, num_labels, device)
    step = TrainStep(
        model, joint_loss(config, lambda raw: inputs.prepare(augment(raw)), LabelOrder.from_train(targets), device)
    )
    optimizer, _ = build_optimizer(config, model, device, recipe)
    ema, scaler = ModelEma(model), grad_scaler(device, precision)
    loader = DataLoader(
        inputs.train,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
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


def time_head_training(
    make_step: Callable[[int, int], torch.nn.Module], feature_dim: int, num_labels: int, rows: int, device: torch.device
) -> float:
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


def time_runtimes(
    predictor: BranchPredictor,
    frame: pd.DataFrame,
    inputs: Inputs,
    settings: FusionSettings,
    labels: LabelSet,
    config: BenchConfig,
    batch: int,
    processes: int,
    caption_ms: float | None,
    calibration: Calibration | None,
    scratch: Path,
) -> dict:
    """At the predictor's backbone resolution: every runtime's forward in each precision, the
    pipeline in the predictor's runtime and in torch, decoding, and the bound from the fastest
    runtime at the pipeline's precision."""
    backbone, device, precision = _backbone(predictor), predictor.device, predictor.precision
    resolution = backbone.preprocessing["resolution"]
    print(f"timing {backbone.name} forwards at {resolution} px on in-memory batches of {batch} ...", flush=True)
    # The pipeline's own precision always (fp16 on a GPU), then the table's.
    precisions = list(dict.fromkeys([precision, *bench_precisions(device, calibration is not None)]))
    table = forward_table(
        backbone.module,
        backbone.preprocessing,
        device,
        precisions,
        batch,
        processes,
        config.forward_seconds,
        config.repeats,
        scratch / "models",
        calibration,
    )
    by_runtime = {name: entry[precision]["img_s"] for name, entry in table.items() if precision in entry}
    out: dict = {
        "resolution": resolution,
        "forward": table,
        "forward_img_s_by_runtime": by_runtime,
        "backbone_forward_img_s": max(by_runtime.values()),
    }
    chosen = predictor.runtime
    # Against torch where torch runs the pipeline's precision (it runs no int8).
    for runtime in dict.fromkeys([chosen, *(["torch"] if "torch" in available_runtimes(device, precision) else [])]):
        predictor.runtime = runtime
        print(f"timing the inference path in {runtime} at {resolution} px on {len(frame)} images ...", flush=True)
        path = max(
            (
                time_inference_path(predictor, frame, inputs, settings, labels, scratch / f"{runtime}{i}")
                for i in range(config.repeats)
            ),
            key=lambda run: run["img_s"],
        )
        prefix = "pipeline" if runtime == chosen else "pipeline_torch"
        out[f"{prefix}_img_s"], out[f"{prefix}_seconds"] = path["img_s"], path["seconds"]
        out["pipeline_chunk_size"] = path["chunk_size"]
    predictor.runtime = chosen
    out.setdefault("pipeline_torch_img_s", out["pipeline_img_s"])
    out["pipeline_speedup_over_torch"] = round(out["pipeline_img_s"] / out["pipeline_torch_img_s"], 2)
    out["pipeline_over_forward"] = round(out["pipeline_img_s"] / out["backbone_forward_img_s"], 3)
    ids = frame[ID_COLUMN].tolist()
    out["decode_resize_ms_per_img"] = min(
        time_decode(inputs.paths, ids[:200], backbone.preprocessing) for _ in range(config.repeats)
    )
    views = len(predictor.views)
    if device.type == "cpu":
        single = {name: entry[precision]["single_core_ms"] for name, entry in table.items() if precision in entry}
        out["bound_runtime"] = min(single, key=single.__getitem__)
        out["bound_forward_ms_per_img"] = single[out["bound_runtime"]]
        out["bound_img_s"] = serial_bound(
            out["decode_resize_ms_per_img"], out["bound_forward_ms_per_img"], caption_ms, usable_cores(), views
        )
    else:
        out["bound_img_s"] = gpu_bound(
            out["backbone_forward_img_s"], out["decode_resize_ms_per_img"], caption_ms, usable_cores(), views
        )
    out["pipeline_over_bound"] = round(out["pipeline_img_s"] / out["bound_img_s"], 3)
    return out


def stage_timing(results: dict, stage_ms: dict[str, float | None], images: int) -> dict:
    """The per-stage timing of the bench: each stage's milliseconds per image on this machine
    as seconds for ``images`` images and images per second, with the CPU and its instruction set."""
    stages = {
        stage: {"seconds": round(ms * images / 1000, 3), "images": images, "img_s": round(1000 / ms, 2)}
        for stage, ms in stage_ms.items()
        if ms
    }
    return {"cpu": cpu_model(), "instruction_set": instruction_set(), "cores": results["cores"], "stages": stages}


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
        settings = FusionSettings(
            branches=branches, label_ids=list(labels.ids), weights={b: 1.0 / len(branches) for b in branches}
        )

    results: dict = {
        "data": str(paths.root),
        "weights": str(config.weights_dir),
        "images_timed": len(frame),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "workers": config.workers,
        "batch_size": config.batch_size,
        "branches": branches,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "instruction_set": instruction_set(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch_name:
        scratch = Path(scratch_name)
        predictor = BranchPredictor(checkpoints, paths, device, config.batch_size, model_cache=scratch / "cache")
        inputs = Inputs(paths, scratch / "cache", config.workers)
        if config.precision:
            predictor.precision = config.precision
        backbone, precision, runtime = _backbone(predictor), predictor.precision, predictor.runtime
        resolution = backbone.preprocessing["resolution"]
        processes = usable_cores() if device.type == "cpu" and config.workers > 0 else 0
        batch = min(config.batch_size, CPU_BATCH) if processes else config.batch_size
        results.update(
            backbone=backbone.name,
            resolution=resolution,
            precision=precision,
            runtime=runtime,
            views=list(predictor.views),
            pipeline_batch=batch,
            pipeline_processes=processes,
            cores=usable_cores(),
        )
        ids = frame[ID_COLUMN].tolist()
        # On one core: the bound charges each stage its single-core cost.
        results["caption_branch_ms_per_img"] = time_caption(predictor, frame, 1 if device.type == "cpu" else 0)
        # int8 calibrates on the dataset's own training images, as training does.
        calibration = (
            calibration_images(
                paths, read_csv(paths.train_csv)[ID_COLUMN].tolist(), backbone.preprocessing, config.calibration_images
            )
            if device.type == "cpu" and config.calibration_images
            else None
        )
        trained_preprocessing = backbone.preprocessing
        for size in [resolution] + ([config.also_resolution] if config.also_resolution not in (0, resolution) else []):
            # The heads take pooled features of any resolution, so speed can be timed at another one.
            backbone.preprocessing = {**trained_preprocessing, "resolution": size}
            if calibration is not None:
                calibration = calibration_images(
                    paths,
                    read_csv(paths.train_csv)[ID_COLUMN].tolist(),
                    backbone.preprocessing,
                    config.calibration_images,
                )
            measured = time_runtimes(
                predictor,
                frame,
                inputs,
                settings,
                labels,
                config,
                batch,
                processes,
                results["caption_branch_ms_per_img"],
                calibration,
                scratch / f"{size}px",
            )
            if size == resolution:
                results.update(measured)
            else:
                results[f"at_{size}px"] = measured
        backbone.preprocessing = trained_preprocessing
        results["test_10000_images_minutes"] = round(10000 / results["pipeline_img_s"] / 60, 2)
        views = len(predictor.views)
        per_image = time_heads_and_fusion(predictor, settings, min(len(frame), 2000))
        forward_ms = 1000.0 / results["forward_img_s_by_runtime"][runtime]
        results["timing"] = stage_timing(
            results,
            {
                "decode": results["decode_resize_ms_per_img"] * views / max(processes, 1),
                "frozen front": forward_ms * views,
                "heads": per_image["heads"],
                "caption": time_caption(predictor, frame),
                "fusion": per_image["fusion"],
            },
            len(frame),
        )

        if config.compare:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: speed does not depend on them
                compared = create_backbone(COMPARED_BACKBONE, resolution=resolution)
            if compared.feature_dim != backbone.feature_dim:
                raise SystemExit(
                    f"{COMPARED_BACKBONE} gives {compared.feature_dim} features, the trained heads "
                    f"expect {backbone.feature_dim}; run with --no-compare"
                )
            # Both in torch: the comparison is of the two models' code, not of the runtimes.
            predictor.backbone, predictor.runtime = compared, "torch"
            print(f"timing the inference path with efficientnet-pytorch {COMPARED_BACKBONE} ...", flush=True)
            results["effnet_pytorch_pipeline_img_s"] = max(
                time_inference_path(predictor, frame, inputs, settings, labels, scratch / f"compared{i}")["img_s"]
                for i in range(config.repeats)
            )
            table = forward_table(
                compared.module,
                compared.preprocessing,
                device,
                [precision],
                batch,
                processes,
                config.forward_seconds,
                1,
                scratch / "compared",
                None,
                runtimes=["torch"],
            )
            results["effnet_pytorch_forward_img_s"] = table["torch"][precision]["img_s"]
            if device.type == "cpu":
                bound = serial_bound(
                    results["decode_resize_ms_per_img"],
                    table["torch"][precision]["single_core_ms"],
                    results["caption_branch_ms_per_img"],
                    results["cores"],
                    views,
                )
            else:
                bound = gpu_bound(
                    results["effnet_pytorch_forward_img_s"],
                    results["decode_resize_ms_per_img"],
                    results["caption_branch_ms_per_img"],
                    results["cores"],
                    views,
                )
            results["effnet_pytorch_bound_img_s"] = bound
            results["effnet_pytorch_pipeline_over_bound"] = round(results["effnet_pytorch_pipeline_img_s"] / bound, 3)
            results["speedup_over_effnet_pytorch"] = round(
                results["pipeline_img_s"] / results["effnet_pytorch_pipeline_img_s"], 2
            )
            results["torch_speedup_over_effnet_pytorch"] = round(
                results["pipeline_torch_img_s"] / results["effnet_pytorch_pipeline_img_s"], 2
            )
            predictor.backbone, predictor.runtime = backbone, runtime

    print("timing fine-tuning steps ...", flush=True)
    finetune_batches = config.finetune_batches or (40 if device.type == "cuda" else 4)
    results["train_finetune_img_s"] = time_finetune(
        backbone.name,
        resolution,
        paths,
        ids,
        len(labels),
        device,
        config.finetune_batch_size,
        finetune_batches,
        config.workers,
        training_precision("auto", device),
    )
    results["train_finetune_batches_timed"] = finetune_batches
    feature_dim = backbone.pooled_dim
    results["train_cached_head_img_s"] = time_head_training(
        _head_step, feature_dim, len(labels), config.head_rows, device
    )
    results["train_cached_decoder_img_s"] = time_head_training(
        _decoder_step, feature_dim, len(labels), config.head_rows, device
    )
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
        return (
            "; ".join(
                f"{runtime} " + ", ".join(f"{precision} {entry['img_s']}" for precision, entry in by.items())
                for runtime, by in at["forward"].items()
            )
            + " img/s"
        )

    def pipelines(at: dict) -> str:
        return (
            f"{at['pipeline_img_s']} img/s in {results['runtime']} ({at['pipeline_speedup_over_torch']}x "
            f"torch's {at['pipeline_torch_img_s']}; {at['pipeline_over_bound']:.0%} of the bound "
            f"{at['bound_img_s']})"
        )

    bound_by = (
        (
            f"decode {results['decode_resize_ms_per_img']} + {results['bound_runtime']}'s forward "
            f"{results['bound_forward_ms_per_img']} ms per view, caption {results['caption_branch_ms_per_img']} "
            f"ms, on one core; {results['cores']} cores"
        )
        if "bound_runtime" in results
        else "GPU forward vs decoding cores"
    )
    rows = [
        (
            "backbone",
            f"{results['backbone']} @ {results['resolution']} px, {results['precision']}, on "
            f"{results['device']} ({results['threads']} threads); pipeline batch {results['pipeline_batch']}",
        ),
        ("CPU", f"{results['cpu']} ({results['instruction_set']}, {results['cores']} cores)"),
        ("forward by runtime", forwards(results)),
        ("bound", f"{results['bound_img_s']} img/s ({bound_by})"),
        ("inference pipeline", pipelines(results)),
        ("10,000 test images", f"{results['test_10000_images_minutes']} min"),
    ]
    for key, at in results.items():
        if key.startswith("at_"):
            rows += [
                (f"forward at {at['resolution']} px", forwards(at)),
                (f"pipeline at {at['resolution']} px", pipelines(at)),
            ]
    if "effnet_pytorch_pipeline_img_s" in results:
        rows.append(
            (
                f"pipeline with {COMPARED_BACKBONE}",
                f"{results['effnet_pytorch_pipeline_img_s']} img/s in torch "
                f"({results['effnet_pytorch_pipeline_over_bound']:.0%} of its bound "
                f"{results['effnet_pytorch_bound_img_s']}; ours is {results['speedup_over_effnet_pytorch']}x, "
                f"in torch {results['torch_speedup_over_effnet_pytorch']}x)",
            )
        )
    rows += [
        (f"stage: {stage}", f"{entry['seconds']} s for {entry['images']} images, {entry['img_s']} img/s")
        for stage, entry in results["timing"]["stages"].items()
    ]
    rows += [
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
