"""The local side of transfers: safe names, destinations, fingerprints, the resume store,
the `.part` file a download is hashed and written into."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import IO, Any

import pytest

from tidewire.client._files import (
    WRITE_SIZE,
    PartFile,
    UploadStore,
    default_store_path,
    destination,
    fingerprint,
    safe_name,
)
from tidewire.client.exceptions import ChecksumMismatch

KIB = 1 << 10
MIB = 1 << 20


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("photo.jpg", "photo.jpg"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("/abs/path/x", "x"),
        ("..", "download"),
        ("...", "download"),
        ("dir/", "download"),
        (".bashrc", "bashrc"),
        ("a\x00b\x1fc\x7f.txt", "a_b_c_.txt"),
        ('what?<"x">|*:y', "what___x_____y"),
        ("name. . ", "name"),
        ("CON", "_CON"),
        ("nul.txt", "_nul.txt"),
        ("console.txt", "console.txt"),
        ("ünïcødé ✓.txt", "ünïcødé ✓.txt"),
    ],
)
def test_safe_name(name: str, expected: str) -> None:
    assert safe_name(name) == expected


def test_safe_name_cuts_long_names_keeping_the_extension() -> None:
    long = safe_name("é" * 300 + ".tar.gz")
    assert long.endswith(".gz") and len(long.encode()) <= 240
    long.encode().decode()  # not cut in the middle of a character
    assert len(safe_name("x" * 1000).encode()) <= 240


def test_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert destination(None, "../a.txt") == tmp_path / "a.txt"
    assert destination(tmp_path, "../../x") == tmp_path / "x"
    assert destination(str(tmp_path), "y") == tmp_path / "y"
    # Not a folder: the caller named the file itself, whatever the server calls it.
    assert destination(tmp_path / "mine.bin", "../../theirs") == tmp_path / "mine.bin"


def test_fingerprint_follows_size_name_time_and_ends() -> None:
    data = random.Random(0).randbytes(300 * KIB)

    def fp(content: bytes, name: str = "f", mtime: int | None = 1, start: int = 0) -> str:
        f = io.BytesIO(content)
        f.seek(7)
        result = fingerprint(f, start=start, size=len(content) - start, name=name, mtime_ns=mtime)
        assert f.tell() == 7  # left where it was
        return result

    base = fp(data)
    assert fp(data) == base
    assert fp(data[:-1]) != base
    assert fp(data, name="g") != base
    assert fp(data, mtime=2) != base
    assert fp(b"X" + data[1:]) != base
    assert fp(data[:-1] + b"X") != base
    assert fp(data, start=5) != base
    assert fp(b"") == fp(b"")  # an empty file is fine too


def test_upload_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "deep" / "er" / "uploads.json"
    store = UploadStore(path)
    assert store.get("k") is None  # no file yet
    store.put("k", "http://h/uploads/1")
    store.put("j", "http://h/uploads/2")
    assert UploadStore(path).get("k") == "http://h/uploads/1"  # another process sees it
    store.remove("k")
    assert store.get("k") is None and store.get("j") == "http://h/uploads/2"
    assert [p.name for p in path.parent.iterdir()] == ["uploads.json"]  # no temp files left

    for junk in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"k": "not an entry"}'):
        path.write_bytes(junk)
        assert store.get("k") is None
        store.put("k", "u")  # and a write replaces the junk
        assert store.get("k") == "u"

    # Old entries go at the next write.
    old = UploadStore(path, max_age=60)
    path.write_text(json.dumps({"stale": {"url": "s", "time": 1.0}}))
    old.put("fresh", "f")
    assert old.get("stale") is None and old.get("fresh") == "f"

    # A store that cannot be written is only a warning: uploads go on.
    blocked = UploadStore(tmp_path / "a-file" / "uploads.json")
    (tmp_path / "a-file").write_text("in the way")
    blocked.put("k", "u")
    assert blocked.get("k") is None
    assert "will not be resumable" in caplog.text


def test_default_store_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "tidewire" / "uploads.json"
    assert UploadStore().path == tmp_path / "tidewire" / "uploads.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the spec says: ignore it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / ".cache" / "tidewire" / "uploads.json"


# -- PartFile ----------------------------------------------------------------


class WriteSizes:
    """A file that notes the size of every write, and passes them on."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.sizes: list[int] = []

    def write(self, data: Any) -> int:
        self.sizes.append(len(data))
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def receive(target: Path, data: bytes, sha256: str) -> tuple[PartFile, WriteSizes]:
    """`data` written into `target`'s .part as a download would, in uneven pieces."""
    part = PartFile(target, size=len(data), sha256=sha256, label="x", resume=False, tick=id)
    spy = WriteSizes(part.file)
    part.file = spy  # type: ignore[assignment]
    rng = random.Random(1)
    done = 0
    while done < len(data):
        n = rng.randint(1, 700 * KIB)
        backlog = part.write(data[done : done + n])
        if backlog is not None:
            backlog.result()
        done += n
    return part, spy


def test_part_file_writes_in_small_writes(tmp_path: Path) -> None:
    """Blocks go to the disk in writes of WRITE_SIZE: 1 MiB writes cost Linux several
    times the kernel time per GiB (bench W7)."""
    data = random.Random(0).randbytes(5 * MIB + 3)
    part, spy = receive(tmp_path / "f.bin", data, hashlib.sha256(data).hexdigest())
    with part:
        assert part.finish() == tmp_path / "f.bin"
    assert (tmp_path / "f.bin").read_bytes() == data
    assert sum(spy.sizes) == len(data)
    assert max(spy.sizes) <= WRITE_SIZE < MIB


def test_part_file_hashed_in_its_thread_still_catches_a_wrong_byte(tmp_path: Path) -> None:
    data = random.Random(0).randbytes(5 * MIB + 3)
    wrong = bytearray(data)
    wrong[3 * MIB + 17] ^= 1  # in a block hashed while the next ones arrive
    part, _ = receive(tmp_path / "f.bin", bytes(wrong), hashlib.sha256(data).hexdigest())
    with part, pytest.raises(ChecksumMismatch) as caught:
        part.finish()
    assert caught.value.actual == hashlib.sha256(wrong).hexdigest()
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part
