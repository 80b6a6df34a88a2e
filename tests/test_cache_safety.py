"""Outputs left half-written by a killed run: a killed writer's temporary file is removed by
the next write of the same file, and a live writer's is kept."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from pipeline.io import atomic_text_writer, atomic_write_text


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
