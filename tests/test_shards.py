"""Sharded caches: rows read across shard boundaries, cut-off shards rebuilt, interrupted
extractions resumed at their first missing shard, and the same features however they are read."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import pipeline.features as features_module
import pipeline.shards as shards_module
from pipeline.data.dataset import DatasetPaths
from pipeline.features import (
    ExtractionSettings,
    cached_features,
    extract_features,
    has_cached_features,
)
from pipeline.models.backbones import create_backbone
from pipeline.shards import Field, ShardedStore
from tests.conftest import count_extracted_rows, make_tiny_dataset

N_IMAGES, SHARD = 10, 4  # shards of 4, 4 and 2 rows
CPU = torch.device("cpu")


@pytest.fixture
def store(tmp_path) -> tuple[ShardedStore, np.ndarray]:
    """A 10-row store of 4-row shards, and the array it holds."""
    values = np.arange(N_IMAGES * 6, dtype=np.float16).reshape(N_IMAGES, 2, 3)
    store = ShardedStore.create(tmp_path / "s", {"what": "test"}, N_IMAGES, SHARD,
                                {"x": Field((2, 3), "float16"), "readable": Field((), "bool")})
    for shard in range(store.num_shards):
        rows = store.shard_range(shard)
        with store.write_shard(shard) as arrays:
            arrays["x"][:] = values[rows.start:rows.stop]
            arrays["readable"][:] = True
    return store, values


def test_rows_are_read_in_any_order_across_shard_boundaries(store):
    store, values = store
    assert store.num_shards == 3 and [len(store.shard_range(k)) for k in range(3)] == [4, 4, 2]
    assert store.missing_shards() == []
    for rows in ([3, 4], [9, 0, 4, 4, 7, 8], list(range(N_IMAGES)), [], [5]):
        np.testing.assert_array_equal(store.read("x", rows), values[rows])
    assert store.read_all("readable").shape == (N_IMAGES,)
    with pytest.raises(IndexError, match="rows outside 0..9"):
        store.read("x", [10])


def test_each_shard_header_is_parsed_once_until_the_file_changes(store, monkeypatch):
    store, values = store
    parsed = []
    original = shards_module
    layout = original._npy_layout
    monkeypatch.setattr(original, "_npy_layout", lambda path: parsed.append(path.name) or layout(path))
    for _ in range(3):
        np.testing.assert_array_equal(store.read("x", [3, 4, 9]), values[[3, 4, 9]])
    assert sorted(parsed) == ["x-00000.npy", "x-00001.npy", "x-00002.npy"]
    rewritten = values.copy()
    rewritten[4:8] += 1
    with store.write_shard(1) as arrays:  # a new file for shard 1: its header is read again
        arrays["x"][:] = rewritten[4:8]
        arrays["readable"][:] = True
    np.testing.assert_array_equal(store.read("x", [3, 4, 9]), rewritten[[3, 4, 9]])
    assert sorted(parsed) == ["x-00000.npy", "x-00001.npy", "x-00001.npy", "x-00002.npy"]


def test_a_cut_off_or_misshapen_shard_counts_as_missing(store):
    store, _ = store
    first = store.path("x", 0)
    first.write_bytes(first.read_bytes()[:-1])  # one byte short
    np.save(store.path("readable", 2), np.ones(3, dtype=bool))  # a row too many
    assert store.missing_shards() == [0, 2]
    with pytest.raises(OSError, match="x-00000.npy: missing or cut off"):
        store.read("x", [1])


def test_an_error_while_a_shard_is_written_leaves_nothing_behind(store):
    store, values = store
    store.path("x", 1).unlink()
    with pytest.raises(KeyboardInterrupt), store.write_shard(1) as arrays:
        arrays["x"][:] = 0
        raise KeyboardInterrupt
    assert store.missing_shards() == [1]
    assert not [p.name for p in store.directory.iterdir() if p.name.startswith(".")]


def test_the_same_key_and_layout_keep_their_shards_and_any_other_starts_afresh(store):
    store, _ = store
    fields = dict(store.fields)
    again = ShardedStore.create(store.directory, store.key, N_IMAGES, SHARD, fields)
    assert again.missing_shards() == []
    other_layout = ShardedStore.create(store.directory, store.key, N_IMAGES, 5, fields)
    assert other_layout.missing_shards() == [0, 1]
    assert ShardedStore.open(store.directory, {"what": "other"}) is None


@pytest.fixture
def images(tmp_path):
    paths = DatasetPaths.resolve(make_tiny_dataset(tmp_path / "tiny", n_train=N_IMAGES, n_test=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        backbone = create_backbone("test_efficientnet", resolution=32)
    return backbone, paths, [f"{i}.jpg" for i in range(N_IMAGES)]


def _cached(images, cache):
    backbone, paths, ids = images
    return cached_features(backbone, paths, ids,
                           ExtractionSettings(cache_dir=cache, device=CPU, batch_size=2, workers=0, shard_rows=SHARD))


def test_features_are_the_same_read_whole_by_shard_or_in_memory(images, tmp_path):
    backbone, paths, ids = images
    (paths.images / ids[5]).write_bytes(b"not an image")
    features, readable = _cached(images, tmp_path / "cache")
    (store,) = (tmp_path / "cache").glob("features-*")
    assert sorted(p.name for p in store.glob("features-*.npy")) == [f"features-0000{k}.npy" for k in range(3)]
    # Batches of 2 split the shards of 4 the way they split the whole list: the same forward passes.
    in_memory, ok = extract_features(backbone, paths, ids, CPU, batch_size=2, workers=0)
    whole = features[:]
    assert torch.equal(readable, ok) and readable.tolist() == [i != 5 for i in range(N_IMAGES)]
    torch.testing.assert_close(whole, in_memory, rtol=0, atol=0, equal_nan=True)
    by_shard = torch.cat([features[np.arange(k, min(k + SHARD, N_IMAGES))] for k in range(0, N_IMAGES, SHARD)])
    torch.testing.assert_close(by_shard, whole, rtol=0, atol=0, equal_nan=True)
    rows = np.array([9, 2, 4, 3, 8])
    torch.testing.assert_close(features[rows], whole[rows], rtol=0, atol=0, equal_nan=True)
    assert whole[5].isnan().all() and features.shape == (N_IMAGES, 2 * backbone.feature_dim)


def test_an_interrupted_extraction_resumes_at_its_first_missing_shard(images, tmp_path, monkeypatch):
    reference = _cached(images, tmp_path / "reference")[0][:]
    original, written = features_module.ShardedStore.write_shard, []

    def interrupted(store, shard):
        if len(written) == 2:
            raise KeyboardInterrupt  # as the third shard starts
        written.append(shard)
        return original(store, shard)

    with monkeypatch.context() as patch:
        patch.setattr(features_module.ShardedStore, "write_shard", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _cached(images, tmp_path / "cache")
    assert written == [0, 1]
    extracted = count_extracted_rows(monkeypatch)
    resumed, _ = _cached(images, tmp_path / "cache")
    assert extracted == [2]  # the last shard alone
    assert torch.equal(resumed[:], reference)
    (store,) = (tmp_path / "cache").glob("features-*")
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]


def test_a_cut_off_shard_alone_is_extracted_again(images, tmp_path, monkeypatch):
    features, _ = _cached(images, tmp_path / "cache")
    whole = features[:]
    middle = features.store.path("features", 1)
    middle.write_bytes(middle.read_bytes()[:150])
    extracted = count_extracted_rows(monkeypatch)
    rebuilt, _ = _cached(images, tmp_path / "cache")
    assert extracted == [SHARD] and torch.equal(rebuilt[:], whole)


def test_only_the_keyed_settings_choose_the_store(images, tmp_path, monkeypatch):
    """Batch size, workers and shard rows say how missing rows are computed: other values of them
    read the same store. Views, precision and runtime are what the rows are: another value of
    one of them is another store."""
    backbone, paths, ids = images
    _cached(images, tmp_path / "cache")
    extracted = count_extracted_rows(monkeypatch)
    other_way = ExtractionSettings(cache_dir=tmp_path / "cache", device=CPU, batch_size=5, workers=1, shard_rows=3)
    assert has_cached_features(backbone, paths, ids, other_way)
    cached_features(backbone, paths, ids, other_way)
    assert extracted == []
    for other in ({"views": ("plain",)}, {"precision": "bf16"}, {"runtime": "onnxruntime"}):
        assert not has_cached_features(backbone, paths, ids, dataclasses.replace(other_way, **other)), other
