"""Frozen-backbone extraction and its on-disk caches.

Running the backbone is the slow part of the CPU recipe, so its outputs are computed once
per (backbone, weights, preprocessing, precision, output, views, image list) and kept in
``weights/cache/`` as row-sharded stores (:mod:`pipeline.shards`):

- pooled features (``features-*/``, frozen mode and inference): avg+max pooled vectors of
  the whole backbone, averaged over the views;
- stage maps (``stagemaps-*/``, partial mode): the feature maps of the frozen front of the
  backbone, one array per view.

Both are read a batch of rows at a time, so no process ever holds a whole set. The key is
stored with the data and checked on load; shards are written atomically, so an interrupted
extraction resumes at its first missing shard and a cut-off or foreign file is rebuilt,
never read, as is a shard whose content no longer matches the digest recorded when it was
written. One run at a time extracts into a store; another that needs it waits for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.choices import usable_cores
from pipeline.data.dataset import DatasetPaths
from pipeline.data.images import DECODE_VERSION, ImageDataset, image_file_stat
from pipeline.data.transforms import build_transform, stack_pixels
from pipeline.engine import timing
from pipeline.engine.distributed import DistContext, all_ranks_agree, barrier, workers_per_process
from pipeline.engine.frozen import Calibration, FrozenForward
from pipeline.engine.runtimes import Probe, build_forward
from pipeline.io import CheckpointError
from pipeline.models.backbones import Backbone, state_digest
from pipeline.models.heads import ClassAttention
from pipeline.models.image_model import AttentionPooled
from pipeline.shards import Field, ShardedStore, write_lock

log = logging.getLogger(__name__)

CACHE_VERSION = 3
VIEWS = ("plain", "flip")


@dataclass(frozen=True, kw_only=True)
class ExtractionSettings:
    """How the cached frozen forward passes run and where their stores are kept: what
    :func:`cached_features`, :func:`has_cached_features` and :func:`cached_stage_maps` share.

    ``views``, ``precision``, ``runtime`` and (in int8) ``calibration`` are part of every cache
    key; the others say only how missing rows are computed and stored.
    """

    cache_dir: Path  # the stores, and the runtimes' converted models
    device: torch.device
    batch_size: int = 64
    workers: int = 2
    views: tuple[str, ...] = VIEWS
    precision: str = "fp32"
    runtime: str = "torch"
    calibration: Calibration | None = None  # int8: the images the quantisation calibrates on
    shard_rows: int | None = None  # rows per shard of a new store (None: :func:`shard_rows_for`'s)


def cache_key(
    backbone: Backbone,
    files: Sequence[Path],
    views: Sequence[str],
    precision: str = "fp32",
    output: str = "avg+max",
    runtime: str = "torch",
    calibration: Calibration | None = None,
) -> dict:
    """Everything the features depend on, including each file's size and modification time
    and the runtime that computes them.

    ``output`` is what is kept of the backbone: ``avg+max`` pooled features of the whole
    backbone, or ``stageK`` for the feature maps after its first K stages. In int8 the
    calibration images are part of it too.
    """
    calibrated = {"calibration": calibration.digest} if precision == "int8" and calibration is not None else {}
    return {
        **calibrated,
        "cache_version": CACHE_VERSION,
        "decode_version": DECODE_VERSION,
        "backbone": backbone.name,
        "weights": backbone.weights_digest,
        "preprocessing": backbone.preprocessing,
        "precision": precision,
        "runtime": runtime,
        "pooling": output,
        "views": list(views),
        "num_images": len(files),
        "images_digest": cache_key_images(files),
    }


def cache_key_images(files: Sequence[Path]) -> str:
    """A digest of the image files' names, sizes and modification times."""
    listing = hashlib.sha256()
    for path in files:
        stat = image_file_stat(path)  # None for what the loader finds unreadable without opening
        listing.update(f"{path.name}\0{stat.st_size if stat else -1}\0{stat.st_mtime_ns if stat else -1}\n".encode())
    return listing.hexdigest()


# Training images int8 quantisation calibrates its activation ranges on.
CALIBRATION_IMAGES = 300


