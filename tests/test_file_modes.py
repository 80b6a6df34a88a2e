"""Every file the pipeline writes gets the mode the umask gives a normally created file.

Atomic writes go through a temporary file renamed over the target; ``tempfile.mkstemp`` makes
that file 0600, so before the fix every output (submission, report, checkpoints) was unreadable
to the group and others whatever the umask.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from pipeline.io import atomic_text_writer, atomic_torch_save, atomic_write_bytes, atomic_write_text, write_json


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def write_every_kind(folder: Path) -> list[Path]:
    """One file through each atomic writer; returns their paths."""
    write_json(folder / "a.json", {"x": 1})
    atomic_write_text(folder / "b.txt", "text\n")
    atomic_write_bytes(folder / "c.bin", b"\x00\x01")
    atomic_write_bytes(folder / "d.jpg", b"\xff\xd8", durable=False)
    atomic_torch_save({"w": torch.zeros(2)}, folder / "e.pt")
    with atomic_text_writer(folder / "f.csv") as handle:
        handle.write("ImageID,Labels\n")
    return [folder / name for name in ("a.json", "b.txt", "c.bin", "d.jpg", "e.pt", "f.csv")]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, umask, mask, expected):
    umask(mask)
    for path in write_every_kind(tmp_path):
        assert file_mode(path) == expected, path.name
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_rewriting_a_file_gives_it_the_current_umask_mode(tmp_path, umask):
    umask(0o077)
    write_json(tmp_path / "a.json", 1)
    umask(0o022)
    write_json(tmp_path / "a.json", 2)
    assert file_mode(tmp_path / "a.json") == 0o644
