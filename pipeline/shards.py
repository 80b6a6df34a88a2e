"""Row-sharded arrays on disk: the storage of the feature and stage-map caches.

A store is a directory::

    manifest.json          the key (everything the rows depend on), the number of rows,
                           rows per shard, and each field's per-row shape and dtype
    {field}-{k:05d}.npy    shard ``k`` of each field: rows [k * S, min(N, (k + 1) * S))

Each shard is written under a temporary name and renamed once complete, and a shard counts
as complete only when every field's file is there with its full shape. So an interrupted
extraction keeps its complete shards and redoes the rest, and a cut-off file is never read.

Rows are read with positional reads (``os.pread``), not memory maps: the pages stay in the
operating system's file cache, not in the reading process's resident memory, so a process
reading a cache of any size keeps a flat footprint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io import write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STORE_VERSION = 1


@dataclass(frozen=True)
class Field:
    """The per-row shape and dtype of one array of a store."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, data offset) of a C-ordered ``.npy`` file whose data is all there; else None."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                return None
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError, SyntaxError):
        return None
    if fortran or size < offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        return None
    return tuple(shape), dtype, offset


@dataclass(frozen=True)
class ShardedStore:
    """A directory of row shards (see the module docstring). Plain data, so it pickles into
    loader workers; files are opened per read, which also makes it safe across ``fork``."""

    directory: Path
    key: dict
    num_rows: int
    shard_rows: int
    fields: dict[str, Field]
    # Data offset of each shard file read so far, by (field, shard), with the (inode, size,
    # mtime) it was read for: a training loop reads every shard once per batch, and parsing
    # the header each time would double its system calls.
    _offsets: dict[tuple[str, int], tuple[tuple[int, int, int], int]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min(self.num_rows, (shard + 1) * self.shard_rows))

    def path(self, field: str, shard: int) -> Path:
        return self.directory / f"{field}-{shard:05d}.npy"

    def _manifest(self) -> dict:
        return {"store_version": STORE_VERSION, "key": self.key, "num_rows": self.num_rows,
                "shard_rows": self.shard_rows,
                "fields": {name: {"shape": list(f.shape), "dtype": f.dtype} for name, f in self.fields.items()}}

    # ---- opening and creating ------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, key: dict) -> ShardedStore | None:
        """The store in ``directory`` when its manifest was written for ``key``; else None."""
        try:
            manifest = json.loads((Path(directory) / MANIFEST).read_text())
            store = cls(Path(directory), manifest["key"], int(manifest["num_rows"]), int(manifest["shard_rows"]),
                        {name: Field(tuple(spec["shape"]), str(spec["dtype"]))
                         for name, spec in manifest["fields"].items()})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("cache %s unreadable (%s); rebuilding it", directory, err)
            return None
        if manifest.get("store_version") != STORE_VERSION or store.key != key or store.shard_rows < 1:
            log.warning("cache %s does not match these images/settings; rebuilding it", directory)
            return None
        return store

    @classmethod
    def open_complete(cls, directory: Path, key: dict, num_rows: int) -> ShardedStore | None:
        """The store in ``directory`` when it was written for ``key`` and every one of its
        ``num_rows`` rows is in a complete shard; else None."""
        store = cls.open(directory, key)
        if store is None or store.num_rows != num_rows or store.missing_shards():
            return None
        return store

    @classmethod
    def create(cls, directory: Path, key: dict, num_rows: int, shard_rows: int,
               fields: dict[str, Field]) -> ShardedStore:
        """The store for ``key``, reusing the complete shards of one already there with the same
        layout; anything else in ``directory`` is removed."""
        wanted = cls(Path(directory), key, num_rows, shard_rows, fields)
        existing = cls.open(directory, key)
        if existing is not None and existing._manifest() == wanted._manifest():
            return existing
        if Path(directory).exists():
            shutil.rmtree(directory)
        Path(directory).mkdir(parents=True)
        write_json(Path(directory) / MANIFEST, wanted._manifest())
        return wanted

    # ---- completeness --------------------------------------------------------------------

    def shard_complete(self, shard: int) -> bool:
        rows = len(self.shard_range(shard))
        for name, spec in self.fields.items():
            layout = _npy_layout(self.path(name, shard))
            if layout is None or layout[0] != (rows, *spec.shape) or layout[1] != np.dtype(spec.dtype):
                return False
        return True

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.shard_complete(k)]

    @contextlib.contextmanager
    def write_shard(self, shard: int) -> Iterator[dict[str, np.ndarray]]:
        """Writable memory maps ``{field: (rows, *shape)}`` of shard ``shard``, zero-filled,
        renamed into place only when the block exits without an error."""
        rows = len(self.shard_range(shard))
        partial = {name: self.directory / f".{self.path(name, shard).name}.partial" for name in self.fields}
        arrays = {name: np.lib.format.open_memmap(partial[name], mode="w+", dtype=np.dtype(spec.dtype),
                                                  shape=(rows, *spec.shape))
                  for name, spec in self.fields.items()}
        try:
            yield arrays
            for array in arrays.values():
                array.flush()
        except BaseException:
            arrays.clear()
            for path in partial.values():
                path.unlink(missing_ok=True)
            raise
        arrays.clear()
        for name, path in partial.items():
            os.replace(path, self.path(name, shard))

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("*.npy"))

    # ---- reading -------------------------------------------------------------------------

    def read(self, field: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) of ``field``: (len(rows), *shape)."""
        spec = self.fields[field]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *spec.shape), dtype=np.dtype(spec.dtype))
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.num_rows:
            raise IndexError(f"{self.directory}: rows outside 0..{self.num_rows - 1}")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        shards = ordered // self.shard_rows
        # Runs of consecutive rows within one shard: one read each.
        breaks = np.flatnonzero((np.diff(ordered) != 1) | (np.diff(shards) != 0)) + 1
        starts, stops = np.r_[0, breaks], np.r_[breaks, len(ordered)]
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for shard in np.unique(shards):
            path = self.path(field, int(shard))
            try:
                handle = open(path, "rb")
            except OSError as err:
                raise OSError(f"{path}: missing or cut off ({err.strerror}); delete {self.directory} to rebuild "
                              "the cache") from err
            with handle:
                fd = handle.fileno()
                offset = self._data_offset(field, int(shard), path, fd)
                in_shard = (shards[starts] == shard)
                for start, stop in zip(starts[in_shard], stops[in_shard]):
                    local = int(ordered[start]) - int(shard) * self.shard_rows
                    count = int(stop - start)
                    data = os.pread(fd, count * spec.row_bytes, offset + local * spec.row_bytes)
                    if len(data) != count * spec.row_bytes:
                        raise OSError(f"{path}: cut off; delete {self.directory} to rebuild the cache")
                    flat[order[start:stop]] = np.frombuffer(data, np.uint8).reshape(count, -1)
        return out

    def _data_offset(self, field: str, shard: int, path: Path, fd: int) -> int:
        """Where the rows of the open shard file ``fd`` start, parsed once per file version."""
        stat = os.fstat(fd)
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._offsets.get((field, shard))
        if cached is not None and cached[0] == version:
            return cached[1]
        layout = _npy_layout(path)
        if layout is None:
            raise OSError(f"{path}: missing or cut off; delete {self.directory} to rebuild the cache")
        self._offsets[(field, shard)] = (version, layout[2])
        return layout[2]

    def read_all(self, field: str) -> np.ndarray:
        """Every row of ``field`` (for small stores, such as the readable masks)."""
        return np.concatenate([np.load(self.path(field, k)) for k in range(self.num_shards)]) \
            if self.num_shards else np.empty((0, *self.fields[field].shape), np.dtype(self.fields[field].dtype))
