"""Frozen-backbone feature extraction and its on-disk cache.

Extraction is the slow part of the CPU recipe (about 20-40 ms an image), so features are
computed once per (backbone, weights, preprocessing, pooling, views, image list) and kept
in ``weights/cache/``. The key is stored inside the file and checked on load; a file that
is cut off or does not match is rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.checkpoint import CheckpointError, atomic_torch_save, safe_torch_load
from pipeline.data import DatasetPaths, ImageDataset
from pipeline.distributed import DistContext, all_ranks_agree, gather_shards
from pipeline.models.backbones import Backbone, fuse_for_inference
from pipeline.runtime import autocast_context
from pipeline.transforms import build_transform, normalize_batch

log = logging.getLogger(__name__)

CACHE_VERSION = 1
VIEWS = ("plain", "flip")


def pool_features(feature_map: torch.Tensor) -> torch.Tensor:
    """Average and max pooling concatenated: (B, C, h, w) -> (B, 2C).

    Max pooling keeps the evidence of small objects that the average washes out, which
    matters when an image holds several labels.
    """
    return torch.cat([feature_map.mean(dim=(2, 3)), feature_map.amax(dim=(2, 3))], dim=1)


def cache_key(backbone: Backbone, files: Sequence[Path], views: Sequence[str], precision: str = "fp32") -> dict:
    """Everything the features depend on, including each file's size and modification time."""
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
        "pooling": "avg+max",
        "views": list(views),
        "num_images": len(files),
        "images_digest": listing.hexdigest(),
    }


def _cache_file(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"features-{key['backbone']}-{digest}.pt"


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


# Images per forward pass (and per hand-over to the main process) when extracting on CPU.
# Measured on 2 EPYC cores with freed memory reused (runtime.reuse_freed_memory): 32 was the
# fastest of 8..64 in bf16 (the per-chunk overhead shows below ~16) and as fast as any in fp32.
CPU_BATCH = 32


@dataclass
class _Extractor:
    """The inference-ready backbone and how to feed it."""

    model: torch.nn.Module  # batch norm folded, channels_last
    preprocessing: dict
    feature_dim: int
    precision: str
    device: torch.device

    def pooled(self, images: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 2C) of a uint8 batch; NaN rows for unreadable images (never run)."""
        pooled = torch.full((len(ok), 2 * self.feature_dim), float("nan"))  # (B, 2C)
        if ok.any():
            batch = normalize_batch(images[ok].to(self.device, non_blocking=True), self.preprocessing)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast_context(self.device, self.precision):
                pooled[ok] = pool_features(self.model(batch)).float().cpu()
        return pooled


class _PooledChunks(torch.utils.data.Dataset):
    """Item ``k``: (pooled features, row indices, readable) of the ``k``-th chunk of images,
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
        return self.extractor.pooled(images, ok), torch.tensor(list(rows)), ok


def _batches(dataset: ImageDataset, extractor: _Extractor, batch_size: int, workers: int,
             processes: int) -> tuple[Iterator, int]:
    """(iterator, length) of (pooled features, indices, readable) batches of ``dataset``."""
    if extractor.device.type == "cpu" and processes > 0:
        chunks = _PooledChunks(dataset, extractor, min(batch_size, CPU_BATCH))
        loader = DataLoader(chunks, batch_size=None, num_workers=processes, prefetch_factor=4)
        return iter(loader), len(chunks)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        pin_memory=extractor.device.type == "cuda")
    return ((extractor.pooled(images, ok), index, ok) for images, index, ok in loader), len(loader)


def extract_features(backbone: Backbone, paths: DatasetPaths, image_ids: Sequence[str], device: torch.device,
                     batch_size: int = 64, workers: int = 2, views: Sequence[str] = VIEWS,
                     description: str = "features", precision: str = "fp32",
                     processes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, 2C) averaged over the views (plain and mirrored), and a (N,) bool
    mask of the images that could be read (the others' features are NaN, never computed).

    The backbone runs with batch norm folded, channels_last, in inference mode, in
    ``precision``. On GPU, ``workers`` processes decode and the GPU runs the forward. On
    CPU, ``processes`` single-threaded workers (default: one per core; with ``workers=0``,
    none) each decode and run their own chunks, and the main process only collects.
    """
    size = backbone.preprocessing["resolution"]
    model = fuse_for_inference(backbone.module, size).to(device).to(memory_format=torch.channels_last)
    extractor = _Extractor(model, backbone.preprocessing, backbone.feature_dim, precision, device)
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if workers > 0 else 0
    total: torch.Tensor | None = None
    readable = torch.ones(len(image_ids), dtype=torch.bool)
    for view in views:
        transform = build_transform(backbone.preprocessing, flip=(view == "flip"), normalize=False)
        dataset = ImageDataset(paths, list(image_ids), transform, size, blank_dtype=torch.uint8)
        batches, count = _batches(dataset, extractor, batch_size, workers, processes)
        parts = []
        for pooled, index, ok in tqdm(batches, total=count, desc=f"{description} ({view})", unit="batch"):
            parts.append(pooled)
            readable[index[~ok]] = False
        features = torch.cat(parts) if parts else torch.zeros(0, 2 * backbone.feature_dim)
        total = features if total is None else total + features
    features = total / len(views)
    features[~readable] = float("nan")
    return features, readable


def cached_features(backbone: Backbone, paths: DatasetPaths, image_ids: Sequence[str], cache_dir: Path,
                    device: torch.device, batch_size: int = 64, workers: int = 2,
                    views: Sequence[str] = VIEWS, description: str = "features",
                    context: DistContext = DistContext(), precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 2C), readable (N,)) from the cache when it matches, else extracted and cached.

    Under torchrun each rank extracts its contiguous share of the images and the shares are
    gathered on every rank; rank 0 alone writes the cache.
    """
    files = [paths.image_path(image_id) for image_id in image_ids]
    key = cache_key(backbone, files, views, precision)
    path = _cache_file(Path(cache_dir), key)
    cached = _load_cached(path, key)
    # Decided together (which also makes every rank look before rank 0 may write a new cache).
    if all_ranks_agree(cached is not None, context, device):
        log.info("feature cache hit: %s (%d images)", path, len(files))
        return cached["features"].float(), cached["readable"]
    shard = context.shard(len(image_ids))
    # The cores are shared among the ranks of one machine.
    processes = max(1, len(os.sched_getaffinity(0)) // context.world_size) if workers > 0 else 0
    features, readable = extract_features(backbone, paths, [image_ids[i] for i in shard], device, batch_size,
                                          workers, views, description, precision, processes)
    # fp16 halves the file; the heads train in fp32 and do not notice the rounding.
    features = gather_shards(features.half().to(device), context, len(image_ids)).cpu()
    readable = gather_shards(readable.to(device, torch.uint8), context, len(image_ids)).cpu().bool()
    if context.is_main:
        atomic_torch_save({"key": key, "image_ids": list(image_ids), "features": features, "readable": readable},
                          path)
        log.info("feature cache written: %s", path)
    return features.float(), readable
