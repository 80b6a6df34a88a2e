"""What the image branch trains on: the train/validation images of a run, which of them can
be read, and the labelled inputs of each mode.

- ``frozen``: rows of cached pooled features (:class:`FeatureRows`);
- ``partial``: the cached output maps of the backbone's first stages, each image seen plain
  or mirrored at random (:class:`LabelledMaps`, :class:`RandomViewSampler`);
- ``finetune``: whole images, decoded by loader workers (:class:`LabelledImages`) and augmented
  a batch at a time on the device (:class:`~pipeline.data.augment.BatchAugment`).

:class:`TrainingInputs` bundles the last two with how a batch becomes the trunk's input.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pipeline.branches.image import image_caption_vectors
from pipeline.data.augment import BatchAugment
from pipeline.data.dataset import CAPTION_COLUMN, DatasetPaths, LabelSet, group_by_image, load_train_val
from pipeline.data.images import ImageDataset, ImageReadError
from pipeline.data.transforms import build_transform, normalize_batch, stack_pixels
from pipeline.engine.distributed import DistContext, gather_shards, workers_per_process
from pipeline.engine.runtime import training_memory_format
from pipeline.features import CachedFeatures, StageMaps
from pipeline.io import OptionError, atomic_write_text
from pipeline.models.backbones import Backbone
from pipeline.models.heads import FeatureNorm
from pipeline.train.image_config import ImageTrainConfig, resolve_decoder_caption
from pipeline.train.stacker import check_stacker_captions

log = logging.getLogger(__name__)


def image_splits(config: ImageTrainConfig) -> tuple[DatasetPaths, LabelSet, pd.DataFrame, pd.DataFrame]:
    """(paths, labels, train images, validation images) of a training run, one row per image:
    rows that differ only by caption would repeat an image."""
    paths = DatasetPaths.resolve(config.data, config.images)
    labels, train, val = load_train_val(paths, config.val_fraction)
    train, val = group_by_image(train).images, group_by_image(val).images
    if val.empty:
        raise OptionError(f"--val-fraction {config.val_fraction}: the validation split is empty")
    check_stacker_captions(config, train, paths.train_csv)
    return paths, labels, train, val


def split_caption_vectors(
    config: ImageTrainConfig, paths: DatasetPaths, cache_dir: Path
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) caption vectors (N_images, D), in the order of :func:`image_splits`'
    images, for ``--decoder-caption``: each image's captions encoded and averaged (a blank
    caption as ""). A train.csv without a Caption column is refused, naming the option."""
    _, train, val = load_train_val(paths, config.val_fraction)
    if CAPTION_COLUMN not in train:
        raise OptionError(
            f"--decoder-caption {config.decoder_caption}: {paths.train_csv} has no {CAPTION_COLUMN} "
            "column, so the decoder has no captions to read; use --decoder-caption none"
        )
    encoder = resolve_decoder_caption(config, has_captions=True)
    return image_caption_vectors(train, encoder, cache_dir), image_caption_vectors(val, encoder, cache_dir)


def usable_rows(
    config: ImageTrainConfig,
    paths: DatasetPaths,
    image_ids: list[str],
    readable: np.ndarray,
    num_train: int,
    context: DistContext,
) -> tuple[np.ndarray, np.ndarray]:
    """(train mask, validation mask) of the rows of ``image_ids`` (train then validation)
    whose image could be read.

    Unreadable images stop training with their list, unless ``--skip-bad-images``: then
    they are left out of training and scoring, listed in WEIGHTS/skipped_images.txt, and
    their count is reported.
    """
    ok = np.asarray(readable, dtype=bool)
    if ok.all():
        return ok[:num_train], ok[num_train:]
    bad = [paths.image_path(image_ids[i]) for i in np.flatnonzero(~ok)]
    if not config.skip_bad_images:
        raise ImageReadError.listing(bad, "\nfix or remove these rows of train.csv, or pass --skip-bad-images")
    listing = Path(config.weights_dir) / "skipped_images.txt"
    if context.is_main:
        atomic_write_text(listing, "".join(f"{path}\n" for path in bad))
    log.warning(
        "--skip-bad-images: left out %d of %d rows whose image is missing or unreadable (listed in %s)",
        len(bad),
        len(ok),
        listing,
    )
    if not ok.any():
        raise ImageReadError(
            f"--skip-bad-images: all {len(ok)} images of {paths.train_csv.name} in {paths.images} "
            f"are missing or unreadable (listed in {listing}); nothing to train on"
        )
    for split, readable_in_split, purpose in (
        ("training", ok[:num_train], "train on"),
        ("validation", ok[num_train:], "score the model or tune fusion on"),
    ):
        if not readable_in_split.any():
            raise ImageReadError(
                f"--skip-bad-images: all {len(readable_in_split)} {split}-split images in "
                f"{paths.images} are missing or unreadable (listed in {listing}); nothing to "
                f"{purpose}"
            )
    return ok[:num_train], ok[num_train:]


