"""The one atomic-file writer (``uffd_async._core._atomic_file``) and the four writers built on it:
live images, layers and squashed images (``LayerWriter``, ``ImageWriter``, ``squash``), and
working sets.

What each must do, asserted on the files themselves: created 0600 (a working set, which
holds page numbers and not memory, 0644) whatever the umask; the old file untouched and
no temporary file left when writing fails part-way or is interrupted; and the directory
fsynced after the rename (seen by wrapping ``os.fsync`` and ``os.replace``: a crash
cannot be had in a test, the order of the calls can).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import uffd_async as ua
from uffd_async._core import _atomic_file
from uffd_async._core._atomic_file import AtomicFile, MappedFile, write_atomically

P = ua.PAGE_SIZE


class Interrupted(BaseException):
    """What a cancellation or ^C looks like to synchronous code: not an Exception."""


@pytest.fixture(params=[0o000, 0o022, 0o277], ids=["umask-000", "umask-022", "umask-277"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(old)


def left_behind(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_layer(path: Path) -> None:
    with ua.LayerWriter(path, page_size=P, image_size=4 * P, pages=[1], parent=bytes(32)) as w:
        w.write_page(1, b"L" * P)
        w.commit()


def write_image(path: Path) -> None:
    with ua.ImageWriter(path, 4 * P, P) as w:
        w.write_page(0, b"I" * P)
        w.commit(allow_missing=True)


def write_squashed(path: Path) -> None:
    base = path.parent / "base.for-squash"
    if not base.exists():  # written once: under umask 277 it is read-only to its owner too
        base.write_bytes(b"B" * 4 * P)
    ua.squash(base, [], path)


def write_working_set(path: Path) -> None:
    ua.WorkingSet(snapshot_size=4 * P, identity=bytes(32), pages=[1, 2]).save(path)


WRITERS: dict[str, tuple[Callable[[Path], None], int]] = {
    "layer": (write_layer, 0o600),
    "image": (write_image, 0o600),
    "squash": (write_squashed, 0o600),
    "working-set": (write_working_set, 0o644),
    "atomic": (lambda path: write_atomically(path, b"data"), 0o600),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_the_mode_is_exact_whatever_the_umask(tmp_path: Path, umask: int, writer: str) -> None:
    write, wanted = WRITERS[writer]
    path = tmp_path / "out"
    write(path)
    assert mode(path) == wanted
    path.chmod(0o666)  # written again over a file others could read: the new one is not
    write(path)
    assert mode(path) == wanted
    assert left_behind(tmp_path) == []


@pytest.mark.parametrize("writer", list(WRITERS))
def test_the_directory_is_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(source: Any, target: Any) -> None:
        calls.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    WRITERS[writer][0](tmp_path / "out")
    assert calls[-3:] == ["fsync file", "rename", "fsync directory"], calls


@pytest.mark.parametrize("failing", ["pwrite", "fsync", "replace"])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), Interrupted()])
def test_a_failure_part_way_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, error: BaseException
) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"the old file")
    real = getattr(os, failing)
    seen: list[str] = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        if failing == "replace":
            seen.append(str(args[0]))
            assert os.path.dirname(str(args[0])) == str(tmp_path), "not in the same directory"
            assert mode(Path(args[0])) == 0o600, "readable by others while being written"
        raise error

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(type(error)):
        write_atomically(path, b"x" * (3 * P))
    monkeypatch.setattr(os, failing, real)
    assert path.read_bytes() == b"the old file"
    assert left_behind(tmp_path) == []
    assert len(seen) == (failing == "replace")


def test_a_writer_left_part_way_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"the old file")
    with pytest.raises(Interrupted):
        with ua.ImageWriter(path, 4 * P, P) as writer:
            writer.write_page(0, b"N" * P)
            assert len(left_behind(tmp_path)) == 1
            raise Interrupted
    file = AtomicFile(path, 3 * P, reserve=True)
    file.pwrite(b"N" * P, 0)
    file.abort()
    file.abort()  # idempotent
    assert path.read_bytes() == b"the old file"
    assert left_behind(tmp_path) == []


def test_a_commit_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"the old file, longer than the new one")
    file = AtomicFile(path, 2 * P)
    file.pwrite(b"new", P)
    assert path.read_bytes().startswith(b"the old file")  # nothing shows before the commit
    file.commit()
    assert path.read_bytes() == bytes(P) + b"new" + bytes(P - 3)
    assert file.closed and left_behind(tmp_path) == []


def test_a_mapped_file_for_a_path_and_for_an_open_file(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"old")
    mapped = MappedFile(path, 2 * P)
    try:
        ua.Region(mapped.address, 2 * P).write(P, b"page one")
        assert path.read_bytes() == b"old"
        mapped.commit()
    except BaseException:
        mapped.abort()
        raise
    assert path.read_bytes() == bytes(P) + b"page one" + bytes(P - 8)
    assert mode(path) == 0o600 and left_behind(tmp_path) == []
    with open(tmp_path / "open", "wb+") as file:
        file.write(b"\xff" * (3 * P))  # longer, and buffered: flushed, then truncated
        mapped = MappedFile(file, P)
        ua.Region(mapped.address, P).write(0, b"in place")
        mapped.commit()
        mapped.abort()  # after a commit: nothing left to undo
    assert (tmp_path / "open").read_bytes() == b"in place" + bytes(P - 8)
    aborted = MappedFile(tmp_path / "aborted", P)
    aborted.abort()
    assert not (tmp_path / "aborted").exists() and left_behind(tmp_path) == []


def test_what_a_mapped_file_refuses(tmp_path: Path) -> None:
    with pytest.raises(ua.InvalidArgument, match="a path or a binary file with a fileno"):
        MappedFile(object(), P)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        AtomicFile(tmp_path / "missing" / "out")
    assert os.listdir(tmp_path) == []
    assert _atomic_file.PRIVATE == 0o600
