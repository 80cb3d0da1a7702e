"""Copying from a source read a chunk at a time: a fault's chunk fills every missing page of it.

A remote source (:class:`~uffd_async.HttpSource`) costs milliseconds per
request whatever its size, so a fault awaits its whole chunk (every fault in
the chunk awaits the same request), and the chunk then fills every page of it
that is still missing, in place, in as few UFFDIO_COPY calls as the runs allow:
the rest of the chunk never faults. Facts this relies on, beyond
:class:`~uffd_async.resolvers.CopyFrom`'s:

* While a fault awaits its chunk the server goes on reading events, so the
  address space may have changed by the time the bytes land: the fault is
  planned again, and the fill skips pages removed or moved since (EAGAIN, an
  event still unread, makes the server retry the fault once it has read it).
  A faulting page removed meanwhile gets zeros; one moved (or unmapped) away
  is filled where it went, never at the address it left, and its thread is
  woken there (``UFFDIO_WAKE`` needs no mapping) to fault again or fail.
* A fault on a page already populated before the fetch may be stale (it was
  queued while another fault's fill copied the page, which woke the thread),
  or its page may have been zapped without an event: its page is copied
  again, and EEXIST makes the server wake it. Either way no thread is left.
* A huge page larger than the chunk takes the chunks that cover it, fetched
  at once; a prefetched chunk fills only the huge pages it holds whole. Bytes
  that do not hold the faulting page (never, from a checked source) fail the
  fault (``FetchError``) rather than fetching the same span again forever.
* While a working set is recorded, a fault copies its own page only: the
  pages a chunk fill brought in would never fault, so the set would name one
  page per chunk, too few for a replay from a file or through smaller chunks.
  The chunk stays in the source's cache, so the next faults in it cost no
  request.
* A source that knows which chunks are all zeros (a pack's index does: pass
  ``zero``) has them answered with ``UFFDIO_ZEROPAGE``, inline and without a
  fetch, for every missing page of the chunk; a prefetched zero chunk too. Not
  under write-protect mode or for huge pages (ZEROPAGE has no WP mode, and
  hugetlbfs refuses it): there the zeros are copied.
* Faults that walk the chunks in order (``ahead`` > 0, see
  :class:`~._chunks.Sequential`) have the next chunks fetched as prefetches
  by the fault's task, after its own page is served (its thread is already
  running). Each such chunk fills every missing page of it but its first: the
  thread's fault there (a marker, served from that page's bytes, kept: the
  chunk may have left memory) tells the sequence goes on, and the next chunk
  is asked for, as the kernel's asynchronous readahead does. A marker does not
  count as missing (a prefetch does not fetch its chunk again). Chunks with no
  page missing in any mapping and zero chunks are skipped (a prefetch's chunks
  are not fetched twice). A fetch ahead that fails is dropped: the faults
  there fetch it again, and fail as they must. Nothing is fetched ahead while a
  working set is recorded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from .._core._abi import PAGE_SIZE
from .._core._errors import FetchError, UffdError
from .._core._events import PageFault
from .._core._memory import buffer_address
from .._core._uffd import Userfaultfd
from .._serve._chunk_fill import ChunkFill, ChunkSource
from .._serve._resolvers import CopyFrom, NoSourcePage
from ._chunks import ChunkStats, Sequential

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["ChunkedCopy", "fill_together"]


async def _no_fetch(offset: int, length: int) -> bytes:
    raise AssertionError("ChunkedCopy reads its source by chunks")  # pragma: no cover


class ChunkedCopy(CopyFrom):
    """UFFDIO_COPY of ``size`` bytes of ``source`` from byte ``offset``, mapped at ``base``."""

    def __init__(
        self,
        source: ChunkSource,
        *,
        offset: int,
        base: int,
        size: int,
        page_size: int,
        wp: bool,
        zero: Callable[[int], bool] | None = None,
        ahead: int = 0,
        stats: ChunkStats | None = None,
    ) -> None:
        super().__init__(_no_fetch, base=base, size=size, readahead=0, wp=wp, page_size=page_size)
        self._source = source
        self._ahead = ahead  # chunks fetched ahead of a sequential reader (0: none)
        self._sequential = Sequential(ahead, -(-source.size // source.chunk_size))
        # Chunks filled ahead but for their first page -> that page's bytes (a marker).
        self._markers: dict[int, bytes] = {}
        self._stats = stats
        self._offset = offset
        self._chunk_size = source.chunk_size
        self._zero_chunk = zero  # chunk -> whether it is all zeros (never fetched)
        # Every resolver of the same process's memory from this source: a chunk that
        # lands fills their pages too (a snapshot's other mappings, see SnapshotResolver).
        self._together: list[ChunkedCopy] = [self]
        self.chunk_fill: ChunkFill | None = self  # the prefetcher fills it by chunks

    def fork(self) -> ChunkedCopy:
        child = super().fork()
        assert isinstance(child, ChunkedCopy)
        child._together = [child]
        child.chunk_fill = child
        child._sequential = Sequential(self._ahead, -(-self._source.size // self._chunk_size))
        child._markers = {}
        return child

    @property
    def chunk_source(self) -> ChunkSource:
        return self._source

    # -- the faults -----------------------------------------------------------

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        page, index, _, removed = self._plan(fault)
        if removed:  # zeros: nothing of the source was asked for
            self._zero(uffd, page, index)
            return True
        if self._all_zero(index):
            self._serve_zeros(uffd, page, index)
            return True
        if self._markers and self._chunks_of(index)[0] in self._markers:
            return False  # a marker: the sequence goes on, and asks for more (awaited)
        span = self._cached_span(index)
        if span is None:
            return False
        self._serve(uffd, page, index, span[0], span[1], self._populated[index])
        return True

    async def resolve(self, fault: PageFault, uffd: Userfaultfd) -> None:
        ahead, marker = self._plan_ahead(fault)
        # A marker served from its kept bytes: only the chunks ahead are left to fetch.
        served = marker is not None and self._serve_marker(fault, uffd, marker)
        if not ahead:
            if not served:
                await self._resolve(fault, uffd)
            return
        try:
            async with anyio.create_task_group() as tg:
                for chunk in ahead:
                    tg.start_soon(self._read_ahead, uffd, chunk)
                if not served:
                    await self._resolve(fault, uffd)
        except BaseExceptionGroup as group:
            raise _first(group) from None

    def _serve_marker(self, fault: PageFault, uffd: Userfaultfd, marker: bytes) -> bool:
        """Serve a fault in a marker page from the bytes kept for it (no fetch: the chunk
        need not be in memory any more); False if the fault is not in it."""
        page, index, _, removed = self._plan(fault)
        start = self._offset + index * self._page_size
        lo = start - start % self._chunk_size
        if removed or start + self._page_size > lo + len(marker):
            return False
        self._serve(uffd, page, index, lo, marker, self._populated[index])
        return True

    async def _resolve(self, fault: PageFault, uffd: Userfaultfd) -> None:
        page, index, _, removed = self._plan(fault)
        was = self._populated[index]
        if not removed and self._all_zero(index):
            self._serve_zeros(uffd, page, index)
            return
        if not removed:
            lo, data = await self._fetch_span(index)
            try:
                page, index, _, removed = self._plan(fault)  # what changed while we waited
            except NoSourcePage:  # its page moved or was unmapped: the rest still lands
                self._moved_away(uffd, fault, lo, data)
                return
            start = self._offset + index * self._page_size
            if not removed and lo <= start and start + self._page_size <= lo + len(data):
                self._serve(uffd, page, index, lo, data, was)
                return
            if not removed:  # never again the same fetch, in a loop that starves the others
                url = str(getattr(self._source, "path", self._source))
                raise FetchError(
                    f"{url}: bytes [{lo}, +{len(data)}) do not hold source page {index} "
                    f"(of {self._page_size} bytes)", url=url, start=lo, end=lo + len(data) - 1,
                )  # fmt: skip
        self._zero(uffd, page, index)

    def _moved_away(self, uffd: Userfaultfd, fault: PageFault, lo: int, data: bytes) -> None:
        """Fill the chunk's pages where they are now, then wake the fault's thread at the
        address it left: it faults again there (or gets SIGSEGV, EFAULT) as the kernel says."""
        if self._recorder is None:
            for resolver in self._together:
                resolver.fill_span(uffd, lo, data)
        uffd.wake(fault.address & ~(self._page_size - 1), self._page_size)

    def _serve(
        self, uffd: Userfaultfd, page: int, index: int, lo: int, data: bytes, was: int
    ) -> None:
        if self._recorder is None:  # recording: every page must fault once (see below)
            for resolver in self._together:
                resolver.fill_span(uffd, lo, data)
        if self._recorder is not None:
            self._record(index)
        if was or not self._populated[index]:  # see the module's docstring
            address, _, keep = buffer_address(data)
            self._copy(uffd, page, index, 1, address + self._offset + index * self._page_size - lo)
            del keep

    # -- reading ahead of a sequential reader ---------------------------------

    def _plan_ahead(self, fault: PageFault) -> tuple[list[int], bytes | None]:
        """(The chunks to fetch ahead after this fault, the bytes of its chunk's marker
        page if it has one: see the module)."""
        if not self._ahead or self._recorder is not None:
            return [], None
        try:
            _, index, _, removed = self._plan(fault)
        except NoSourcePage:
            return [], None
        if removed:
            return [], None
        chunks = self._chunks_of(index)
        marker = self._markers.pop(chunks[0], None)
        first = (self._offset + index * self._page_size) % self._chunk_size < self._page_size
        zero = self._zero_chunk
        wanted = [
            n
            for n in self._sequential.note(chunks[-1], first)
            if not (zero is not None and zero(n))
            and any(copier.chunk_missing(n) for copier in self._together)
        ]
        if self._stats is not None:
            self._stats.readahead += len(wanted)
        return wanted, marker

    async def _read_ahead(self, uffd: Userfaultfd, chunk: int) -> None:
        """Fetch ``chunk`` as a prefetch and fill every missing page of it but the first."""
        if not any(copier.chunk_missing(chunk) for copier in self._together):
            return  # filled since it was planned (a prefetch, another fault)
        try:
            data = await self._source.chunk(chunk, demand=False)
        except UffdError:  # a FetchError, or the source closed
            return  # the faults there fetch it again, and fail as they must
        if self._recorder is not None:
            return
        lo = chunk * self._chunk_size
        try:
            for copier in self._together:
                copier.fill_span(uffd, lo, data, skip=PAGE_SIZE)
        except UffdError:
            return  # an event unread, or serving ended: the pages fault as usual
        self._markers[chunk] = data[:PAGE_SIZE]

    # -- zero chunks ----------------------------------------------------------

    def _all_zero(self, index: int) -> bool:
        """Whether every chunk holding source page ``index`` is all zeros (never fetched)."""
        zero = self._zero_chunk
        return zero is not None and all(zero(chunk) for chunk in self._chunks_of(index))

    def _serve_zeros(self, uffd: Userfaultfd, page: int, index: int) -> None:
        """A fault in zero chunks: zero pages for every missing page of them (as ``_serve``)."""
        was = self._populated[index]
        if self._recorder is None:
            chunks = self._chunks_of(index)
            hi = min(self._source.size, (chunks[-1] + 1) * self._chunk_size)
            for resolver in self._together:
                resolver.zero_span(uffd, chunks[0] * self._chunk_size, hi)
        else:
            self._record(index)
        if not was and self._populated[index]:  # the fill mapped it (see _serve)
            return
        if self._wp:  # ZEROPAGE has no write-protect mode: copy zeros, protected
            zeros = bytes(self._page_size)
            address, _, keep = buffer_address(zeros)
            self._copy(uffd, page, index, 1, address)
            del keep
        else:
            self._zero(uffd, page, index)

    def zero_span(self, uffd: Userfaultfd, lo: int, hi: int) -> None:
        """Map zeros at every missing page of ours, in place, whose source bytes lie in
        ``[lo, hi)``: UFFDIO_ZEROPAGE runs (a copy of zeros where ZEROPAGE cannot serve)."""
        size = self._page_size
        first = max(0, -((self._offset - lo) // size))  # the first page wholly in the span
        last = min(self._pages, (hi - self._offset) // size)
        if first >= last:
            return
        if self._wp or size != PAGE_SIZE:
            zeros = bytes((last - first) * size)
            address, _, keep = buffer_address(zeros)
            self._fill_runs(uffd, first, last - first, address - first * size)
            del keep
            return
        base = self._base

        def zeropage(i: int, j: int) -> None:
            uffd.zeropage(base + i * size, (j - i) * size)

        self._each_missing_run(first, last - first, zeropage)

    # -- chunks ---------------------------------------------------------------

    def _chunks_of(self, index: int) -> range:
        """The chunks holding source page ``index``."""
        start = self._offset + index * self._page_size
        size = self._chunk_size
        return range(start // size, -(-(start + self._page_size) // size))

    def _cached_span(self, index: int) -> tuple[int, bytes] | None:
        chunks = self._chunks_of(index)
        parts = []
        for chunk in chunks:
            data = self._source.cached(chunk)
            if data is None:
                return None
            parts.append(data)
        return chunks[0] * self._chunk_size, parts[0] if len(parts) == 1 else b"".join(parts)

    async def _fetch_span(self, index: int) -> tuple[int, bytes]:
        chunks = self._chunks_of(index)
        lo = chunks[0] * self._chunk_size
        if len(chunks) == 1:
            return lo, await self._source.chunk(chunks[0])
        parts = [b""] * len(chunks)

        async def fetch(n: int) -> None:
            parts[n] = await self._source.chunk(chunks[n])

        try:
            async with anyio.create_task_group() as tg:
                for n in range(len(chunks)):
                    tg.start_soon(fetch, n)
        except BaseExceptionGroup as group:
            raise _first(group) from None
        return lo, b"".join(parts)

    def fill_span(self, uffd: Userfaultfd, lo: int, data: bytes, *, skip: int = 0) -> None:
        """Copy every missing page of ours, in place, whose bytes lie within ``data``
        (the source's bytes from ``lo``) but its first ``skip`` bytes; zero pages for a
        zero chunk's."""
        if (
            not skip
            and self._zero_chunk is not None
            and lo % self._chunk_size == 0
            and len(data) <= self._chunk_size
            and self._zero_chunk(lo // self._chunk_size)
        ):
            self.zero_span(uffd, lo, lo + len(data))
            return
        size = self._page_size
        first = max(0, -(-(lo + skip - self._offset) // size))
        last = min(self._pages, (lo + len(data) - self._offset) // size)
        if first < last:
            address, _, keep = buffer_address(data)
            self._fill_runs(uffd, first, last - first, address - (lo - self._offset))
            del keep

    def chunk_missing(self, chunk: int) -> bool:
        """Whether a page of ours within ``chunk`` is still missing."""
        lo = chunk * self._chunk_size - self._offset
        skip = PAGE_SIZE if chunk in self._markers else 0  # a marker is left to fault
        first = max(0, (lo + skip) // self._page_size)
        last = min(self._pages, -(-(lo + self._chunk_size) // self._page_size))
        return first < last and self._populated.find(0, first, last) >= 0

    def source_runs(self) -> list[tuple[int, int]]:
        """(first base page, pages) of the source that this resolver maps."""
        return [(self._offset // PAGE_SIZE, self._pages * self._page_size // PAGE_SIZE)]

    def __repr__(self) -> str:
        return f"<ChunkedCopy of {self._source!r} at {self._base:#x}, {self._pages} pages>"


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def fill_together(copiers: Sequence[CopyFrom]) -> None:
    """Make the chunked copiers of one process's mappings fill each other: a chunk that
    lands for one fills every mapping's pages within it (a source's ``group``)."""
    chunked = [copier for copier in copiers if isinstance(copier, ChunkedCopy)]
    for copier in chunked:
        copier._together = chunked
