"""Serving several guest mappings from one memory snapshot file.

Kernel and protocol facts this module relies on:

* A snapshot file holds the guest's memory regions laid end to end; a mapping
  (:class:`~uffd_async._handoff._wire.GuestMapping`) says where its bytes start in
  the file (``offset``) and where the sender maps them
  (``base_host_virt_addr``). A fault at ``base + n`` gets byte ``offset + n``.
* The file is mapped read-only, once: ``UFFDIO_COPY`` then copies straight
  from the page cache into the faulting process, with no copy in Python. An
  access the file cannot back (it was truncated) makes the ioctl fail with
  EFAULT; nothing here ever touches the bytes itself.
* Remap, Remove and Unmap events name current addresses, which may span
  several mappings. Each mapping applies every event to its own bookkeeping
  (an :class:`~uffd_async._core._addrspace.AddressMap` ignores what does not
  concern it), and faults are routed by where the pages are *now*.
* A REMOVE (a balloon inflating, or MADV_DONTNEED in the sender) makes the
  range fault as missing again, and the right contents are then zeros, not
  the snapshot's bytes.
* On hugetlbfs every resolving ioctl covers whole huge pages, fault addresses
  are reported at the huge page's start, and ``UFFDIO_ZEROPAGE`` is not
  supported (EINVAL): a removed huge page gets a zeroed huge page through
  ``UFFDIO_COPY`` instead.
"""

from __future__ import annotations

import bisect
import errno
import functools
import mmap
import os
import stat
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .._capture._layer_file import MAGIC as LAYER_MAGIC
from .._core._abi import PAGE_SIZE
from .._core._addrspace import AddressMap
from .._core._errors import InvalidArgument, SnapshotClosed
from .._core._events import PageFault, Remap, Remove, Unmap
from .._core._memory import _MAP_SHARED, Region, _mmap
from .._core._native import libc
from .._core._uffd import Userfaultfd
from .._handoff._wire import GuestMapping, check_mappings
from .._remote._chunked_copy import ChunkedCopy
from .._serve._resolvers import CopyFrom, NoSourcePage, Resolver
from ._working_set import WorkingSetRecorder, snapshot_identity

if TYPE_CHECKING:
    from .._remote._http_source import HttpSource

__all__ = ["Snapshot", "SnapshotResolver"]


class Snapshot:
    """A memory snapshot file, mapped read-only once and shared by every resolver made from it.

    Close it (or leave its ``with`` block) only once no resolver of it is
    serving: a resolver of a closed snapshot refuses to serve (its faults
    then get what the server's ``on_error`` says) rather than copy from an
    address that may hold something else by then.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise InvalidArgument(
                    errno.EINVAL, f"the snapshot {self.path!r} is not a regular file"
                )
            if status.st_size == 0:
                raise InvalidArgument(
                    errno.EINVAL, f"the snapshot {self.path!r} is empty: there is nothing to serve"
                )
            if os.pread(fd, len(LAYER_MAGIC), 0) == LAYER_MAGIC:
                raise InvalidArgument(
                    errno.EINVAL,
                    f"{self.path!r} is a layer file, not a snapshot: serve its base image with "
                    "the layer on top (LayeredSnapshot(BASE, LAYER); on the command line: "
                    "serve BASE --layer LAYER)",
                )
            self.size = status.st_size
            self._address = _mmap(self.size, _MAP_SHARED, fd, prot=mmap.PROT_READ)
        finally:
            os.close(fd)  # the mapping keeps the file

    @property
    def closed(self) -> bool:
        return self._address == 0

    def resolver(
        self,
        mappings: Iterable[GuestMapping],
        *,
        readahead: int = 0,
        recorder: WorkingSetRecorder | None = None,
    ) -> SnapshotResolver:
        """A resolver for a process that maps ``mappings`` of this snapshot; see
        :class:`SnapshotResolver`."""
        return SnapshotResolver(self, mappings, readahead=readahead, recorder=recorder)

    @functools.cached_property
    def identity(self) -> bytes:
        """What a working set recorded for this snapshot carries (see ``snapshot_identity``)."""
        if self.closed:
            raise SnapshotClosed(self.path)
        return snapshot_identity(self._address, self.size)

    def _copier(self, mapping: GuestMapping, readahead: int) -> CopyFrom:
        """The resolver of one mapping's pages: UFFDIO_COPY straight from the page cache."""
        return CopyFrom(
            self._view(mapping),
            base=mapping.base_host_virt_addr,
            size=mapping.size,
            readahead=readahead,
            wp=False,
            page_size=mapping.page_size,
        )

    def _view(self, mapping: GuestMapping) -> Region:
        """The mapping's bytes in the file, as a source for ``copy_from`` (never closed)."""
        if self.closed:
            raise SnapshotClosed(self.path)
        return Region(self._address + mapping.offset, mapping.size, page_size=mapping.page_size)

    def close(self) -> None:
        """Unmap the file. Idempotent."""
        address, self._address = self._address, 0
        if address:
            libc.munmap(address, self.size)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<Snapshot{state} {self.path!r} size={self.size}>"


