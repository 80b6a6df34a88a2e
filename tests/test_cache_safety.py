"""Caches damaged in place, and outputs left half-written by a killed run: a shard whose bytes
changed after it was written is extracted again, a killed writer's temporary file is removed
by the next write of the same file, and a live writer's is kept."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest

import inference
from pipeline.io import atomic_text_writer, atomic_write_text
from pipeline.shards import Field, ShardDigestError, ShardedStore
from tests.conftest import TRAINED_N_TEST, count_extracted_rows

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")


def _inference_argv(data: Path, weights: Path, output: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--weights", str(weights), "--output", str(output), "--workers", "0",
            "--val-fraction", "0.25", "--device", "cpu", *extra]


def _test_store(weights: Path) -> Path:
    """The feature store of the test images in ``weights``' cache (training wrote the other)."""
    (store,) = [p for p in (weights / "cache").glob("features-*")
                if json.loads((p / "manifest.json").read_text())["num_rows"] == TRAINED_N_TEST]
    return store


def test_a_shard_with_its_rows_permuted_in_place_is_extracted_again(trained_branches, tmp_path, monkeypatch,
                                                                  caplog):
    data, trained = trained_branches
    weights = Path(shutil.copytree(trained, tmp_path / "w"))
    inference.main(_inference_argv(data, weights, tmp_path / "clean"))
    clean = (tmp_path / "clean" / "submission.csv").read_bytes()
    store = _test_store(weights)
    shard = store / "features-00000.npy"
    rows = np.load(shard)
    permuted = rows[np.random.default_rng(0).permutation(len(rows))]
    assert not np.array_equal(permuted, rows, equal_nan=True)
    size = shard.stat().st_size
    np.save(shard, permuted)  # same shape and dtype: the same header and size, a valid shard
    assert shard.stat().st_size == size and ShardedStore.open_complete(store, json.loads(
        (store / "manifest.json").read_text())["key"], TRAINED_N_TEST) is not None

    extracted = count_extracted_rows(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pipeline.features"):
        inference.main(_inference_argv(data, weights, tmp_path / "again"))
    assert extracted == [TRAINED_N_TEST]
    assert [r.getMessage() for r in caplog.records if r.name == "pipeline.features"] == [
        f"features cache: {shard}: its content does not match the digest recorded when it was written "
        "(damaged or changed since); extracting its shard again"]
    assert (tmp_path / "again" / "submission.csv").read_bytes() == clean
    np.testing.assert_array_equal(np.load(shard), rows)


@pytest.fixture
def store(tmp_path) -> tuple[ShardedStore, np.ndarray]:
    """A 6-row store of 4-row shards, written, and the array it holds."""
    values = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    store = ShardedStore.create(tmp_path / "s", {"what": "test"}, 6, 4, {"x": Field((3,), "float32")})
    for shard in range(store.num_shards):
        with store.write_shard(shard) as arrays:
            arrays["x"][:] = values[store.shard_range(shard).start:store.shard_range(shard).stop]
    return store, values


def test_a_shard_changed_after_a_process_checked_it_is_refused_when_read_again(store):
    store, values = store
    assert store.damaged_shards() == {}
    np.testing.assert_array_equal(store.read("x", [0, 5]), values[[0, 5]])
    np.save(store.path("x", 0), values[[1, 0, 2, 3]])  # rows swapped: same header, same size
    with pytest.raises(ShardDigestError, match="x-00000.npy: its content does not match the digest recorded when "
                                               r"it was written \(damaged or changed since\); the next run extracts"):
        store.read("x", [0])
    np.testing.assert_array_equal(store.read("x", [5]), values[[5]])  # the other shard is still good
    assert list(store.damaged_shards()) == [0]
    # Reopened, the shard still counts as complete (its files are whole); its digest tells it apart.
    reopened = ShardedStore.open(store.directory, store.key)
    assert reopened.missing_shards() == [] and list(reopened.damaged_shards()) == [0]


def test_a_shard_without_a_recorded_digest_counts_as_missing(store):
    store, _ = store
    manifest = json.loads((store.directory / "manifest.json").read_text())
    assert sorted(manifest["digests"]) == ["x-00000.npy", "x-00001.npy"]
    del manifest["digests"]["x-00001.npy"]  # as a run killed between the rename and the manifest
    (store.directory / "manifest.json").write_text(json.dumps(manifest))
    assert ShardedStore.open(store.directory, store.key).missing_shards() == [1]


def test_a_store_of_the_previous_version_without_digests_is_rebuilt(store, caplog):
    store, _ = store
    manifest = json.loads((store.directory / "manifest.json").read_text())
    del manifest["digests"]
    manifest["store_version"] = 1
    (store.directory / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        assert ShardedStore.open(store.directory, store.key) is None
    assert caplog.messages == [f"cache {store.directory} was written by an older version, without content digests; "
                               "rebuilding it"]
    rebuilt = ShardedStore.create(store.directory, store.key, 6, 4, store.fields)
    assert rebuilt.missing_shards() == [0, 1] and sorted(p.name for p in store.directory.iterdir()) == [
        "manifest.json"]


def _killed_writer(path: Path) -> int:
    """The pid of a process killed while it streamed ``path`` with atomic_text_writer."""
    pid = os.fork()
    if pid == 0:
        with atomic_text_writer(path) as handle:
            handle.write("half of a submission")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    return pid


def test_a_successful_write_removes_what_a_killed_writer_of_the_same_file_left(tmp_path):
    submission = tmp_path / "submission.csv"
    dead = _killed_writer(submission)
    (left,) = tmp_path.glob(".submission.csv.*.tmp")
    assert left.name.startswith(f".submission.csv.{dead}@{socket.gethostname()}.")
    # Files nothing can tell is abandoned are kept: another machine's writer, one without
    # a pid (an older version's), and a temporary file of another file.
    kept = [tmp_path / f".submission.csv.{dead}@another-host.abcd1234.tmp",
            tmp_path / ".submission.csv.abcd1234.tmp",
            tmp_path / f".submission.csv.bak.{dead}@{socket.gethostname()}.abcd1234.tmp"]
    for path in kept:
        path.write_text("?")
    atomic_write_text(submission, "ImageID,Labels\n")
    assert submission.read_text() == "ImageID,Labels\n"
    assert sorted(tmp_path.iterdir()) == sorted([submission, *kept])


def test_a_write_keeps_the_temporary_file_of_a_live_writer_of_the_same_file(tmp_path):
    submission = tmp_path / "submission.csv"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with atomic_text_writer(submission) as handle:
                handle.write("from the slow run\n")
                os.write(ready_w, b"1")
                os.read(go_r, 1)  # stays mid-write until the other run is done
            code = 0
        finally:
            os._exit(code)
    assert os.read(ready_r, 1) == b"1"
    atomic_write_text(submission, "from the quick run\n")
    (live,) = tmp_path.glob(".submission.csv.*.tmp")
    assert live.name.startswith(f".submission.csv.{pid}@")
    os.write(go_w, b"1")
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert submission.read_text() == "from the slow run\n" and list(tmp_path.glob(".*.tmp")) == []