def calibration_images(
    paths: DatasetPaths,
    image_ids: Sequence[str],
    preprocessing: dict,
    count: int = CALIBRATION_IMAGES,
    batch_size: int = 32,
) -> Calibration:
    """``count`` of the training images ``image_ids`` for int8 calibration, the same every time
    (evenly spaced over the ids in name order), decoded as extraction decodes them (plain view,
    unreadable ones left out); named by their files (name, size, modification time) and the
    preprocessing, so other images make another quantised model."""
    ordered = sorted(image_ids)
    chosen = [ordered[i * len(ordered) // min(count, len(ordered))] for i in range(min(count, len(ordered)))]
    key = cache_key_images([paths.image_path(image_id) for image_id in chosen])
    digest = _key_digest({"images": key, "preprocessing": preprocessing, "decode_version": DECODE_VERSION})

    def batches() -> Iterator[torch.Tensor]:
        dataset = ImageDataset(
            paths,
            chosen,
            build_transform(preprocessing, normalize=False),
            preprocessing["resolution"],
            blank_dtype=torch.uint8,
        )
        for start in range(0, len(chosen), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(chosen)))]
            images = [image for image, _, readable in items if readable]
            if images:
                yield stack_pixels(images)

    return Calibration(batches, digest, tuple(chosen))


def recorded_calibration(paths: DatasetPaths, record: dict, preprocessing: dict) -> Calibration:
    """The calibration a checkpoint's int8 features were computed with (``record["calibration"]``:
    its digest and image ids): named by the recorded digest, so the quantised model training
    kept is found again; the images are decoded from ``paths`` only if it must be quantised anew."""
    ids = list(record["image_ids"])

    def batches() -> Iterator[torch.Tensor]:
        try:
            decoded = list(calibration_images(paths, ids, preprocessing, count=len(ids)).batches())
        except (ValueError, IndexError, KeyError):  # images given one by one (--image), not a dataset folder
            decoded = []
        if not decoded:
            raise CheckpointError(
                f"int8: the quantised model is not in the model cache, and none of its {len(ids)} "
                f"calibration images (e.g. {ids[0] if ids else '?'}) can be read here; run "
                "inference.py once with --data naming the training data to quantise it again"
            )
        yield from decoded

    return Calibration(batches, record["digest"], tuple(ids))


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _store_dir(cache_dir: Path, kind: str, key: dict) -> Path:
    return Path(cache_dir) / f"{kind}-{key['backbone']}-{key['pooling'].replace('+', '')}-{_key_digest(key)}"


# Images per forward pass (and per hand-over to the main process) when extracting on CPU:
# larger chunks run no faster once started but delay every worker's first result, and
# below about 8 the per-chunk overhead shows (docs/speed.md, "What makes the CPU forward passes fast").
CPU_BATCH = 16
# Rows per shard: at most this many (an interrupted extraction loses at most one shard's
# work), and fewer for large rows, so a shard being written stays small in memory.
SHARD_ROWS = 4096
SHARD_BYTES = 64 << 20


