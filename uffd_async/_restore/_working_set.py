"""Working sets: which snapshot pages a restored process asked for, in first-touch order.

No I/O but the file's own. Facts this module relies on:

* A working set names *snapshot* pages (offsets in the memory file, in base
  pages of ``PAGE_SIZE``), never addresses: a restored process maps its
  memory somewhere else every time. A fault on a huge page records every
  base page of it.
* Demand faults are what a recording sees. Pages that readahead or a
  prefetch brought in never fault, so they never reach a recording: record
  with readahead off (the server refuses both at once), and a recording made
  while replaying adds what the replay missed to the set it replayed.
* Restored processes touch memory in runs (kernel text, a heap, a stack), so
  the page indices are stored as runs: a zigzag varint delta from the end of
  the previous run, and the run's length. A 52 MiB working set is a few KiB.
* A working set recorded for another snapshot is only ever a waste of time,
  never of bytes: the pages it names are copied from the snapshot being
  served. Its identity (:mod:`uffd_async._capture._identity`) is checked so
  that time is not wasted.
* The file is written atomically (:mod:`uffd_async._core._atomic_file`): a
  reader sees the old set or the new one, never half of one. It names pages,
  not their bytes, so it is readable by all (0644). A CRC-32 over the whole
  file catches corruption.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator

import attrs

from .._core._abi import PAGE_SIZE
from .._core._atomic_file import write_atomically
from .._core._checks import is_page_size
from .._core._errors import WorkingSetError

__all__ = ["WorkingSet", "WorkingSetError", "WorkingSetRecorder"]

MAGIC = b"UAWSET\r\n"
VERSION = 1
#: magic, version, flags, page size, snapshot size, snapshot identity, pages, runs.
_HEADER = struct.Struct("<8sHHIQ32sQQ")
_CRC = struct.Struct("<I")


def _int_tuple(pages: Iterable[int]) -> tuple[int, ...]:
    return tuple(pages)


def _runs_of(pages: tuple[int, ...], limit: int) -> Iterator[tuple[int, int]]:
    start = count = 0
    for page in pages:
        if count and page == start + count and count < limit:
            count += 1
            continue
        if count:
            yield start, count
        start, count = page, 1
    if count:
        yield start, count


@attrs.frozen(kw_only=True)
class WorkingSet:
    """The snapshot pages a restored process touched, in first-touch order, without repeats."""

    #: The unit of ``pages``: the base page size it was recorded with.
    page_size: int = PAGE_SIZE
    #: The size and identity of the snapshot it was recorded for
    #: (:func:`~uffd_async._capture._identity.snapshot_identity`).
    snapshot_size: int
    identity: bytes
    #: Page indices into the snapshot (offset // page_size), first touch first.
    pages: tuple[int, ...] = attrs.field(converter=_int_tuple)

    # The runs by their longest, worked out once: a server replays one set for every
    # restore, and the runs are on its way to the first copy.
    _runs: dict[int, tuple[tuple[int, int], ...]] = attrs.field(
        factory=dict, init=False, eq=False, repr=False
    )

    def runs(self, max_pages: int | None = None) -> Iterator[tuple[int, int]]:
        """(first page, pages) for each run of consecutive indices, in recorded order."""
        limit = max_pages or 1 << 62
        runs = self._runs.get(limit)
        if runs is None:
            runs = self._runs[limit] = tuple(_runs_of(self.pages, limit))
        return iter(runs)

    def to_bytes(self) -> bytes:
        body = bytearray()
        runs = 0
        end = 0
        for start, count in self.runs():
            _varint(body, _zigzag(start - end))
            _varint(body, count - 1)
            end = start + count
            runs += 1
        header = _HEADER.pack(
            MAGIC, VERSION, 0, self.page_size, self.snapshot_size, self.identity,
            len(self.pages), runs,
        )  # fmt: skip
        data = header + bytes(body)
        return data + _CRC.pack(zlib.crc32(data))

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkingSet:
        if len(data) < _HEADER.size + _CRC.size:
            raise WorkingSetError(f"{len(data)} bytes is too short for a working set (truncated?)")
        if not data.startswith(MAGIC):
            raise WorkingSetError("not a working-set file (its magic is wrong)")
        _, version, _, page_size, size, identity, count, runs = _HEADER.unpack_from(data)
        if version != VERSION:
            raise WorkingSetError(f"working-set version {version}; this library reads {VERSION}")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(data[: -_CRC.size]) != crc:
            raise WorkingSetError("the working-set file is damaged or truncated (CRC mismatch)")
        if not is_page_size(page_size):
            raise WorkingSetError(f"its page size {page_size} is not a power of two >= 4096")
        position = _HEADER.size
        end_of_body = len(data) - _CRC.size
        pages: list[int] = []
        seen: set[int] = set()
        previous_end = 0
        try:
            for _ in range(runs):
                delta, position = _read_varint(data, position, end_of_body)
                length, position = _read_varint(data, position, end_of_body)
                start = previous_end + _unzigzag(delta)
                length += 1
                if start < 0 or (start + length) * page_size > size:
                    raise WorkingSetError(
                        f"a run of pages [{start}, {start + length}) lies outside the "
                        f"{size}-byte snapshot"
                    )
                run = range(start, start + length)
                if seen.intersection(run):
                    raise WorkingSetError("a page appears twice in the working set")
                seen.update(run)
                pages.extend(run)
                previous_end = start + length
                if len(pages) > count:
                    break
        except IndexError:
            raise WorkingSetError("the working set ends in the middle of a run") from None
        if len(pages) != count or position != end_of_body:
            raise WorkingSetError(
                f"the working set says {count} pages in {runs} runs but holds {len(pages)}"
            )
        return cls(page_size=page_size, snapshot_size=size, identity=identity, pages=pages)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WorkingSet:
        """Read a working-set file; :class:`WorkingSetError` (naming it) if it is not one."""
        with open(path, "rb") as f:
            data = f.read()
        try:
            return cls.from_bytes(data)
        except WorkingSetError as exc:
            raise WorkingSetError(f"{os.fspath(path)}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write it atomically: readers see the old file or this one, never a mix."""
        write_atomically(path, self.to_bytes(), mode=0o644)

    def matches(self, snapshot_size: int, identity: bytes) -> bool:
        return (self.snapshot_size, self.identity) == (snapshot_size, identity)


