"""Frozen-backbone extraction and its on-disk caches.

Running the backbone is the slow part of the CPU recipe, so its outputs are computed once
per (backbone, weights, preprocessing, precision, output, views, image list) and kept in
``weights/cache/``:

- pooled features (``features-*.pt``, frozen mode and inference): avg+max pooled vectors
  of the whole backbone, averaged over the views;
- stage maps (``stagemaps-*/``, partial mode): the feature maps of the frozen front of the
  backbone, one memory-mapped float16 array per view, read batch by batch while the tail
  trains, so they never have to fit in memory.

The key is stored with the data and checked on load; a cache that is cut off or does not
match is rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.data.dataset import DatasetPaths
from pipeline.data.images import ImageDataset
from pipeline.data.transforms import build_transform, normalize_batch
from pipeline.engine.distributed import DistContext, all_ranks_agree, barrier, gather_shards, workers_per_process
from pipeline.engine.runtime import autocast_context
from pipeline.io import CheckpointError, atomic_torch_save, safe_torch_load, write_json
from pipeline.models.backbones import Backbone, fuse_for_inference
from pipeline.models.image_model import pool_features

log = logging.getLogger(__name__)

CACHE_VERSION = 1
VIEWS = ("plain", "flip")


def cache_key(backbone: Backbone, files: Sequence[Path], views: Sequence[str], precision: str = "fp32",
              output: str = "avg+max") -> dict:
    """Everything the features depend on, including each file's size and modification time.

    ``output`` is what is kept of the backbone: ``avg+max`` pooled features of the whole
    backbone, or ``stageK`` for the feature maps after its first K stages.
    """
    listing = hashlib.sha256()
    for path in files:
        stat = path.stat() if path.exists() else None
        listing.update(f"{path.name}\0{stat.st_size if stat else -1}\0{stat.st_mtime_ns if stat else -1}\n".encode())
    return {
        "cache_version": CACHE_VERSION,
        "backbone": backbone.name,
        "weights": backbone.weights_digest,
        "preprocessing": backbone.preprocessing,
        "precision": precision,
        "pooling": output,
        "views": list(views),
        "num_images": len(files),
        "images_digest": listing.hexdigest(),
    }


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _cache_file(cache_dir: Path, key: dict) -> Path:
    return cache_dir / f"features-{key['backbone']}-{_key_digest(key)}.pt"


def _load_cached(path: Path, key: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        cached = safe_torch_load(path)
    except CheckpointError as err:
        log.warning("feature cache unreadable (%s); rebuilding it", err)
        return None
    if (not isinstance(cached, dict) or cached.get("key") != key
            or not isinstance(cached.get("features"), torch.Tensor)
            or cached["features"].shape[0] != key["num_images"]
            or not isinstance(cached.get("readable"), torch.Tensor)):
        log.warning("feature cache %s does not match these images/settings; rebuilding it", path)
        return None
    return cached


# Images per forward pass (and per hand-over to the main process) when extracting on CPU:
# below about 16 the per-chunk overhead shows, and larger chunks gain nothing (README,
# "What makes the CPU extraction fast").
CPU_BATCH = 32


@dataclass
class _Extractor:
    """The inference-ready backbone (or its front) and how to feed it."""

    model: torch.nn.Module  # batch norm folded, channels_last
    preprocessing: dict
    output_shape: tuple[int, ...]  # per image: (2C,) pooled, or (C, h, w) maps
    precision: str
    device: torch.device

    @property
    def pooled_output(self) -> bool:
        return len(self.output_shape) == 1

    def run(self, images: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Outputs of a uint8 batch: pooled features (B, 2C) in float32, or maps (B, C, h, w)
        in float16 (half the bytes to keep); NaN rows for unreadable images (never run)."""
        dtype = torch.float32 if self.pooled_output else torch.float16
        out = torch.full((len(ok), *self.output_shape), float("nan"), dtype=dtype)
        if ok.any():
            batch = normalize_batch(images[ok].to(self.device, non_blocking=True), self.preprocessing)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast_context(self.device, self.precision):
                result = self.model(batch)
                result = pool_features(result) if self.pooled_output else result
            out[ok] = result.to(dtype).cpu()
        return out