def _with_captions(captions: np.ndarray | None) -> torch.Tensor | None:
    return None if captions is None else torch.from_numpy(np.ascontiguousarray(captions, dtype=np.float32))


class LabelledImages(Dataset):
    """(uint8 image (3, R, R), multi-hot target) pairs, with the image's caption vector third
    when ``captions`` (N, D) are given; an unreadable image stops training with its name."""

    def __init__(self, images: ImageDataset, targets: np.ndarray, captions: np.ndarray | None = None) -> None:
        self.images, self.targets, self.captions = images, torch.from_numpy(targets), _with_captions(captions)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        image, _, readable = self.images[index]
        if not readable:
            raise ImageReadError.listing([self.images.files[index]])
        caption = () if self.captions is None else (self.captions[index],)
        return image, self.targets[index], *caption


class LabelledMaps(Dataset):
    """(float16 stage map (C, h, w), multi-hot target) pairs from the stage-map cache, with the
    image's caption vector third when ``captions`` (one per row) are given.

    Index ``i + n * v`` is row ``rows[i]`` of view ``v`` (``RandomViewSampler`` picks ``v``),
    so the view choice lives in the sampler, in the main process, and loader workers need
    no per-epoch state. A batch is read from the cache in one call per view.
    """

    def __init__(
        self, maps: StageMaps, rows: np.ndarray, targets: np.ndarray, captions: np.ndarray | None = None
    ) -> None:
        self.maps, self.rows, self.targets = maps, np.asarray(rows), torch.from_numpy(targets)
        self.captions = _with_captions(captions)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        views, items = np.divmod(np.asarray(indices), len(self.rows))
        read = np.empty((len(items), *self.maps.shape[1:]), dtype=np.float16)  # (B, C, h, w)
        for view in np.unique(views):
            chosen = views == view
            read[chosen] = self.maps.read(self.maps.views[view], self.rows[items[chosen]])
        maps = torch.from_numpy(read)
        if self.captions is not None:
            return [(maps[k], self.targets[i], self.captions[i]) for k, i in enumerate(items)]
        return [(maps[k], self.targets[i]) for k, i in enumerate(items)]


class RandomViewSampler(Sampler[int]):
    """A ``DistributedSampler`` over rows whose every row comes as one of ``num_views`` views,
    drawn afresh each epoch from (seed, epoch, row): it yields ``row + num_rows * view``.

    The draw depends on the row, not on the rank, so 1 or N processes see the same views.
    """

    def __init__(self, rows: DistributedSampler, num_rows: int, num_views: int, seed: int) -> None:
        self.rows, self.num_rows, self.num_views, self.seed = rows, num_rows, num_views, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.rows.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        views = torch.randint(self.num_views, (self.num_rows,), generator=generator).tolist()
        return (row + self.num_rows * views[row] for row in self.rows)


def _no_transform(image) -> torch.Tensor:
    return torch.zeros(3, 1, 1, dtype=torch.uint8)  # the shape ImageDataset gives an unreadable image at size 1


def decodable(paths: DatasetPaths, image_ids: list[str], workers: int, context: DistContext) -> np.ndarray:
    """(N,) bool: which images decode. Each rank decodes its share and the shares are gathered,
    so every bad file is found in one pass before training, not mid-epoch."""
    shard = context.shard(len(image_ids))
    images = ImageDataset(paths, [image_ids[i] for i in shard], _no_transform, 1, blank_dtype=torch.uint8)
    parts = [ok for _, _, ok in DataLoader(images, batch_size=256, num_workers=workers_per_process(workers))]
    local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
    return gather_shards(local.to(torch.uint8), context, len(image_ids)).bool().numpy()


@dataclasses.dataclass
class TrainingInputs:
    """What the trunk trains on: datasets, how a batch becomes the trunk's input, the trunk, and
    the random augmentation a training batch gets on the device before ``prepare`` (None: none).
    With ``caption_dim``, each training item carries its image's caption vector third."""

    train: LabelledImages | LabelledMaps
    val: LabelledImages | LabelledMaps
    sampler: Sampler | None
    prepare: Callable[[torch.Tensor], torch.Tensor]
    trunk: nn.Module
    workers: int
    augment: BatchAugment | None = None
    caption_dim: int = 0
    collate: Callable[[list], tuple[torch.Tensor, ...]] | None = None  # None: torch's default


