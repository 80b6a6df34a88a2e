"""Row-sharded arrays on disk: the storage of the feature and stage-map caches.

A store is a directory::

    manifest.json          the key (everything the rows depend on), the number of rows,
                           rows per shard, each field's per-row shape and dtype, and the
                           content digest of every complete shard file
    {field}-{k:05d}.npy    shard ``k`` of each field: rows [k * S, min(N, (k + 1) * S))
    write.lock             held (``flock``) by the one process that may write the store

Each shard is written under a temporary name and renamed once complete, and a shard counts
as complete only when every field's file is there with its full shape and its digest is in
the manifest. So an interrupted extraction keeps its complete shards and redoes the rest, and
a cut-off file is never read. Each file is checked against its digest the first time a
process reads it, so a file damaged in place after it was written is never used either.

Writers hold the store's lock (:func:`write_lock`); readers of a complete store take none:
shard files and the manifest only ever appear by an atomic rename, so a reader sees a
shard's old file or its new one, never a half-written one.

Rows are read with positional reads (``os.pread``), not memory maps: the pages stay in the
operating system's file cache, not in the reading process's resident memory, so a process
reading a cache of any size keeps a flat footprint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io import write_json, writer_id

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = "write.lock"
# 2: the manifest holds each shard file's digest. A version-1 store is extracted again rather
# than its digests taken now: that would vouch for files whose content nothing can check.
STORE_VERSION = 2
# Bytes hashed per read: large enough that the per-call cost vanishes, small enough to stay
# in the CPU caches.
_HASH_BLOCK = 1 << 20


class ShardDigestError(OSError):
    """A shard file whose content does not match the digest recorded when it was written."""


def _content_digest(fd: int) -> str:
    """BLAKE2b digest of the whole open file ``fd``, read with positional reads.

    BLAKE2b hashes at about a gigabyte per second per core on any 64-bit CPU (SHA-256 is as
    fast only where the CPU has SHA instructions), a small part of what reading and using
    the rows costs, and a collision is out of reach even for a file crafted to match.
    """
    digest, offset = hashlib.blake2b(digest_size=16), 0
    while block := os.pread(fd, _HASH_BLOCK, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


@contextlib.contextmanager
def write_lock(directory: Path) -> Iterator[None]:
    """Hold the write lock of the store in ``directory`` (created if need be), waiting, and
    saying so, while another process holds it.

    ``flock`` is released by the kernel when its holder dies, so a killed writer never
    leaves the store locked. A file system without ``flock`` is warned about, not refused.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log.info("%s: %s is writing this cache; waiting for it to finish", directory, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning(
                "%s: cannot lock the cache (%s); two runs writing it at once may collide", directory, err.strerror
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {writer_id()}\n")
        handle.flush()
        try:
            yield
        finally:
            # Unlocked explicitly: loader workers forked meanwhile share this open file, and
            # closing it here alone would keep the lock until the last of them exits.
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    # Content digest of each complete shard file, by file name.
    digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # Whether this process keeps the manifest: under torchrun the ranks write shards side by
    # side and rank 0 alone records their digests.
    keeps_manifest: bool = field(default=True, repr=False, compare=False)
    # Data offset of each shard file checked so far, by (field, shard), with the (inode, size,
    # mtime) it was checked for: a training loop reads every shard once per batch, and parsing
    # the header (or hashing the file) each time would double its system calls.
    _offsets: dict[tuple[str, int], tuple[tuple[int, int, int], int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min(self.num_rows, (shard + 1) * self.shard_rows))

    def path(self, field: str, shard: int) -> Path:
        return self.directory / f"{field}-{shard:05d}.npy"

    def _layout(self) -> dict:
        return {
            "store_version": STORE_VERSION,
            "key": self.key,
            "num_rows": self.num_rows,
            "shard_rows": self.shard_rows,
            "fields": {name: {"shape": list(f.shape), "dtype": f.dtype} for name, f in self.fields.items()},
        }

    def _save_manifest(self) -> None:
        write_json(self.directory / MANIFEST, {**self._layout(), "digests": dict(sorted(self.digests.items()))})

    @staticmethod
    def _read_manifest(directory: Path) -> dict:
        return json.loads((Path(directory) / MANIFEST).read_text())

    # ---- opening and creating ------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, key: dict) -> ShardedStore | None:
        """The store in ``directory`` when its manifest was written for ``key``; else None."""
        try:
            manifest = cls._read_manifest(directory)
            store = cls(
                Path(directory),
                manifest["key"],
                int(manifest["num_rows"]),
                int(manifest["shard_rows"]),
                {name: Field(tuple(spec["shape"]), str(spec["dtype"])) for name, spec in manifest["fields"].items()},
                {str(name): str(digest) for name, digest in manifest.get("digests", {}).items()},
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("cache %s unreadable (%s); rebuilding it", directory, err)
            return None
        if isinstance(manifest.get("store_version"), int) and manifest["store_version"] < STORE_VERSION:
            log.warning("cache %s was written by an older version, without content digests; rebuilding it", directory)
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
    def create(
        cls, directory: Path, key: dict, num_rows: int, shard_rows: int, fields: dict[str, Field]
    ) -> ShardedStore:
        """The store for ``key``, reusing the complete shards of one already there with the same
        layout; anything else in ``directory`` is removed, as are the partial files of
        interrupted writers. Called with the store's :func:`write_lock` held, so no other
        process is writing there."""
        directory = Path(directory)
        wanted = cls(directory, key, num_rows, shard_rows, fields)
        existing = cls.open(directory, key)
        if existing is not None and existing._layout() == wanted._layout():
            for partial in directory.glob(".*.partial"):
                partial.unlink(missing_ok=True)
            return existing
        directory.mkdir(parents=True, exist_ok=True)
        for entry in directory.iterdir():
            if entry.name == LOCK:
                continue  # the lock the caller holds
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        wanted._save_manifest()
        return wanted

    # ---- completeness --------------------------------------------------------------------

    def _files_complete(self, shard: int) -> bool:
        rows = len(self.shard_range(shard))
        for name, spec in self.fields.items():
            layout = _npy_layout(self.path(name, shard))
            if layout is None or layout[0] != (rows, *spec.shape) or layout[1] != np.dtype(spec.dtype):
                return False
        return True

    def shard_complete(self, shard: int) -> bool:
        """Every file of ``shard`` is there with its full shape and has a recorded digest."""
        return all(self.path(name, shard).name in self.digests for name in self.fields) and self._files_complete(shard)

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.shard_complete(k)]

    def damaged_shards(self, shards: Sequence[int] | None = None) -> dict[int, list[str]]:
        """``{shard: what is wrong, naming the file}`` of the shards (of ``shards``; default
        all) with a file that is gone or cut off or no longer matches its digest. Files that
        match are not hashed again by this store object until they change."""
        damaged: dict[int, list[str]] = {}
        for shard in range(self.num_shards) if shards is None else shards:
            for name in self.fields:
                path = self.path(name, shard)
                try:
                    with open(path, "rb") as handle:
                        self._data_offset(name, shard, path, handle.fileno())
                except OSError as err:
                    damaged.setdefault(shard, []).append(str(err) if str(path) in str(err) else f"{path}: {err}")
        return damaged

    def adopt(self, shards: Sequence[int]) -> None:
        """Record the digests of ``shards``, complete but written by other processes of this
        run (under torchrun, the other ranks), and save the manifest."""
        for shard in shards:
            if self._files_complete(shard):
                for name in self.fields:
                    with open(self.path(name, shard), "rb") as handle:
                        self.digests[self.path(name, shard).name] = _content_digest(handle.fileno())
        self._save_manifest()

    @contextlib.contextmanager
    def write_shard(self, shard: int) -> Iterator[dict[str, np.memmap]]:
        """Writable memory maps ``{field: (rows, *shape)}`` of shard ``shard``, zero-filled,
        renamed into place, and their digests recorded, only when the block exits without an
        error. Partial files carry the writer's pid and host, so no process ever renames
        another's."""
        rows = len(self.shard_range(shard))
        partial = {
            name: self.directory / f".{self.path(name, shard).name}.{writer_id()}.partial" for name in self.fields
        }
        arrays: dict[str, np.memmap] = {
            name: np.lib.format.open_memmap(
                partial[name], mode="w+", dtype=np.dtype(spec.dtype), shape=(rows, *spec.shape)
            )
            for name, spec in self.fields.items()
        }
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
            with open(path, "rb") as handle:
                digest = _content_digest(handle.fileno())  # the bytes just written: still in the page cache
            os.replace(path, self.path(name, shard))
            self.digests[self.path(name, shard).name] = digest
        if self.keeps_manifest:
            self._save_manifest()

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
                handle = open(path, "rb")  # noqa: SIM115 - entered below; only the open's error is reworded
            except OSError as err:
                raise OSError(
                    f"{path}: missing or cut off ({err.strerror}); delete {self.directory} to rebuild the cache"
                ) from err
            with handle:
                fd = handle.fileno()
                try:
                    offset = self._data_offset(field, int(shard), path, fd)
                except ShardDigestError as err:
                    raise ShardDigestError(f"{err}; the next run extracts it again") from None
                in_shard = shards[starts] == shard
                for start, stop in zip(starts[in_shard], stops[in_shard], strict=True):
                    local = int(ordered[start]) - int(shard) * self.shard_rows
                    count = int(stop - start)
                    data = os.pread(fd, count * spec.row_bytes, offset + local * spec.row_bytes)
                    if len(data) != count * spec.row_bytes:
                        raise OSError(f"{path}: cut off; delete {self.directory} to rebuild the cache")
                    flat[order[start:stop]] = np.frombuffer(data, np.uint8).reshape(count, -1)
        return out

    def _data_offset(self, field: str, shard: int, path: Path, fd: int) -> int:
        """Where the rows of the open shard file ``fd`` start, parsed, and the file checked
        against its digest, once per file version."""
        stat = os.fstat(fd)
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._offsets.get((field, shard))
        if cached is not None and cached[0] == version:
            return cached[1]
        layout = _npy_layout(path)
        if layout is None:
            raise OSError(f"{path}: missing or cut off; delete {self.directory} to rebuild the cache")
        digest = _content_digest(fd)
        if digest != self.digests.get(path.name) and digest != self._recorded_digest(path.name):
            raise ShardDigestError(
                f"{path}: its content does not match the digest recorded when it was written (damaged or changed since)"
            )
        self._offsets[(field, shard)] = (version, layout[2])
        return layout[2]

    def _recorded_digest(self, name: str) -> str | None:
        """The digest of file ``name`` in the manifest on disk now: another process may have
        extracted the file again since this store was opened."""
        try:
            digest = self._read_manifest(self.directory).get("digests", {}).get(name)
        except (OSError, ValueError, AttributeError):
            return None
        if digest is not None:
            self.digests[name] = digest
        return digest

    def read_all(self, field: str) -> np.ndarray:
        """Every row of ``field`` (for small stores, such as the readable masks)."""
        return self.read(field, np.arange(self.num_rows))