class _ExtractedChunks(torch.utils.data.Dataset):
    """Item ``k``: (outputs, row indices, readable) of the ``k``-th chunk of images,
    computed entirely inside a DataLoader worker process (decode, resize and forward).

    On CPU this beats decoding in workers and running a multi-threaded forward in the main
    process: each worker uses one thread, so no core waits at intra-op barriers, and no
    decoding process preempts a thread the others are waiting for.
    """

    def __init__(self, images: ImageDataset, extractor: _Extractor, chunk: int) -> None:
        self.images, self.extractor, self.chunk = images, extractor, chunk

    def __len__(self) -> int:
        return -(-len(self.images) // self.chunk)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = range(k * self.chunk, min(len(self.images), (k + 1) * self.chunk))
        items = [self.images[i] for i in rows]
        images = torch.stack([image for image, _, _ in items])  # (B, 3, R, R) uint8
        ok = torch.tensor([readable for _, _, readable in items], dtype=torch.bool)
        return self.extractor.run(images, ok), torch.tensor(list(rows)), ok


def _batches(dataset: ImageDataset, extractor: _Extractor, batch_size: int, workers: int,
             processes: int) -> tuple[Iterator, int]:
    """(iterator, length) of (outputs, indices, readable) batches of ``dataset``."""
    if extractor.device.type == "cpu" and processes > 0:
        chunks = _ExtractedChunks(dataset, extractor, min(batch_size, CPU_BATCH))
        loader = DataLoader(chunks, batch_size=None, num_workers=processes, prefetch_factor=4)
        return iter(loader), len(chunks)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        pin_memory=extractor.device.type == "cuda", prefetch_factor=4 if workers else None)
    return ((extractor.run(images, ok), index, ok) for images, index, ok in loader), len(loader)


def _extractor(module: torch.nn.Module, backbone: Backbone, output_shape: tuple[int, ...], precision: str,
               device: torch.device) -> _Extractor:
    model = fuse_for_inference(module, backbone.preprocessing["resolution"]).to(device)
    return _Extractor(model.to(memory_format=torch.channels_last), backbone.preprocessing, output_shape,
                      precision, device)


def _view_batches(extractor: _Extractor, paths: DatasetPaths, image_ids: Sequence[str], view: str,
                  batch_size: int, workers: int, processes: int) -> tuple[Iterator, int]:
    """(outputs, indices, readable) batches of one view (plain or mirrored) of the images."""
    transform = build_transform(extractor.preprocessing, flip=(view == "flip"), normalize=False)
    dataset = ImageDataset(paths, list(image_ids), transform, extractor.preprocessing["resolution"],
                           blank_dtype=torch.uint8)
    return _batches(dataset, extractor, batch_size, workers, processes)


def _processes(workers: int) -> int:
    """Single-threaded extraction processes of this rank on CPU: one per core, the cores
    shared among the ranks of this machine (none with ``workers=0``)."""
    return workers_per_process(len(os.sched_getaffinity(0))) if workers > 0 else 0


