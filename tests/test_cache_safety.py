"""Caches and outputs shared by runs at once, damaged in place, or left half-written by a
killed run: two runs on one weights folder give a lone run's results, a shard whose bytes
changed after it was written is extracted again, and a killed writer's temporary file is
removed by the next write of the same file."""

from __future__ import annotations

import faulthandler
import json
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import inference
import pipeline.features as features_module
import train_efficientnet
from pipeline.io import atomic_text_writer, atomic_write_text
from pipeline.shards import Field, ShardDigestError, ShardedStore
from tests.conftest import TINY_IMAGE_ARGS, TRAINED_N_TEST, count_extracted_rows, make_tiny_dataset
from tests.test_resume import assert_same_checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")

# fork starts each run without importing anything again, so two runs cost seconds, not a
# minute; each is still its own process, with its own pid, files and locks. The forked runs
# use torch: OpenVINO's thread pool, started in this process by earlier tests, does not
# survive a fork.
FORK = multiprocessing.get_context("fork")
TORCH = ["--runtime", "torch"]
# Long enough that the second run asks for the store while the first is still writing it.
EXTRACTION_DELAY = 0.5
CHILD_TIMEOUT = 60


def _run_in_child(main: Callable[[list[str]], object], argv: list[str], log_file: Path,
                  start: multiprocessing.synchronize.Barrier, delay: float) -> None:
    """``main(argv)`` in this forked process after every run reaches ``start``, its extraction
    slowed by ``delay`` seconds; the rows it extracts and the cache's log lines go to files."""
    # A run that hangs says where, instead of holding up the suite.
    faulthandler.dump_traceback_later(CHILD_TIMEOUT, file=open(log_file.with_suffix(".hang"), "w"), exit=True)
    extracted: list[int] = []
    into_store = features_module.extract_into_store

    def slow(extractor, paths, image_ids, views, store, shards, *args, **kwargs):
        extracted.append(sum(len(store.shard_range(k)) for k in shards))
        time.sleep(delay)
        return into_store(extractor, paths, image_ids, views, store, shards, *args, **kwargs)

    features_module.extract_into_store = slow
    handler = logging.FileHandler(log_file)
    for name in ("pipeline.shards", "pipeline.features"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    code = 0
    try:
        start.wait(timeout=CHILD_TIMEOUT)
        main(argv)
    except BaseException:  # noqa: BLE001 - reported to the test through the file
        code = 1
        log_file.with_suffix(".error").write_text(traceback.format_exc())
    log_file.with_suffix(".rows").write_text(json.dumps(extracted))
    handler.close()
    os._exit(code)


def _at_once(main: Callable[[list[str]], object], runs: list[list[str]], logs: Path) -> tuple[list[int], list[str]]:
    """Run ``main`` on each argv of ``runs`` in processes started at the same moment; returns
    (rows each run extracted in all, each run's cache log)."""
    logs.mkdir()
    start = FORK.Barrier(len(runs))
    children = [FORK.Process(target=_run_in_child, args=(main, argv, logs / f"{k}.log", start, EXTRACTION_DELAY))
                for k, argv in enumerate(runs)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=2 * CHILD_TIMEOUT)
        if child.exitcode is None:
            child.kill()
            child.join()
    for k, child in enumerate(children):
        error = logs / f"{k}.error"
        assert child.exitcode == 0, (f"run {k}: exit code {child.exitcode}\n"
                                     + (error.read_text() if error.exists() else (logs / f"{k}.hang").read_text()))
    return ([sum(json.loads((logs / f"{k}.rows").read_text())) for k in range(len(runs))],
            [(logs / f"{k}.log").read_text() for k in range(len(runs))])


def _waited(log: str) -> bool:
    """Whether the run waited for the other's feature store (the text cache of the captions the
    decoder reads is shared the same way, and is not what these tests count)."""
    return any("is writing this cache; waiting for it to finish" in line and "/features-" in line
               for line in log.splitlines())


def _inference_argv(data: Path, weights: Path, output: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--weights", str(weights), "--output", str(output), "--workers", "0",
            "--val-fraction", "0.25", "--device", "cpu", *extra]


def _test_store(weights: Path) -> Path:
    """The feature store of the test images in ``weights``' cache (training wrote the other)."""
    (store,) = [p for p in (weights / "cache").glob("features-*")
                if json.loads((p / "manifest.json").read_text())["num_rows"] == TRAINED_N_TEST]
    return store


def test_two_inference_runs_at_once_on_a_cold_cache_write_a_lone_runs_submission(trained_branches, tmp_path):
    data, trained = trained_branches
    lone = Path(shutil.copytree(trained, tmp_path / "lone"))
    inference.main(_inference_argv(data, lone, tmp_path / "lone-out", *TORCH))
    expected = (tmp_path / "lone-out" / "submission.csv").read_bytes()

    shared = Path(shutil.copytree(trained, tmp_path / "shared"))
    shutil.copy(lone / "fusion.json", shared / "fusion.json")  # tuned: neither run tunes it
    rows, logs = _at_once(inference.main, [_inference_argv(data, shared, tmp_path / "a", *TORCH),
                                           _inference_argv(data, shared, tmp_path / "b", *TORCH)],
                          tmp_path / "logs")
    assert (tmp_path / "a" / "submission.csv").read_bytes() == expected
    assert (tmp_path / "b" / "submission.csv").read_bytes() == expected
    # The test images were extracted once: the second run waited for the first, then read its cache.
    assert sorted(rows) == [0, TRAINED_N_TEST]
    assert sorted(map(_waited, logs)) == [False, True]
    assert sorted(p.name for p in _test_store(shared).iterdir()) == [
        "features-00000.npy", "manifest.json", "readable-00000.npy", "write.lock"]


PARTIAL = ["--mode", "partial", "--train-from-stage", "3", "--finetune-epochs", "1", "--warmup-epochs", "0.5",
           "--decoder-epochs", "1"]


def test_two_training_runs_sharing_a_cache_train_a_lone_runs_model(tmp_path, monkeypatch):
    data = make_tiny_dataset(tmp_path / "tiny", n_train=16, n_test=0)

    def argv(weights: Path) -> list[str]:
        return ["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS, *PARTIAL, *TORCH]

    with monkeypatch.context() as patch:
        lone_rows = count_extracted_rows(patch)
        train_efficientnet.main(argv(tmp_path / "lone"))
    assert lone_rows == [16, 2]  # the stage maps of every image, then the validation images' fine-tuned features
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cache").symlink_to(shared, target_is_directory=True)
    rows, logs = _at_once(train_efficientnet.main, [argv(tmp_path / "a"), argv(tmp_path / "b")], tmp_path / "logs")
    # Each store was extracted once, by one run or the other; a run that needed it meanwhile waited.
    assert sum(rows) == 18 and sum(log.count("waiting for it to finish") for log in logs) >= 1
    assert_same_checkpoints(tmp_path / "lone", tmp_path / "a", ("image", "decoder"))
    assert_same_checkpoints(tmp_path / "lone", tmp_path / "b", ("image", "decoder"))


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


def test_partial_shards_carry_their_writer_and_leftovers_are_removed_under_the_lock(store):
    store, values = store
    stale = store.directory / ".x-00000.npy.999999@elsewhere.partial"
    stale.write_bytes(b"left by a killed run")
    with store.write_shard(1) as arrays:
        (partial,) = [p for p in store.directory.glob(".*.partial") if p != stale]
        assert partial.name == f".x-00001.npy.{os.getpid()}@{socket.gethostname()}.partial"
        arrays["x"][:] = values[4:]
    # Under the store's lock no other process is writing it: every partial file is a leftover.
    ShardedStore.create(store.directory, store.key, 6, 4, store.fields)
    assert not stale.exists()


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
