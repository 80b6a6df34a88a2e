"""File I/O every stage shares: atomic writes, JSON, safe torch loads and file digests.

Every file this project writes goes through :func:`atomic_write`, so a run killed
mid-write leaves the previous file intact instead of a truncated one. The temporary file
such a run leaves behind is removed by the next successful write of the same file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO


class OptionError(ValueError):
    """An option value that cannot work; the message names the option."""


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, unsafe, or does not fit the run; names the file."""


def writer_id() -> str:
    """``PID@HOST``: names a temporary file for the process writing it, so leftovers of a
    killed writer can be told from files still being written."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of ``path`` (``.NAME.PID@HOST.XXXX.tmp``) whose writer ran
    on this machine and is no longer running: a killed run's leftovers. A live writer's
    file is kept, and so is one from another machine, whose processes this one cannot see."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)@(.+)\.[^.]+\.tmp")
    host = socket.gethostname()
    for candidate in path.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and match[2] == host and not _pid_alive(int(match[1])):
            candidate.unlink(missing_ok=True)


def _create_temporary(path: Path) -> Path:
    """An empty new file ``.NAME.PID@HOST.RANDOM.tmp`` beside ``path``, created with mode 0666
    less the umask, as ``open`` creates any file: ``tempfile.mkstemp`` would make it 0600, and
    the rename would leave every output (submission, report, checkpoints) unreadable to the
    group and to others whatever the user's umask. The kernel applies the umask, so no
    process-wide ``os.umask`` call (racy with other threads) is needed."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{writer_id()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


# What a write itself can fail with (no space, over quota, too large, an I/O error, read-only).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


@contextlib.contextmanager
def _replacing(path: str | Path, clean: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed over it when the block completes and
    removed when it fails: the rename is atomic, so ``path`` is never half-written.

    The temporary name holds the writer's pid and host, so once the rename is done the
    leftovers of earlier writers of ``path`` that were killed can be told from those still
    being written (``clean``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        # A failed write() or flush() names no file; the error is about the file being written.
        if err.filename is None and err.errno in WRITE_ERRNOS:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    if clean:
        _remove_stale_temporaries(path)


def atomic_write(path: str | Path, write: Callable[[Path], object], durable: bool = True) -> None:
    """Run ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    ``durable`` also flushes the file to disk before the rename, so a power cut cannot
    leave an empty file under the final name, and then removes the temporary files an
    earlier, killed writer of ``path`` left. Bulk writers of files that are cheap to
    regenerate (the demo images) skip both: listing a folder of thousands of files after
    each one would cost more than writing it, and they clear their own folder.
    """
    with _replacing(path, clean=durable) as tmp:
        write(tmp)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_text_writer(path: str | Path) -> Iterator[TextIO]:
    """A UTF-8 text file written piece by piece that appears under ``path`` only once the
    block completes: streaming output (a submission of millions of rows) without holding
    it in memory, and still never a half-written file."""
    with _replacing(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write a binary file atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), durable)


def write_json(path: str | Path, value: object, sort_keys: bool = False) -> None:
    """Write ``value`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=sort_keys, default=str) + "\n")


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """``torch.save`` atomically."""
    import torch  # here, not above: the parsers import this module, and --help must not wait for torch

    def save(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            # torch says a failed write (a full disk) as "unexpected pos ..." or "file write failed".
            if "unexpected pos" not in str(err) and "write failed" not in str(err):
                raise
            stats = os.statvfs(tmp.parent)
            if stats.f_bavail == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
            raise OSError(errno.EIO, f"torch.save could not write it ({str(err).splitlines()[0]})", str(path)) from err

    atomic_write(path, save)


def _weights_only_reason(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only error that says what was refused, without its advice
    (which suggests ``weights_only=False``, exactly what must not be done with such a file)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
    return specific[0] if specific else (lines[0] if lines else type(err).__name__)


def unique_keys_hook(refuse: Callable[[list[str]], Exception]) -> Callable[[list[tuple[str, object]]], dict]:
    """A ``json.loads`` ``object_pairs_hook`` that raises ``refuse(repeated keys)`` for a key
    given twice: json keeps the last one without a word, a value the reader never sees."""

    def hook(pairs: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise refuse(repeated)
        return dict(pairs)

    return hook


def safe_torch_load(path: str | Path) -> object:
    """``torch.load(weights_only=True)`` of any file: plain data, or a ``CheckpointError`` naming the file.

    weights_only refuses pickles that would build arbitrary objects or call functions, so a
    file crafted to run code on load is refused before any of it runs.
    """
    import torch  # see atomic_torch_save

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Both a crafted file and plain garbage end here: either way it is not a plain-data
        # file written by torch.save, and nothing in it has run.
        raise CheckpointError(
            f"{path}: refused to load: not a plain-data checkpoint written by torch.save ({_weights_only_reason(err)})"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse an arbitrary file means "not a checkpoint"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (a file's identity in cache keys and fingerprints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
