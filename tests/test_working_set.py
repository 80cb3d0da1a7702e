"""Working sets without a kernel: the file format, its errors, atomic saves, the recorder.

A working set names snapshot pages (base pages) in first-touch order; the file
stores them as runs (zigzag varint deltas), under a header and a CRC-32. These
tests pin what a reader of a damaged, truncated, foreign or hand-made file gets
(a ``WorkingSetError`` saying what is wrong, never a wrong set), that a save
never leaves half a file, and how recordings of several processes merge.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import uffd_async as ua
from uffd_async._capture._identity import snapshot_identity
from uffd_async._restore._working_set import _HEADER, MAGIC, VERSION

P = ua.PAGE_SIZE
IDENTITY = bytes(range(32))
SNAPSHOT_PAGES = 4096


def working_set(pages: list[int], size_pages: int = SNAPSHOT_PAGES) -> ua.WorkingSet:
    return ua.WorkingSet(snapshot_size=size_pages * P, identity=IDENTITY, pages=pages)


def reseal(body: bytes) -> bytes:
    """``body`` (a file without its CRC) with a correct CRC: a well-formed lie."""
    return body + struct.pack("<I", zlib.crc32(body))


def with_header(data: bytes, **fields: int) -> bytes:
    """``data`` (a valid file) with header fields replaced, and sealed again."""
    names = ("magic", "version", "flags", "page_size", "size", "identity", "pages", "runs")
    values = dict(zip(names, _HEADER.unpack_from(data), strict=True))
    values.update(fields)
    header = _HEADER.pack(*(values[name] for name in names))
    return reseal(header + data[_HEADER.size : -4])


# -- round trips ------------------------------------------------------------------------


@given(
    st.lists(st.integers(0, SNAPSHOT_PAGES - 1), unique=True, max_size=600).flatmap(
        lambda pages: st.permutations(pages)
    )
)
def test_any_page_order_round_trips(pages: list[int]) -> None:
    """Any order, no repeats: the same pages come back, in the same order."""
    original = working_set(pages)
    data = original.to_bytes()
    assert ua.WorkingSet.from_bytes(data) == original
    assert ua.WorkingSet.from_bytes(data).pages == tuple(pages)


@given(
    st.lists(st.integers(0, SNAPSHOT_PAGES - 1), unique=True, max_size=300),
    st.integers(1, 70),
)
def test_runs_group_consecutive_pages_and_respect_max(pages: list[int], max_pages: int) -> None:
    runs = list(working_set(pages).runs(max_pages))
    assert [p for first, count in runs for p in range(first, first + count)] == pages
    assert all(1 <= count <= max_pages for _, count in runs)
    unbounded = list(working_set(pages).runs())
    # Unbounded, two runs in a row are never consecutive (they would be one).
    for (a, n), (b, _) in itertools.pairwise(unbounded):
        assert b != a + n


def test_runs_examples() -> None:
    assert list(working_set(list(range(10))).runs(4)) == [(0, 4), (4, 4), (8, 2)]
    assert list(working_set([5, 6, 7, 1, 2, 10]).runs()) == [(5, 3), (1, 2), (10, 1)]
    assert list(working_set([7, 6, 5]).runs()) == [(7, 1), (6, 1), (5, 1)]  # order kept
    assert list(working_set([]).runs()) == []
    assert ua.WorkingSet.from_bytes(working_set([]).to_bytes()).pages == ()


def test_a_boot_sized_working_set_is_a_few_kib() -> None:
    """The issue's shape: 52 MiB of a 256 MiB snapshot, in runs of 1 to 64 pages at random
    places, in a random order: a few KiB on disk (8 bytes a page would be 104 KiB)."""
    rng = random.Random(11)
    snapshot_pages = (256 << 20) // P
    taken = bytearray(snapshot_pages)
    runs: list[range] = []
    total = 0
    while total < (52 << 20) // P:
        length = rng.randint(1, 64)
        start = rng.randrange(snapshot_pages - length)
        if any(taken[start - 1 if start else 0 : start + length + 1]):
            continue  # keep runs apart, so each stays one run
        taken[start : start + length] = b"\1" * length
        runs.append(range(start, start + length))
        total += length
    rng.shuffle(runs)
    pages = [page for run in runs for page in run]
    ws = ua.WorkingSet(snapshot_size=256 << 20, identity=IDENTITY, pages=pages)
    data = ws.to_bytes()
    assert len(data) < 4096, f"{len(data)} bytes for {len(pages)} pages in {len(runs)} runs"
    assert ua.WorkingSet.from_bytes(data) == ws
    assert len(list(ws.runs())) == len(runs)


def test_the_header_says_what_it_holds() -> None:
    data = working_set([3, 4, 5, 9]).to_bytes()
    magic, version, flags, page_size, size, identity, pages, runs = _HEADER.unpack_from(data)
    assert (magic, version, flags, page_size) == (MAGIC, VERSION, 0, P)
    assert (size, identity, pages, runs) == (SNAPSHOT_PAGES * P, IDENTITY, 4, 2)
    assert data[-4:] == struct.pack("<I", zlib.crc32(data[:-4]))


# -- files that are not (or no longer) working sets -------------------------------------

VALID = working_set([40, 41, 42, 7, 100, 99, 3000]).to_bytes()


@pytest.mark.parametrize("position", [len(MAGIC) + 6, _HEADER.size - 3, _HEADER.size, -5, -1])
def test_a_flipped_byte_is_caught(position: int) -> None:
    damaged = bytearray(VALID)
    damaged[position] ^= 0x10
    with pytest.raises(ua.WorkingSetError, match="damaged or truncated"):
        ua.WorkingSet.from_bytes(bytes(damaged))


@pytest.mark.parametrize("keep", [0, 10, _HEADER.size, _HEADER.size + 3, len(VALID) - 1])
def test_a_truncated_file_is_caught(keep: int) -> None:
    with pytest.raises(ua.WorkingSetError, match="truncated"):
        ua.WorkingSet.from_bytes(VALID[:keep])


def test_a_file_that_is_not_a_working_set() -> None:
    with pytest.raises(ua.WorkingSetError, match="magic is wrong"):
        ua.WorkingSet.from_bytes(b"\x7fELF" + VALID[4:])
    with pytest.raises(ua.WorkingSetError, match="magic is wrong"):
        ua.WorkingSet.from_bytes(bytes(len(VALID)))


def test_another_version_is_named() -> None:
    with pytest.raises(ua.WorkingSetError, match=f"version 2; this library reads {VERSION}"):
        ua.WorkingSet.from_bytes(with_header(VALID, version=2))


def test_a_bad_page_size_is_refused() -> None:
    for bad in (1000, 2048, 3 * P):
        with pytest.raises(ua.WorkingSetError, match=f"page size {bad} is not a power of two"):
            ua.WorkingSet.from_bytes(with_header(VALID, page_size=bad))


def test_pages_outside_the_snapshot_are_refused() -> None:
    outside = working_set([3, 12], size_pages=10).to_bytes()
    with pytest.raises(ua.WorkingSetError, match=r"\[12, 13\) lies outside the 40960-byte"):
        ua.WorkingSet.from_bytes(outside)
    # A run that starts inside and ends past the end.
    with pytest.raises(ua.WorkingSetError, match="lies outside"):
        ua.WorkingSet.from_bytes(working_set([8, 9, 10], size_pages=10).to_bytes())
    # The same file with a smaller snapshot in its header (sealed again).
    with pytest.raises(ua.WorkingSetError, match="lies outside"):
        ua.WorkingSet.from_bytes(with_header(VALID, size=100 * P))


def test_a_repeated_page_is_refused() -> None:
    for pages in ([1, 2, 1], [5, 6, 7, 6], [9, 9]):
        with pytest.raises(ua.WorkingSetError, match="appears twice"):
            ua.WorkingSet.from_bytes(working_set(pages).to_bytes())


def test_counts_that_disagree_with_the_runs_are_refused() -> None:
    with pytest.raises(ua.WorkingSetError, match="says 8 pages in 5 runs but holds 7"):
        ua.WorkingSet.from_bytes(with_header(VALID, pages=8))
    with pytest.raises(ua.WorkingSetError, match="ends in the middle of a run"):
        ua.WorkingSet.from_bytes(with_header(VALID, runs=6))
    with pytest.raises(ua.WorkingSetError, match="but holds"):  # bytes left after the runs
        ua.WorkingSet.from_bytes(reseal(VALID[:-4] + b"\x00\x00"))


def test_a_foreign_working_set_does_not_match() -> None:
    ws = working_set([1, 2, 3])
    assert ws.matches(SNAPSHOT_PAGES * P, IDENTITY)
    assert not ws.matches(SNAPSHOT_PAGES * P, bytes(32))
    assert not ws.matches(SNAPSHOT_PAGES * P + P, IDENTITY)


def test_the_identity_samples_the_snapshot() -> None:
    """Size and contents count; a large snapshot is sampled (64 blocks of 4 KiB)."""
    small = ctypes.create_string_buffer(b"a" * (8 * P), 8 * P)
    other = ctypes.create_string_buffer(b"a" * (8 * P - 1) + b"b", 8 * P)
    address, other_address = ctypes.addressof(small), ctypes.addressof(other)
    assert len(snapshot_identity(address, 8 * P)) == 32
    assert snapshot_identity(address, 8 * P) != snapshot_identity(other_address, 8 * P)
    assert snapshot_identity(address, 8 * P) != snapshot_identity(address, 7 * P)
    size = 1 << 20  # 256 pages: the 64 samples are 4 pages apart
    big = ctypes.create_string_buffer(size)
    before = snapshot_identity(ctypes.addressof(big), size)
    big[P] = b"x"  # not in a sample
    assert snapshot_identity(ctypes.addressof(big), size) == before
    big[0] = b"x"  # in the first sample
    assert snapshot_identity(ctypes.addressof(big), size) != before
    before = snapshot_identity(ctypes.addressof(big), size)
    big[size - 100] = b"x"  # in the last sample, which ends with the snapshot's last block
    assert snapshot_identity(ctypes.addressof(big), size) != before


# -- saving and loading -----------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(".ws-"))


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "boot.ws"
    ws = working_set([5, 6, 7, 1])
    ws.save(path)
    assert ua.WorkingSet.load(path) == ws
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert leftovers(tmp_path) == []
    newer = working_set([5, 6, 7, 1, 2000])
    newer.save(str(path))  # over the old one
    assert ua.WorkingSet.load(path) == newer
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failed_save_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The new set goes to a temporary file in the same directory; a failure before the
    rename leaves the old file whole and removes the temporary one."""
    path = tmp_path / "boot.ws"
    old = working_set([1, 2, 3])
    old.save(path)
    seen: list[str] = []
    real_replace = os.replace

    def broken(*args: object) -> None:
        if failing == "replace":
            source = str(args[0])
            seen.append(source)
            assert os.path.dirname(source) == str(tmp_path), "not in the same directory"
            assert ua.WorkingSet.from_bytes(Path(source).read_bytes()).pages == (9,)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(OSError, match="No space left"):
        working_set([9]).save(path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert ua.WorkingSet.load(path) == old
    assert leftovers(tmp_path) == []
    if failing == "replace":
        assert len(seen) == 1


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "boot.ws"
    path.write_bytes(VALID[:-1])
    with pytest.raises(ua.WorkingSetError, match=f"^{path}: .*truncated"):
        ua.WorkingSet.load(path)
    with pytest.raises(FileNotFoundError):
        ua.WorkingSet.load(tmp_path / "missing.ws")
    assert issubclass(ua.WorkingSetError, ValueError)


# -- the recorder -----------------------------------------------------------------------


def test_the_recorder_keeps_first_touch_order_without_repeats() -> None:
    recorder = ua.WorkingSetRecorder(SNAPSHOT_PAGES * P, IDENTITY)
    recorder.record(7)
    recorder.record(3, 2)  # 3, 4
    recorder.record(7)
    recorder.record(4, 3)  # 5, 6 are new
    recorder.record(SNAPSHOT_PAGES - 1, 5)  # clipped at the snapshot's end
    recorder.record(SNAPSHOT_PAGES + 10)  # outside: nothing
    assert len(recorder) == 6
    ws = recorder.working_set()
    assert ws.pages == (7, 3, 4, 5, 6, SNAPSHOT_PAGES - 1)
    assert ws.matches(SNAPSHOT_PAGES * P, IDENTITY) and ws.page_size == P


def test_several_processes_merge_into_the_union_in_order_of_first_appearance() -> None:
    recorder = ua.WorkingSetRecorder(SNAPSHOT_PAGES * P, IDENTITY)
    first, second = [10, 11, 12, 50, 2], [50, 60, 11, 2, 61, 10, 3]
    recorder.record_pages(first)
    recorder.record_pages(second)
    assert recorder.working_set().pages == (10, 11, 12, 50, 2, 60, 61, 3)


def test_a_recording_refines_the_set_it_replays() -> None:
    """Started from a replayed set: that set first, then what the replay still missed."""
    base = working_set([3, 4, 5])
    recorder = ua.WorkingSetRecorder(SNAPSHOT_PAGES * P, IDENTITY, base=base)
    recorder.record_pages([9, 4, 1])
    assert recorder.working_set().pages == (3, 4, 5, 9, 1)
    # A base recorded for another snapshot is not carried over.
    foreign = ua.WorkingSet(snapshot_size=SNAPSHOT_PAGES * P, identity=bytes(32), pages=[3])
    recorder = ua.WorkingSetRecorder(SNAPSHOT_PAGES * P, IDENTITY, base=foreign)
    assert len(recorder) == 0
    recorder.record(8)
    assert recorder.working_set().pages == (8,)