@functools.cache
def _zeros(size: int) -> bytes:
    return bytes(size)


class _Part:
    """One mapping: its copier, and where its pages are now (for routing, and huge zeros)."""

    __slots__ = ("copier", "huge", "mapping", "where")

    def __init__(
        self, mapping: GuestMapping, copier: CopyFrom, where: AddressMap, huge: bool
    ) -> None:
        self.mapping = mapping
        self.copier = copier
        self.where = where
        self.huge = huge

    def fork(self) -> _Part:
        return _Part(self.mapping, self.copier.fork(), self.where.copy(), self.huge)


class SnapshotResolver(Resolver):
    """Answers missing faults in several guest mappings from one :class:`Snapshot`.

    Each fault goes to the mapping whose pages are at its address now (after
    any mremap), which copies ``page_size`` bytes (a huge page for hugetlbfs
    mappings) from ``offset`` in the snapshot, plus up to ``readahead`` more
    pages not populated yet. Pages removed by MADV_DONTNEED (or a balloon)
    are served zeros. A fault outside every mapping raises
    :class:`~uffd_async.NoSourcePage`. Forks get a copy of all that state.
    With a ``recorder``, the snapshot pages demand faults ask for are recorded
    in it (see :class:`~uffd_async.WorkingSetRecorder`); with readahead, pages
    it brings in would never fault, so the two do not go together.
    """

    def __init__(
        self,
        snapshot: Snapshot | HttpSource,
        mappings: Iterable[GuestMapping],
        *,
        readahead: int = 0,
        recorder: WorkingSetRecorder | None = None,
    ) -> None:
        mappings = list(mappings)
        check_mappings(mappings, snapshot.size)
        self._snapshot = snapshot
        self._parts = [
            _Part(
                mapping,
                snapshot._copier(mapping, readahead),
                AddressMap(mapping.base_host_virt_addr, mapping.size),
                mapping.page_size > PAGE_SIZE,
            )
            for mapping in mappings
        ]
        if recorder is not None:
            for part in self._parts:
                part.copier._record_into(recorder, part.mapping.offset // PAGE_SIZE)
        self._link()
        self._route()

    def _link(self) -> None:
        """A chunk that lands for one mapping fills every mapping's pages within it."""
        chunked = [part.copier for part in self._parts if isinstance(part.copier, ChunkedCopy)]
        for copier in chunked:
            copier._together = chunked

    @property
    def mappings(self) -> tuple[GuestMapping, ...]:
        return tuple(part.mapping for part in self._parts)

    def _route(self) -> None:
        """Rebuild the routing table: sorted current ranges, and the part serving each."""
        table = sorted(
            ((start, end, part) for part in self._parts for start, end in part.where.segments()),
            key=lambda entry: entry[0],
        )
        self._starts = [start for start, _, _ in table]
        self._ends = [end for _, end, _ in table]
        self._owners = [part for _, _, part in table]

    def _part_for(self, address: int) -> _Part:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._ends[i]:
            return self._owners[i]
        raise NoSourcePage(
            f"no mapping holds the page at {address:#x}: the process registered memory it "
            "did not list in its mappings, or the pages moved away or were unmapped"
        )

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        part = self._serving(fault, uffd)
        return part is None or part.copier.resolve_now(fault, uffd)

    async def resolve(self, fault: PageFault, uffd: Userfaultfd) -> None:
        part = self._serving(fault, uffd)
        if part is not None:
            await part.copier.resolve(fault, uffd)

    def _serving(self, fault: PageFault, uffd: Userfaultfd) -> _Part | None:
        """The part that serves ``fault``, or None when it was served here (a removed huge
        page: zeros, by COPY since hugetlbfs has no ZEROPAGE)."""
        if self._snapshot.closed:
            raise SnapshotClosed(self._snapshot.path)
        part = self._part_for(fault.address)
        if part.huge:
            page = fault.address & ~(part.mapping.page_size - 1)
            original = part.where.original(page)
            if original is not None and original in part.where.removed:
                uffd.copy(page, _zeros(part.mapping.page_size))
                return None
        return part

    def apply(self, event: Remap | Remove | Unmap) -> None:
        for part in self._parts:
            part.copier.apply(event)
            part.where.apply(event)
        if not isinstance(event, Remove):
            self._route()

    def fork(self) -> SnapshotResolver:
        child = object.__new__(SnapshotResolver)
        child._snapshot = self._snapshot
        child._parts = [part.fork() for part in self._parts]
        child._link()
        child._route()
        return child

    # -- prefetching (see _prefetch) -------------------------------------------

    def _spans(self, first: int, count: int) -> Iterator[tuple[_Part, int, int]]:
        """(part, its first base page, pages) for each mapping holding part of snapshot
        base pages ``[first, first + count)``."""
        start, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
        for part in self._parts:
            mapping = part.mapping
            low = max(start, mapping.offset)
            high = min(end, mapping.offset + mapping.size)
            if low < high:
                yield part, (low - mapping.offset) // PAGE_SIZE, (high - low) // PAGE_SIZE

    def _prefetch(self, uffd: Userfaultfd, first: int, count: int) -> None:
        """Copy snapshot base pages ``[first, first + count)`` into every mapping that
        holds them, where they are still in place and not populated yet."""
        if self._snapshot.closed:
            raise SnapshotClosed(self._snapshot.path)
        for part, part_first, pages in self._spans(first, count):
            part.copier._prefetch(uffd, part_first, pages)

    def _guide(self, runs: Iterable[tuple[int, int]]) -> None:
        """Demand faults in a working set's run bring the rest of it (see CopyFrom._guide)."""
        per_part: dict[int, list[tuple[int, int]]] = {id(part): [] for part in self._parts}
        for first, count in runs:
            for part, part_first, pages in self._spans(first, count):
                per_part[id(part)].append((part_first, pages))
        for part in self._parts:
            part.copier._guide(per_part[id(part)])

    @property
    def _chunk_source(self) -> HttpSource | None:
        """The source read a chunk at a time, if it is one (the prefetcher then fetches)."""
        return None if isinstance(self._snapshot, Snapshot) else self._snapshot

    def _fill_span(self, uffd: Userfaultfd, lo: int, data: bytes) -> None:
        """Copy the missing pages of every mapping whose bytes lie within ``data`` (the
        source's bytes from ``lo``); chunk sources only."""
        if self._snapshot.closed:
            raise SnapshotClosed(self._snapshot.path)
        for part in self._parts:
            assert isinstance(part.copier, ChunkedCopy)
            part.copier._fill_span(uffd, lo, data)

    def _chunk_missing(self, chunk: int) -> bool:
        return any(
            isinstance(part.copier, ChunkedCopy) and part.copier._chunk_missing(chunk)
            for part in self._parts
        )

    def _source_runs(self) -> list[tuple[int, int]]:
        """(first base page, pages) of the snapshot that the mappings hold, in file order."""
        return sorted((m.offset // PAGE_SIZE, m.size // PAGE_SIZE) for m in self.mappings)

    def _populated(self) -> tuple[int, int]:
        """(bytes populated, bytes mapped) over every mapping."""
        done = total = 0
        for part in self._parts:
            done += part.copier._populated.count(1) * part.mapping.page_size
            total += part.mapping.size
        return done, total

    def __repr__(self) -> str:
        return f"<SnapshotResolver of {self._snapshot!r}: {len(self._parts)} mappings>"