def shard_rows_for(fields: dict[str, Field]) -> int:
    """Rows per shard of a store with these fields: :data:`SHARD_ROWS`, fewer for rows so
    large that a shard would pass :data:`SHARD_BYTES`."""
    row_bytes = sum(field.row_bytes for field in fields.values())
    return max(16, min(SHARD_ROWS, SHARD_BYTES // max(row_bytes, 1)))


@dataclass
class _Extractor:
    """The inference-ready backbone (or its front) in its runtime, and the shape and dtype of
    what is kept of it."""

    forward: FrozenForward
    preprocessing: dict
    output_shape: tuple[int, ...]  # per image: (2C,) pooled, or (C, h, w) maps
    device: torch.device

    @property
    def pooled_output(self) -> bool:
        return len(self.output_shape) == 1

    def run(self, images: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Outputs of a uint8 batch (B, 3, R, R), best laid out channels_last (as
        :func:`stack_pixels` makes it): pooled features (B, 2C) in float32, or maps
        (B, C, h, w) in float16 (half the bytes to keep); NaN rows for unreadable images
        (never run)."""
        return self.finish(self.forward(images if ok.all() else images[ok]) if ok.any() else None, ok)

    def finish(self, outputs: torch.Tensor | None, ok: torch.Tensor) -> torch.Tensor:
        """The outputs of a batch's readable images (None: there were none) in the kept
        dtype, NaN rows for the unreadable images."""
        dtype = torch.float32 if self.pooled_output else torch.float16
        out = torch.full((len(ok), *self.output_shape), float("nan"), dtype=dtype)
        if outputs is not None:
            out[ok] = outputs.to(dtype)
        return out


@dataclass(frozen=True)
class _Unit:
    """A piece of extraction work: rows ``start..stop`` of view ``view`` (index into the views),
    which belong to shard ``shard``."""

    shard: int
    view: int
    start: int
    stop: int


def _units(shards: Sequence[tuple[int, range]], num_views: int, size: int) -> list[_Unit]:
    """The work units of ``(shard, rows)`` pairs, shard by shard, every view of a shard's rows
    before the next shard, so each shard completes as early as possible."""
    return [
        _Unit(shard, view, start, min(start + size, rows.stop))
        for shard, rows in shards
        for view in range(num_views)
        for start in range(rows.start, rows.stop, size)
    ]


class _UnitImages(Dataset):
    """Item ``k``: (outputs, readable) of work unit ``k``: its images decoded and resized and,
    with an extractor, run through it too, all inside a DataLoader worker process.

    On CPU running the forward in the workers beats decoding there and running a
    multi-threaded forward in the main process: each worker uses one thread, so no core
    waits at intra-op barriers, and no decoding process preempts a thread the others wait for.
    """

    def __init__(self, views: list[ImageDataset], units: list[_Unit], extractor: _Extractor | None) -> None:
        self.views, self.units, self.extractor = views, units, extractor

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(outputs or pixels, readable, decode seconds, forward seconds) of unit ``k``."""
        unit = self.units[k]
        started = time.perf_counter()
        items = [self.views[unit.view][i] for i in range(unit.start, unit.stop)]
        images = stack_pixels([image for image, _, _ in items])  # (B, 3, R, R) uint8, channels_last
        ok = torch.tensor([readable for _, _, readable in items], dtype=torch.bool)
        decoded = time.perf_counter()
        outputs = self.extractor.run(images, ok) if self.extractor else images
        return outputs, ok, decoded - started, time.perf_counter() - decoded


def _run_units(
    extractor: _Extractor,
    paths: DatasetPaths,
    image_ids: Sequence[str],
    views: Sequence[str],
    units: list[_Unit],
    workers: int,
    processes: int,
    description: str,
    show_progress: bool = True,
) -> Iterator[tuple[_Unit, torch.Tensor, torch.Tensor]]:
    """(unit, outputs, readable) of every unit, in order.

    With a runtime that runs in the workers (every runtime on a CPU) and ``processes`` > 0,
    that many single-threaded workers each decode and run whole units and the main process
    only collects; otherwise ``workers`` processes decode and the main process (or the GPU) runs
    the forward.
    """
    resolution = extractor.preprocessing["resolution"]
    datasets = [
        ImageDataset(
            paths,
            list(image_ids),
            build_transform(extractor.preprocessing, flip=(view == "flip"), normalize=False),
            resolution,
            blank_dtype=torch.uint8,
        )
        for view in views
    ]
    in_workers = extractor.forward.in_workers and processes > 0
    count = processes if in_workers else workers
    loader = DataLoader(
        _UnitImages(datasets, units, extractor if in_workers else None),
        batch_size=None,
        num_workers=count,
        pin_memory=extractor.device.type == "cuda" and not in_workers,
        prefetch_factor=4 if count else None,
    )
    # The loader yields one item per unit (batch_size=None over _UnitImages(units)).
    batches = tqdm(
        zip(units, loader, strict=True), total=len(units), desc=description, unit="batch", disable=not show_progress
    )
    if in_workers:
        for unit, (outputs, ok, decode_seconds, forward_seconds) in batches:
            timing.add("decode", decode_seconds, len(ok))
            timing.add("frozen front", forward_seconds, int(ok.sum()))
            yield unit, outputs, ok
        return
    # The main process runs the forward: its seconds are the loop's, less those spent waiting for the
    # workers or in the caller.
    waited = [0.0]

    def readable() -> Iterator[tuple[tuple[_Unit, torch.Tensor], torch.Tensor]]:
        pieces = iter(batches)
        while True:
            started = time.perf_counter()
            piece = next(pieces, None)
            waited[0] += time.perf_counter() - started
            if piece is None:
                return
            unit, (images, ok, decode_seconds, _) = piece
            timing.add("decode", decode_seconds, len(ok))
            yield (unit, ok), images if ok.all() else images[ok]

    started, images_run = time.perf_counter(), 0
    for (unit, ok), outputs in extractor.forward.run_many(readable()):
        images_run += int(ok.sum())
        handed = time.perf_counter()
        yield unit, extractor.finish(outputs, ok), ok
        waited[0] += time.perf_counter() - handed  # the caller's time, not the forward's
    timing.add("frozen front", time.perf_counter() - started - waited[0], images_run)


def _unit_size(extractor: _Extractor, batch_size: int, processes: int) -> int:
    on_cpu = extractor.device.type == "cpu" and (processes > 0 or not extractor.forward.in_workers)
    return min(batch_size, CPU_BATCH) if on_cpu else batch_size


def _extractor(
    module: torch.nn.Module,
    backbone: Backbone,
    output_shape: tuple[int, ...],
    precision: str,
    device: torch.device,
    runtime: str = "torch",
    model_cache: Path | None = None,
    calibration: Calibration | None = None,
) -> _Extractor:
    """The extractor of ``module`` (the backbone, or its front) in ``runtime``, which keeps its
    converted models in ``model_cache`` (None: in this process only)."""
    probe = Probe(module, backbone.preprocessing, len(output_shape) == 1, precision, calibration)
    return _Extractor(build_forward(runtime, probe, device, model_cache), backbone.preprocessing, output_shape, device)


def _processes(workers: int) -> int:
    """Single-threaded extraction processes of this rank on CPU: one per core, the cores
    shared among the ranks of this machine (none with ``workers=0``)."""
    return workers_per_process(usable_cores()) if workers > 0 else 0


def _mean_into(target: np.ndarray, rows: slice, view_number: int, pooled: torch.Tensor) -> None:
    """The running mean over the views seen so far, kept in ``target``'s float16 (one view:
    the features themselves)."""
    previous = target[rows].astype(np.float32)
    target[rows] = ((previous * view_number + pooled.numpy()) / (view_number + 1)).astype(np.float16)


def extract_features(
    backbone: Backbone,
    paths: DatasetPaths,
    image_ids: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 2,
    views: Sequence[str] = VIEWS,
    description: str = "features",
    precision: str = "fp32",
    processes: int | None = None,
    runtime: str = "torch",
    model_cache: Path | None = None,
    attention: ClassAttention | None = None,
    calibration: Calibration | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, 2C) in float16, averaged over the views (plain and mirrored), and a
    (N,) bool mask of the images that could be read (the others' features are NaN, never
    computed), held in memory: for a chunk of images, not a whole training set (that is
    :func:`cached_features`).

    The backbone runs with batch norm folded, channels_last, in inference mode, in
    ``precision``, in ``runtime``. On GPU ``workers`` processes decode and the main process runs
    the forward. On CPU ``processes`` single-threaded workers (default: one per core; with
    ``workers=0``, none) each decode and run their own chunks, and the main process only
    collects. OpenVINO and ONNX Runtime keep their converted models in ``model_cache``. With
    ``attention`` each row also holds its logits on the map (see
    :func:`pooled_output`).
    """
    module, width, _ = pooled_output(backbone, attention)
    extractor = _extractor(
        module, backbone, (width,), precision, device, runtime, model_cache=model_cache, calibration=calibration
    )
    if processes is None:
        processes = usable_cores() if workers > 0 else 0
    features = np.zeros((len(image_ids), width), dtype=np.float16)
    readable = np.ones(len(image_ids), dtype=bool)
    units = _units([(0, range(len(image_ids)))], len(views), _unit_size(extractor, batch_size, processes))
    for unit, pooled, ok in _run_units(extractor, paths, image_ids, views, units, workers, processes, description):
        _mean_into(features, slice(unit.start, unit.stop), unit.view, pooled)
        readable[unit.start : unit.stop] &= ok.numpy()
    features[~readable] = np.nan
    return torch.from_numpy(features), torch.from_numpy(readable)


def extract_into_store(
    extractor: _Extractor,
    paths: DatasetPaths,
    image_ids: Sequence[str],
    views: Sequence[str],
    store: ShardedStore,
    shards: Sequence[int],
    batch_size: int,
    workers: int,
    processes: int,
    description: str,
    show_progress: bool = True,
) -> None:
    """Extract shards ``shards`` of ``store``: pooled features averaged over the views (field
    ``features``) or one field of maps per view, and ``readable``. Each shard is renamed into
    place as soon as its last unit is in, so an interruption loses at most the shard being
    written."""
    units = _units(
        [(k, store.shard_range(k)) for k in shards], len(views), _unit_size(extractor, batch_size, processes)
    )
    stream = _run_units(extractor, paths, image_ids, views, units, workers, processes, description, show_progress)
    for shard, pieces in itertools.groupby(stream, key=lambda piece: piece[0].shard):
        first = store.shard_range(shard).start
        with store.write_shard(shard) as arrays:
            readable = arrays["readable"]
            readable[:] = True
            for unit, outputs, ok in pieces:
                rows = slice(unit.start - first, unit.stop - first)
                if extractor.pooled_output:
                    _mean_into(arrays["features"], rows, unit.view, outputs)
                else:
                    arrays[views[unit.view]][rows] = outputs.numpy()
                readable[rows] &= ok.numpy()
            if extractor.pooled_output:
                arrays["features"][~readable] = np.nan


def _cached_store(
    kind: str,
    key: dict,
    fields: dict[str, Field],
    module: torch.nn.Module,
    backbone: Backbone,
    output_shape: tuple[int, ...],
    paths: DatasetPaths,
    image_ids: Sequence[str],
    settings: ExtractionSettings,
    description: str,
    context: DistContext,
) -> ShardedStore:
    """The complete store of ``key``: read when it is there and every file matches its digest,
    else its missing and damaged shards extracted by ``module`` (the backbone, or its front,
    whose output per image is ``output_shape``) as ``settings`` say.

    One run at a time writes a store: its rank 0 holds the store's :func:`write_lock`, and
    another run that needs the store meanwhile waits, then reads what the first wrote. Under
    torchrun rank 0 creates the store, the ranks take the shards to extract in turn, and every
    rank then reads the whole store: the ranks must share a file system.
    """
    directory = _store_dir(settings.cache_dir, kind, key)
    store = ShardedStore.open_complete(directory, key, len(image_ids))
    # Decided together (which also makes every rank look before rank 0 may change the store); a
    # yes includes this rank's, so its store is there.
    if all_ranks_agree(store is not None and not store.damaged_shards(), context) and store is not None:
        log.info("%s cache hit: %s (%d images)", kind, directory, len(image_ids))
        return store
    with write_lock(directory) if context.is_main else contextlib.nullcontext():
        if context.is_main:
            ShardedStore.create(directory, key, len(image_ids), settings.shard_rows or shard_rows_for(fields), fields)
        barrier(context)
        store = ShardedStore.open(directory, key)
        if store is None:
            raise CheckpointError(
                f"{directory}: the cache rank 0 created cannot be read; under torchrun on several "
                "machines --weights-dir must be on a shared file system"
            )
        store = dataclasses.replace(store, keeps_manifest=context.is_main)
        missing = store.missing_shards()
        damaged = store.damaged_shards([k for k in range(store.num_shards) if k not in missing])
        if context.is_main:
            for problem in itertools.chain.from_iterable(damaged.values()):
                log.warning("%s cache: %s; extracting its shard again", kind, problem)
        todo = sorted([*missing, *damaged])
        if all_ranks_agree(not todo, context):
            log.info("%s cache hit: %s (%d images, written by another run meanwhile)", kind, directory, len(image_ids))
            return store
        if len(todo) < store.num_shards:
            log.info("%s cache: resuming, %d of %d shards to extract", kind, len(todo), store.num_shards)
        barrier(context)  # every rank has listed the same shards before any is written
        extractor = _extractor(
            module,
            backbone,
            output_shape,
            settings.precision,
            settings.device,
            settings.runtime,
            settings.cache_dir,
            settings.calibration,
        )
        extract_into_store(
            extractor,
            paths,
            image_ids,
            settings.views,
            store,
            todo[context.rank :: context.world_size],
            settings.batch_size,
            settings.workers,
            _processes(settings.workers),
            description,
            context.is_main,
        )
        barrier(context)
        if context.distributed:
            if context.is_main:
                store.adopt([k for i, k in enumerate(todo) if i % context.world_size])
            barrier(context)
            if not context.is_main:  # the digests rank 0 recorded
                store = ShardedStore.open(directory, key) or store
        if any(not store.shard_complete(shard) for shard in todo):
            raise CheckpointError(
                f"{directory}: shards written by other ranks are missing; under torchrun on "
                "several machines --weights-dir must be on a shared file system"
            )
    log.info("%s cache written: %s (%.1f MB)", kind, directory, store.disk_bytes() / 1e6)
    return store


@dataclass(frozen=True)
class CachedFeatures:
    """Cached pooled features (N, D) float16, read from disk a batch of rows at a time.

    Indexed like a tensor with an array of rows, a slice or a row; ``digest`` names the
    content (the cache key's digest).
    """

    store: ShardedStore

    @property
    def shape(self) -> tuple[int, int]:
        (width,) = self.store.fields["features"].shape  # one vector (D,) per row
        return (self.store.num_rows, width)

    @property
    def digest(self) -> str:
        return _key_digest(self.store.key)

    def __len__(self) -> int:
        return self.store.num_rows

    def __getitem__(self, index: np.ndarray | Sequence[int] | slice | int) -> torch.Tensor:
        if isinstance(index, slice):
            return torch.from_numpy(self.store.read("features", np.arange(len(self))[index]))
        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(self.store.read("features", [int(index)])[0])
        return torch.from_numpy(self.store.read("features", np.asarray(index)))


def pooled_output(backbone: Backbone, attention: ClassAttention | None = None) -> tuple[torch.nn.Module, int, str]:
    """(the module extraction runs, the width of its rows, the cache key's name for them): the
    backbone and its avg+max pooled features (2C), or with a class attention (CSRA) the pooled
    features followed by the attention's logits (2C + L), named with the attention's digest."""
    if attention is None:
        return backbone.module, backbone.pooled_dim, "avg+max"
    attention = attention.cpu().eval()
    return (
        AttentionPooled(backbone.module, attention),
        backbone.pooled_dim + attention.num_labels,
        f"avg+max+csra-{state_digest(attention)}",
    )


def _features_key(
    backbone: Backbone, paths: DatasetPaths, image_ids: Sequence[str], settings: ExtractionSettings, output: str
) -> dict:
    return cache_key(
        backbone,
        [paths.image_path(image_id) for image_id in image_ids],
        settings.views,
        settings.precision,
        output=output,
        runtime=settings.runtime,
        calibration=settings.calibration,
    )


def _pooled_fields(width: int) -> dict[str, Field]:
    # Float16 halves the bytes; the heads train in fp32 and do not notice the rounding.
    return {"features": Field((width,), "float16"), "readable": Field((), "bool")}


def cached_features(
    backbone: Backbone,
    paths: DatasetPaths,
    image_ids: Sequence[str],
    settings: ExtractionSettings,
    *,
    description: str = "features",
    context: DistContext = DistContext(),
    attention: ClassAttention | None = None,
) -> tuple[CachedFeatures, torch.Tensor]:
    """(features (N, 2C) float16 read from the cache a batch at a time, readable (N,)): from
    the cache when it is complete, else its missing shards extracted first, as ``settings``
    say. With ``attention``, rows of (N, 2C + L): the attention's logits follow
    (:func:`pooled_output`)."""
    module, width, output = pooled_output(backbone, attention)
    key = _features_key(backbone, paths, image_ids, settings, output)
    store = _cached_store(
        "features",
        key,
        _pooled_fields(width),
        module,
        backbone,
        (width,),
        paths,
        image_ids,
        settings,
        description,
        context,
    )
    return CachedFeatures(store), torch.from_numpy(store.read_all("readable"))


def has_cached_features(
    backbone: Backbone,
    paths: DatasetPaths,
    image_ids: Sequence[str],
    settings: ExtractionSettings,
    *,
    attention: ClassAttention | None = None,
) -> bool:
    """True when :func:`cached_features` would read these images' features from the cache."""
    key = _features_key(backbone, paths, image_ids, settings, pooled_output(backbone, attention)[2])
    return ShardedStore.open_complete(_store_dir(settings.cache_dir, "features", key), key, len(image_ids)) is not None


@dataclass(frozen=True)
class StageMaps:
    """Cached stage maps of a list of images: (N, C, h, w) float16 per view, read a batch of
    rows at a time, and which images could be read (the others' maps are NaN)."""

    store: ShardedStore
    views: tuple[str, ...]
    readable: np.ndarray  # (N,) bool

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.store.num_rows, *self.store.fields[self.views[0]].shape)

    def read(self, view: str, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """The maps (len(rows), C, h, w) of rows ``rows`` in view ``view``."""
        return self.store.read(view, rows)


def cached_stage_maps(
    backbone: Backbone,
    front: torch.nn.Module,
    stage: int,
    paths: DatasetPaths,
    image_ids: Sequence[str],
    settings: ExtractionSettings,
    *,
    description: str = "stage maps",
    context: DistContext = DistContext(),
) -> StageMaps:
    """The maps ``front`` (the backbone's first ``stage`` stages) computes for every image and
    view, from the cache when it is complete, else its missing shards extracted first, as
    ``settings`` say."""
    files = [paths.image_path(image_id) for image_id in image_ids]
    key = cache_key(
        backbone,
        files,
        settings.views,
        settings.precision,
        output=f"stage{stage}",
        runtime=settings.runtime,
        calibration=settings.calibration,
    )
    map_shape = _map_shape(front, backbone)
    fields = {**{view: Field(map_shape, "float16") for view in settings.views}, "readable": Field((), "bool")}
    store = _cached_store(
        "stagemaps",
        key,
        fields,
        front,
        backbone,
        map_shape,
        paths,
        image_ids,
        settings,
        description,
        context,
    )
    return StageMaps(store, tuple(settings.views), store.read_all("readable").astype(bool))


def _map_shape(front: torch.nn.Module, backbone: Backbone) -> tuple[int, ...]:
    """The shape (C, h, w) of the maps ``front`` computes for one image at the backbone's resolution."""
    resolution = backbone.preprocessing["resolution"]
    with torch.no_grad():
        return tuple(front.eval()(torch.zeros(1, 3, resolution, resolution)).shape[1:])


def extract_stage_maps(
    backbone: Backbone,
    front: torch.nn.Module,
    paths: DatasetPaths,
    image_ids: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 2,
    view: str = "plain",
    description: str = "stage maps",
    precision: str = "fp32",
    runtime: str = "torch",
    model_cache: Path | None = None,
    calibration: Calibration | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, C, h, w) float16, readable (N,) bool) of ``front`` for the images in one view,
    computed as :func:`cached_stage_maps` computes them but held in memory: for a few images, not
    a dataset. An unreadable image's maps are NaN, never computed."""
    map_shape = _map_shape(front, backbone)
    extractor = _extractor(front, backbone, map_shape, precision, device, runtime, model_cache, calibration)
    processes = usable_cores() if workers > 0 else 0
    maps = np.zeros((len(image_ids), *map_shape), dtype=np.float16)
    readable = np.ones(len(image_ids), dtype=bool)
    units = _units([(0, range(len(image_ids)))], 1, _unit_size(extractor, batch_size, processes))
    for unit, outputs, ok in _run_units(extractor, paths, image_ids, [view], units, workers, processes, description):
        maps[unit.start : unit.stop] = outputs.numpy()
        readable[unit.start : unit.stop] = ok.numpy()
    return maps, readable