class WorkingSetRecorder:
    """Records the snapshot pages demand faults ask for, first touch first, across processes.

    Resolvers call :meth:`record` for each page they copy for a fault (not for
    readahead). Several processes may share one recorder: the result is the
    union of their sets, in order of first appearance. Start from ``base`` (a
    set being replayed) to add what a replay still missed.
    """

    def __init__(
        self, snapshot_size: int, identity: bytes, *, base: WorkingSet | None = None
    ) -> None:
        self.snapshot_size = snapshot_size
        self.identity = identity
        self._pages: list[int] = []
        self._seen = bytearray(-(-snapshot_size // PAGE_SIZE))
        if base is not None and base.matches(snapshot_size, identity):
            self.record_pages(base.pages)

    def record(self, first: int, count: int = 1) -> None:
        """Base pages ``[first, first + count)`` of the snapshot were asked for."""
        seen = self._seen
        for page in range(first, min(first + count, len(seen))):
            if not seen[page]:
                seen[page] = 1
                self._pages.append(page)

    def record_pages(self, pages: Iterable[int]) -> None:
        for page in pages:
            self.record(page)

    def __len__(self) -> int:
        return len(self._pages)

    def working_set(self) -> WorkingSet:
        return WorkingSet(
            page_size=PAGE_SIZE,
            snapshot_size=self.snapshot_size,
            identity=self.identity,
            pages=self._pages,
        )


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def _unzigzag(value: int) -> int:
    return value // 2 if not value & 1 else -(value + 1) // 2


def _varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _read_varint(data: bytes, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 70:
            raise IndexError
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position
