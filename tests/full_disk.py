"""A real filesystem that fills up: a small tmpfs, mounted for one test.

Mounting needs root, as CI and the development machines run; elsewhere the
fixture fails saying so (it does not skip: a full disk is a defect we test).
`fill` takes every free byte, so that the next write needing a new page of
the filesystem (a file's bytes, a SQLite WAL frame, a new state file) meets
ENOSPC as it would on a real full disk.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "small_disk_fixture"]


@pytest.fixture(name="small_disk")
def small_disk_fixture(tmp_path: Path) -> Iterator[Path]:
    """An empty 4 MiB tmpfs, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (these tests run as root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        # Lazy: a server thread still closing a file does not keep it mounted.
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with one file; returns it (remove it to free the space)."""
    filler = disk / "filler"
    with filler.open("ab", buffering=0) as f:
        # Big writes first, then ever smaller ones for the last partial page.
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler
