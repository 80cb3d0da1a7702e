"""Routing a process's faults to the copiers of its guest mappings, all from one snapshot source.

Kernel and protocol facts this module relies on:

* A mapping (:class:`~uffd_async._restore._guest_mapping.GuestMapping`) says where
  its bytes start in the source (``offset``) and where the process maps them
  (``base_host_virt_addr``). A fault at ``base + n`` gets byte ``offset + n``.
* Remap, Remove and Unmap events name current addresses, which may span
  several mappings. Each mapping applies every event to its own bookkeeping
  (an :class:`~uffd_async._core._addrspace.AddressMap` ignores what does not
  concern it), and faults are routed by where the pages are *now*.
* A REMOVE (a balloon inflating, or MADV_DONTNEED in the sender) gets zeros
  afterwards, not the snapshot's bytes (:mod:`uffd_async._core._addrspace`).
* On hugetlbfs every resolving ioctl covers whole huge pages, fault addresses
  are reported at the huge page's start, and ``UFFDIO_ZEROPAGE`` is not
  supported (EINVAL): a removed huge page gets a zeroed huge page through
  ``UFFDIO_COPY`` instead.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import attrs

from .._core._abi import PAGE_SIZE
from .._core._addrspace import AddressMap
from .._core._errors import SnapshotClosed
from .._core._events import PageFault, Remap, Remove, Unmap
from .._core._uffd import Userfaultfd
from .._serve._chunk_fill import ChunkFill, ChunkSource
from .._serve._resolvers import CopyFrom, MemoryPart, NoSourcePage, Resolver
from ._guest_mapping import GuestMapping, check_mappings
from ._working_set import WorkingSetRecorder

if TYPE_CHECKING:
    from ._source import SnapshotSource

__all__ = ["SnapshotResolver"]


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
    """Answers missing faults in several guest mappings from one snapshot source
    (a :class:`~uffd_async.Snapshot`, a :class:`~uffd_async.LayeredSnapshot`, an
    :class:`~uffd_async.HttpSource`: see ``SnapshotSource``).

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
        snapshot: SnapshotSource,
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
                snapshot.copier(mapping, readahead=readahead),
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
        """A unit fetched for one mapping fills every mapping's pages within it."""
        self._snapshot.group([part.copier for part in self._parts])

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

    # -- prefetching (see prefetch_pages) -------------------------------------------

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

    def prefetch_pages(self, uffd: Userfaultfd, first: int, count: int) -> None:
        """Copy snapshot base pages ``[first, first + count)`` into every mapping that
        holds them, where they are still in place and not populated yet."""
        if self._snapshot.closed:
            raise SnapshotClosed(self._snapshot.path)
        for part, part_first, pages in self._spans(first, count):
            part.copier.prefetch_pages(uffd, part_first, pages)

    def guide(self, runs: Iterable[tuple[int, int]], readahead: int = 0) -> None:
        """Demand faults in a working set's run bring the rest of it, others ``readahead``
        pages behind them (see CopyFrom.guide)."""
        per_part: dict[int, list[tuple[int, int]]] = {id(part): [] for part in self._parts}
        for first, count in runs:
            for part, part_first, pages in self._spans(first, count):
                per_part[id(part)].append((part_first, pages))
        for part in self._parts:
            part.copier.guide(per_part[id(part)], readahead)

    def memory_parts(self) -> list[MemoryPart] | None:
        """What a native copier may map itself, one part per mapping (see
        CopyFrom.memory_parts), or None when any mapping's pages need a decision."""
        if self._snapshot.closed:
            return None
        parts = []
        for part in self._parts:
            memory = part.copier.memory_parts()
            if memory is None:
                return None
            offset = part.mapping.offset // PAGE_SIZE
            parts += [attrs.evolve(m, first=m.first + offset) for m in memory]
        return parts

    @property
    def can_prefetch(self) -> bool:
        """Whether every mapping's bytes can be copied without awaiting (a mapped source)."""
        return all(part.copier.can_prefetch for part in self._parts)

    @property
    def chunk_fill(self) -> ChunkFill | None:
        """Itself when its source is fetched a chunk at a time (the prefetcher then fetches
        chunks ahead and fills them, see ChunkFill), else None."""
        return self if self._parts[0].copier.chunk_fill is not None else None

    @property
    def chunk_source(self) -> ChunkSource:
        fill = self._parts[0].copier.chunk_fill
        assert fill is not None, "a source fetched by chunks only"
        return fill.chunk_source

    def fill_span(self, uffd: Userfaultfd, lo: int, data: bytes) -> None:
        """Copy the missing pages of every mapping whose bytes lie within ``data`` (the
        source's bytes from ``lo``); chunk sources only."""
        if self._snapshot.closed:
            raise SnapshotClosed(self._snapshot.path)
        for part in self._parts:
            fill = part.copier.chunk_fill
            assert fill is not None, "a source fetched by chunks only"
            fill.fill_span(uffd, lo, data)

    def chunk_missing(self, chunk: int) -> bool:
        fills = (part.copier.chunk_fill for part in self._parts)
        return any(fill is not None and fill.chunk_missing(chunk) for fill in fills)

    def source_runs(self) -> list[tuple[int, int]]:
        """(first base page, pages) of the snapshot that the mappings hold, in file order."""
        return sorted((m.offset // PAGE_SIZE, m.size // PAGE_SIZE) for m in self.mappings)

    def populated_bytes(self) -> tuple[int, int]:
        """(bytes populated, bytes mapped) over every mapping: how resident the process is
        (pages removed since count as missing again)."""
        done = total = 0
        for part in self._parts:
            done += part.copier._populated.count(1) * part.mapping.page_size
            total += part.mapping.size
        return done, total

    def fill_ioctls(self) -> dict[str, int]:
        """How many UFFDIO_COPY and UFFDIO_ZEROPAGE ioctls its mappings' resolvers issued
        from Python: demand faults off the C loop, and what a prefetch copied on the event
        loop (a native replay's are not counted here)."""
        parts = self._parts
        return {
            "COPY": sum(part.copier.copies for part in parts),
            "ZEROPAGE": sum(part.copier.zeropages for part in parts),
        }

    def __repr__(self) -> str:
        return f"<SnapshotResolver of {self._snapshot!r}: {len(self._parts)} mappings>"