def collate_images(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """(uint8 images (B, 3, R, R) channels_last, targets (B, L)[, caption vectors (B, D)]) of
    (image, target[, caption]) items: :func:`~pipeline.data.transforms.stack_pixels` copies the
    decoded images as they lie, where torch's default collate would transpose each (22 ms for 64
    images at 320 px)."""
    images, *rest = zip(*items, strict=True)  # every item has the same parts
    return stack_pixels(list(images)), *(torch.stack(column) for column in rest)


def image_inputs(
    backbone: Backbone,
    paths: DatasetPaths,
    train_ids: list[str],
    val_ids: list[str],
    y_train: np.ndarray,
    y_val: np.ndarray,
    device: torch.device,
    workers: int,
    augment: BatchAugment | None = None,
    train_captions: np.ndarray | None = None,
) -> TrainingInputs:
    """Training and validation images at the backbone's resolution, handed over as uint8 and
    normalised on the device (``prepare``); training batches are first given ``augment``.
    ``train_captions``: the training images' caption vectors, for a decoder that reads them."""
    preprocessing, size = backbone.preprocessing, backbone.preprocessing["resolution"]
    train_set = LabelledImages(
        ImageDataset(paths, train_ids, build_transform(preprocessing, normalize=False), size), y_train, train_captions
    )
    val_set = LabelledImages(ImageDataset(paths, val_ids, build_transform(preprocessing, normalize=False), size), y_val)

    layout = training_memory_format(device)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return normalize_batch(images, preprocessing).contiguous(memory_format=layout)

    return TrainingInputs(
        train_set,
        val_set,
        None,
        prepare,
        backbone.module,
        workers_per_process(workers),
        augment,
        _caption_dim(train_captions),
        collate_images,
    )


def map_inputs(
    maps: StageMaps,
    trunk: nn.Module,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    y_train: np.ndarray,
    y_val: np.ndarray,
    context: DistContext,
    device: torch.device,
    batch_size: int,
    seed: int,
    workers: int,
    train_captions: np.ndarray | None = None,
) -> TrainingInputs:
    """Rows of the stage-map cache: training rows in a random view per epoch, validation rows
    plain; ``trunk`` is the backbone's trainable tail. ``train_captions``: the training rows'
    caption vectors, for a decoder that reads them."""
    train_set = LabelledMaps(maps, train_rows, y_train, train_captions)
    # The rows' sampler: it reads only len(train_set), one item per row; the view is drawn after.
    sampler = RandomViewSampler(
        DistributedSampler(
            train_set,
            num_replicas=context.world_size,
            rank=context.rank,
            shuffle=True,
            seed=seed,
            drop_last=len(train_rows) > batch_size,
        ),
        len(train_rows),
        len(maps.views),
        seed,
    )
    val_set = LabelledMaps(maps, val_rows, y_val)  # indices below len(val_rows): the plain view
    # Reading rows of a memory map is a copy; on a CPU, worker processes would only take
    # cores from the training arithmetic.
    workers = workers_per_process(workers) if device.type == "cuda" else 0
    layout = training_memory_format(device)

    def prepare(maps_batch: torch.Tensor) -> torch.Tensor:
        return maps_batch.float().contiguous(memory_format=layout)

    return TrainingInputs(
        train_set, val_set, sampler, prepare, trunk, workers, caption_dim=_caption_dim(train_captions)
    )


def _caption_dim(captions: np.ndarray | None) -> int:
    return 0 if captions is None else int(captions.shape[1])


class FeatureRows(Dataset):
    """Labelled rows of cached pooled features, standardised a batch at a time: the features
    stay float16, as cached, and no normalised float32 copy of the whole set is ever made.
    Item ``i``: (features (D,), target (L,)) of row ``rows[i]``, and its caption vector third when
    ``captions`` (one per item) are given. ``columns``: only the first this many columns of each
    row (the pooled values before a class attention's logits)."""

    def __init__(
        self,
        features: torch.Tensor | CachedFeatures,
        rows: np.ndarray,
        targets: torch.Tensor,
        norm: FeatureNorm,
        columns: int | None = None,
        captions: np.ndarray | None = None,
    ) -> None:
        self.features, self.rows, self.targets, self.norm = features, np.asarray(rows), targets, norm
        self.columns, self.captions = columns, _with_captions(captions)

    @property
    def caption_dim(self) -> int:
        return 0 if self.captions is None else self.captions.shape[1]

    @property
    def dim(self) -> int:
        return self.columns or self.features.shape[1]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: np.ndarray | list[int]) -> tuple[torch.Tensor, ...]:
        """(standardised features (B, D) float32, targets (B, L)[, caption vectors (B, D_c)]) of
        items ``index``."""
        index = np.asarray(index)
        batch = self.norm(self.features[self.rows[index]][:, : self.dim].float()), self.targets[index]
        return batch if self.captions is None else (*batch, self.captions[index])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(part[0] for part in self.batch([i]))

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """A whole batch in one indexing operation (the DataLoader's batched fetch)."""
        return list(zip(*self.batch(indices), strict=True))  # each part has a row per index

    def chunks(self, size: int = 1024) -> Iterator[tuple[torch.Tensor, ...]]:
        """Consecutive (features, targets[, captions]) batches of every item, in order."""
        for start in range(0, len(self), size):
            yield self.batch(np.arange(start, min(start + size, len(self))))
