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
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.checkpoint import CheckpointError, atomic_torch_save, safe_torch_load
from pipeline.data import DatasetPaths, ImageDataset
from pipeline.distributed import DistContext, barrier, gather_shards
from pipeline.models.backbones import Backbone, fuse_for_inference
from pipeline.runtime import autocast_context
from pipeline.transforms import build_transform

log = logging.getLogger(__name__)

CACHE_VERSION = 1
VIEWS = ("plain", "flip")


def pool_features(feature_map: torch.Tensor) -> torch.Tensor:
    """Average and max pooling concatenated: (B, C, h, w) -> (B, 2C).

    Max pooling keeps the evidence of small objects that the average washes out, which
    matters when an image holds several labels.
    """
    return torch.cat([feature_map.mean(dim=(2, 3)), feature_map.amax(dim=(2, 3))], dim=1)


def cache_key(backbone: Backbone, files: Sequence[Path], views: Sequence[str]) -> dict:
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


@torch.inference_mode()
def extract_features(backbone: Backbone, paths: DatasetPaths, image_ids: Sequence[str], device: torch.device,
                     batch_size: int = 64, workers: int = 2, views: Sequence[str] = VIEWS,
                     description: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, 2C) averaged over the views (plain and mirrored), and a (N,) bool
    mask of the images that could be read (the others' features are NaN)."""
    size = backbone.preprocessing["resolution"]
    model = fuse_for_inference(backbone.module, size).to(device).to(memory_format=torch.channels_last)
    total: torch.Tensor | None = None
    readable = torch.ones(len(image_ids), dtype=torch.bool)
    for view in views:
        transform = build_transform(backbone.preprocessing, flip=(view == "flip"))
        loader = DataLoader(
            ImageDataset(paths, list(image_ids), transform, size), batch_size=batch_size, num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        parts = []
        for images, index, ok in tqdm(loader, desc=f"{description} ({view})", unit="batch"):
            pooled_batch = torch.full((len(index), 2 * backbone.feature_dim), float("nan"))  # (B, 2C)
            if ok.any():  # blank stand-ins for unreadable files are not worth a forward pass
                images = images[ok].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with autocast_context(device):
                    pooled_batch[ok] = pool_features(model(images)).float().cpu()
            parts.append(pooled_batch)
            readable[index[~ok]] = False
        pooled = torch.cat(parts) if parts else torch.zeros(0, 2 * backbone.feature_dim)
        total = pooled if total is None else total + pooled
    features = total / len(views)
    features[~readable] = float("nan")
    return features, readable


def cached_features(backbone: Backbone, paths: DatasetPaths, image_ids: Sequence[str], cache_dir: Path,
                    device: torch.device, batch_size: int = 64, workers: int = 2,
                    views: Sequence[str] = VIEWS, description: str = "features",
                    context: DistContext = DistContext()) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 2C), readable (N,)) from the cache when it matches, else extracted and cached.

    Under torchrun each rank extracts its contiguous share of the images and the shares are
    gathered on every rank; rank 0 alone writes the cache.
    """
    files = [paths.image_path(image_id) for image_id in image_ids]
    key = cache_key(backbone, files, views)
    path = _cache_file(Path(cache_dir), key)
    cached = _load_cached(path, key)
    barrier(context)  # every rank has looked before rank 0 may write a new cache
    if cached is not None:
        log.info("feature cache hit: %s (%d images)", path, len(files))
        return cached["features"].float(), cached["readable"]
    shard = context.shard(len(image_ids))
    features, readable = extract_features(backbone, paths, [image_ids[i] for i in shard], device, batch_size,
                                          workers, views, description)
    # fp16 halves the file; the heads train in fp32 and do not notice the rounding.
    features = gather_shards(features.half().to(device), context, len(image_ids)).cpu()
    readable = gather_shards(readable.to(device, torch.uint8), context, len(image_ids)).cpu().bool()
    if context.is_main:
        atomic_torch_save({"key": key, "image_ids": list(image_ids), "features": features, "readable": readable},
                          path)
        log.info("feature cache written: %s", path)
    return features.float(), readable