def extract_features(backbone: Backbone, paths: DatasetPaths, image_ids: Sequence[str], device: torch.device,
                     batch_size: int = 64, workers: int = 2, views: Sequence[str] = VIEWS,
                     description: str = "features", precision: str = "fp32",
                     processes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, 2C) in float16, averaged over the views (plain and mirrored), and a
    (N,) bool mask of the images that could be read (the others' features are NaN, never computed).

    The backbone runs with batch norm folded, channels_last, in inference mode, in
    ``precision``. On GPU, ``workers`` processes decode and the GPU runs the forward. On
    CPU, ``processes`` single-threaded workers (default: one per core; with ``workers=0``,
    none) each decode and run their own chunks, and the main process only collects.
    """
    extractor = _extractor(backbone.module, backbone, (2 * backbone.feature_dim,), precision, device)
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if workers > 0 else 0
    # Written in place, a batch at a time, in the precision the cache keeps: the only copy of
    # the set this function ever holds.
    features = torch.zeros(len(image_ids), 2 * backbone.feature_dim, dtype=torch.float16)
    readable = torch.ones(len(image_ids), dtype=torch.bool)
    for number, view in enumerate(views):
        batches, count = _view_batches(extractor, paths, image_ids, view, batch_size, workers, processes)
        for pooled, index, ok in tqdm(batches, total=count, desc=f"{description} ({view})", unit="batch"):
            # The running mean over the views seen so far (one view: the features themselves).
            features[index] = ((features[index].float() * number + pooled) / (number + 1)).half()
            readable[index[~ok]] = False
    features[~readable] = float("nan")
    return features, readable


def cached_features(backbone: Backbone, paths: DatasetPaths, image_ids: Sequence[str], cache_dir: Path,
                    device: torch.device, batch_size: int = 64, workers: int = 2,
                    views: Sequence[str] = VIEWS, description: str = "features",
                    context: DistContext = DistContext(), precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 2C) float16, as cached, and readable (N,)) from the cache when it matches,
    else extracted and cached. Callers widen a batch at a time, so a large set is never held
    in float32 at once.

    Under torchrun each rank extracts its contiguous share of the images and the shares are
    gathered on every rank; rank 0 alone writes the cache.
    """
    files = [paths.image_path(image_id) for image_id in image_ids]
    key = cache_key(backbone, files, views, precision)
    path = _cache_file(Path(cache_dir), key)
    cached = _load_cached(path, key)
    # Decided together (which also makes every rank look before rank 0 may write a new cache).
    if all_ranks_agree(cached is not None, context):
        log.info("feature cache hit: %s (%d images)", path, len(files))
        return cached["features"], cached["readable"]
    shard = context.shard(len(image_ids))
    features, readable = extract_features(backbone, paths, [image_ids[i] for i in shard], device, batch_size,
                                          workers, views, description, precision, _processes(workers))
    # fp16 halves the file; the heads train in fp32 and do not notice the rounding.
    features = gather_shards(features, context, len(image_ids))
    readable = gather_shards(readable.to(torch.uint8), context, len(image_ids)).bool()
    if context.is_main:
        atomic_torch_save({"key": key, "image_ids": list(image_ids), "features": features, "readable": readable},
                          path)
        log.info("feature cache written: %s", path)
    return features, readable


def has_cached_features(backbone: Backbone, paths: DatasetPaths, image_ids: Sequence[str], cache_dir: Path,
                        views: Sequence[str], precision: str) -> bool:
    """True when :func:`cached_features` would read these images' features from the cache."""
    key = cache_key(backbone, [paths.image_path(i) for i in image_ids], views, precision)
    path = _cache_file(Path(cache_dir), key)
    return path.is_file() and _load_cached(path, key) is not None


@dataclass(frozen=True)
class StageMaps:
    """Cached stage maps of a list of images: one memory-mapped (N, C, h, w) float16 array per
    view in ``directory``, and which images could be read (the others' maps are NaN)."""

    directory: Path
    views: tuple[str, ...]
    shape: tuple[int, ...]  # (N, C, h, w)
    readable: np.ndarray  # (N,) bool

    def array(self, view: str) -> np.ndarray:
        """The maps of one view, read from disk page by page as rows are indexed."""
        return np.load(self.directory / f"{view}.npy", mmap_mode="r")


_KEY_FILE = "key.json"


def _stage_dir(cache_dir: Path, key: dict) -> Path:
    return cache_dir / f"stagemaps-{key['backbone']}-{key['pooling']}-{_key_digest(key)}"


def _load_stage_maps(directory: Path, key: dict) -> StageMaps | None:
    """The cached maps when every file is there, complete and made for ``key``; else None."""
    key_file = directory / _KEY_FILE
    if not key_file.is_file():
        return None
    try:
        stored = json.loads(key_file.read_text())
        readable = np.load(directory / "readable.npy")
        shapes = {tuple(np.load(directory / f"{view}.npy", mmap_mode="r").shape) for view in key["views"]}
    except (OSError, ValueError) as err:
        log.warning("stage-map cache %s unreadable (%s); rebuilding it", directory, err)
        return None
    if stored.get("key") != key or len(shapes) != 1 or readable.shape != (key["num_images"],) \
            or next(iter(shapes))[0] != key["num_images"]:
        log.warning("stage-map cache %s does not match these images/settings; rebuilding it", directory)
        return None
    return StageMaps(directory, tuple(key["views"]), next(iter(shapes)), readable.astype(bool))


def cached_stage_maps(backbone: Backbone, front: torch.nn.Module, stage: int, paths: DatasetPaths,
                      image_ids: Sequence[str], cache_dir: Path, device: torch.device, batch_size: int = 64,
                      workers: int = 2, views: Sequence[str] = VIEWS, description: str = "stage maps",
                      context: DistContext = DistContext(), precision: str = "fp32") -> StageMaps:
    """The maps ``front`` (the backbone's first ``stage`` stages) computes for every image and
    view, from the cache when it matches, else extracted into it.

    The arrays are written in place as memory maps (``.partial`` files, renamed when
    complete) and the key file is written last, so a cache interrupted at any point is
    rebuilt. Under torchrun rank 0 creates the files, each rank writes its contiguous
    share of the rows, and rank 0 completes the cache; the ranks must share a file system.
    """
    files = [paths.image_path(image_id) for image_id in image_ids]
    key = cache_key(backbone, files, views, precision, output=f"stage{stage}")
    directory = _stage_dir(Path(cache_dir), key)
    cached = _load_stage_maps(directory, key)
    if all_ranks_agree(cached is not None, context):
        log.info("stage-map cache hit: %s (%d images)", directory, len(files))
        return cached

    resolution = backbone.preprocessing["resolution"]
    with torch.no_grad():
        probe = front.eval()(torch.zeros(1, 3, resolution, resolution))
    shape = (len(image_ids), *probe.shape[1:])
    partial = {name: directory / f".{name}.npy.partial" for name in (*views, "readable")}
    if context.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _KEY_FILE).unlink(missing_ok=True)
        for view in views:
            np.lib.format.open_memmap(partial[view], mode="w+", dtype=np.float16, shape=shape).flush()
        np.lib.format.open_memmap(partial["readable"], mode="w+", dtype=np.bool_, shape=(len(image_ids),)).flush()
    barrier(context)
    shard = context.shard(len(image_ids))
    rows = shard[0] if len(shard) else 0
    extractor = _extractor(front, backbone, tuple(shape[1:]), precision, device)
    processes = _processes(workers)
    readable = np.lib.format.open_memmap(partial["readable"], mode="r+")
    readable[shard] = True
    for view in views:
        target = np.lib.format.open_memmap(partial[view], mode="r+")
        batches, count = _view_batches(extractor, paths, [image_ids[i] for i in shard], view, batch_size,
                                       workers, processes)
        for maps, index, ok in tqdm(batches, total=count, desc=f"{description} ({view})", unit="batch",
                                    disable=not context.is_main):
            target[rows + index.numpy()] = maps.numpy()
            readable[rows + index[~ok].numpy()] = False
        target.flush()
        del target
    readable.flush()
    del readable
    barrier(context)
    if context.is_main:
        for name, path in partial.items():
            os.replace(path, directory / f"{name}.npy")
        write_json(directory / _KEY_FILE, {"key": key, "shape": list(shape)})
        log.info("stage-map cache written: %s (%.1f GB)", directory,
                 len(views) * np.prod(shape) * 2 / 1e9)
    barrier(context)
    maps = _load_stage_maps(directory, key)
    if maps is None:
        raise CheckpointError(f"{directory}: the stage-map cache could not be read back; under torchrun on several "
                              "machines --weights must be on a shared file system")
    return maps
