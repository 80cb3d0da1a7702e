"""Resolvers: how a fault gets its page.

A resolver is an async callable ``resolver(fault, uffd)`` that answers one
fault with ioctls; it may await anything (a file, a socket, a service). The
ready-made ones below are :class:`Resolver` objects: besides being awaitable
like that, they try ``resolve_now`` first, which finishes without awaiting
whenever it can, so the server answers those faults inline, without a task.

Kernel facts these rely on (``man 2 ioctl_userfaultfd``):

* A resolving ioctl covers whole pages. Whom it wakes, and that EEXIST wakes
  nobody, is said in :mod:`uffd_async._core._uffd`: the resolvers raise
  :class:`PageExists` for the fault's own page, and the server wakes it.
* UFFDIO_COPY of several pages stops at the first one that exists; the pages
  before it were copied (and woken).
* UFFDIO_ZEROPAGE maps the shared zero page (anonymous and shmem memory; not
  hugetlbfs): nothing is copied, and a later write gets its own page as any write
  to the zero page does. It has no write-protect mode: the zero page carries no
  uffd-wp bit, so a ``CopyFrom`` that maps pages write-protected copies its zero
  pages too.
"""

from __future__ import annotations

import ctypes
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import attrs

from .._core._abi import PAGE_SIZE, FaultFlags
from .._core._addrspace import AddressMap
from .._core._checks import check_int, check_page_size
from .._core._errors import (
    InvalidArgument,
    MappingChanged,
    NoSourcePage,
    PageExists,
    ProcessExited,
    UffdClosed,
    UffdError,
)
from .._core._events import PageFault, Remap, Remove, Unmap
from .._core._memory import Region, buffer_address
from .._core._native import FAST_COPY, FAST_UNPROTECT, FAST_ZEROPAGE, FastPath
from .._core._uffd import Userfaultfd
from ._chunk_fill import ChunkFill

__all__ = [
    "NoSourcePage",
    "Resolver",
    "ResolverFunction",
    "by_kind",
    "continue_minor",
    "unprotect",
    "zero_fill",
]

#: What ``serve()`` accepts: an async ``(fault, uffd) -> None`` callable.
ResolverFunction = Callable[[PageFault, Userfaultfd], Awaitable[None]]


class Resolver:
    """Base class for resolvers that can often answer a fault without awaiting.

    Subclasses implement :meth:`resolve_now` (sync; return True when the
    fault is resolved, False to take the async path) and, if that can
    return False, :meth:`resolve`. The server calls :meth:`apply` with every
    Remap/Remove/Unmap before the faults behind it, and :meth:`fork` for the
    child of a Fork event.
    """

    #: Whether this resolver's ioctls wake the faulting thread (else the server wakes it).
    wakes: bool = True

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        return False

    async def resolve(self, fault: PageFault, uffd: Userfaultfd) -> None:
        if not self.resolve_now(fault, uffd):
            raise NotImplementedError(f"{type(self).__name__} cannot resolve {fault}")

    async def __call__(self, fault: PageFault, uffd: Userfaultfd) -> None:
        if not self.resolve_now(fault, uffd):
            await self.resolve(fault, uffd)

    def woke(self, fault: PageFault) -> bool:
        """Whether resolving ``fault`` woke its thread."""
        return self.wakes

    def apply(self, event: Remap | Remove | Unmap) -> None:
        """Account for a change of the address space (no-op by default)."""

    def fork(self) -> Resolver:
        """The resolver for a forked child (same object unless it keeps per-process state)."""
        return self

    def _fast_path(self) -> FastPath | None:
        """What the server's C loop may resolve for this resolver right now (None: nothing)."""
        return None


_ZEROS: dict[int, bytes] = {}


def zero_page(uffd: Userfaultfd, page: int, page_size: int) -> None:
    """Map a zero page: UFFDIO_ZEROPAGE, or (hugetlbfs refuses that) a COPY of zeros."""
    if page_size == PAGE_SIZE:
        uffd._zeropage_nocheck(page, page_size)
        return
    zeros = _ZEROS.get(page_size)
    if zeros is None:
        zeros = _ZEROS[page_size] = bytes(page_size)
    uffd.copy(page, zeros, page_size)


def _page_of(fault: PageFault, page_size: int) -> int:
    return fault.address & ~(page_size - 1)


SyncSource = Callable[[int, int], Any]
AsyncSource = Callable[[int, int], Awaitable[Any]]


class PageRecorder(Protocol):
    """What ``copy_from(recorder=...)`` needs of a recorder: where demand faults went.

    :class:`~uffd_async.WorkingSetRecorder` is one (a working set to replay later);
    anything with this method will do.
    """

    def record(self, first: int, count: int = 1) -> None:
        """Source pages ``[first, first + count)`` (``PAGE_SIZE`` pages) were asked for."""


@attrs.frozen(eq=False)
class MemoryPart:
    """Pages a native copier may map straight from memory here, with no decision: a
    :class:`CopyFrom`'s, while nothing was removed or moved (``CopyFrom.memory_part``)."""

    #: Where its pages go, how many, their size, and where their bytes are here.
    base: int
    pages: int
    page_size: int
    source: int
    #: UFFDIO_COPY mode bits (COPY_MODE_WP for a write-protecting copier).
    mode: int
    #: One byte a page, set once mapped: the resolver's own, shared (a native copier
    #: sets it as it maps, so resolver and copier never map a page twice).
    populated: bytearray
    #: One byte a page, 1 where the page holds only zeros (mapped with ZEROPAGE), or None.
    zeros: bytearray | None
    #: Pages mapped behind a fault outside the working set.
    readahead: int
    #: The working set's name for its page 0: a base page (``PAGE_SIZE``) of the snapshot.
    first: int = 0
    #: Its page 0 is page ``index`` of ``populated``, ``zeros`` and ``blocked``.
    index: int = 0
    #: One byte a page, 1 where a page needs a decision (removed since: zeros, not the
    #: snapshot's bytes): never mapped by the native copier, its faults go to the server.
    blocked: bytearray | None = None


class CopyFrom(Resolver):
    """UFFDIO_COPY from a source; see :func:`copy_from`."""

    #: What the prefetcher fills a chunk at a time (a ``ChunkedCopy``: itself); from
    #: memory there are no chunks, and it copies runs (``prefetch_pages``).
    chunk_fill: ChunkFill | None = None

    def __init__(
        self,
        source: Any,
        *,
        base: int,
        size: int | None,
        readahead: int,
        wp: bool,
        page_size: int,
        zeros: bytes | bytearray | None = None,
    ) -> None:
        check_int("base", base)
        check_page_size("page_size", page_size)
        if size is not None:
            check_int("size", size, minimum=0)
        check_int("readahead", readahead, minimum=0)
        if base % page_size:
            raise InvalidArgument(22, f"base {base:#x} is not aligned to {page_size}")
        self._page_size = page_size
        self._readahead = readahead
        self._wp = wp
        self._base = base
        self._address = 0
        self._keepalive: object = None
        self._fetch: SyncSource | None = None
        self._afetch: AsyncSource | None = None
        if isinstance(source, Region):
            self._address, length, self._keepalive = source.address, source.length, source
        elif callable(source):
            if _is_async_callable(source):
                self._afetch = source
            else:
                self._fetch = source
            if size is None and readahead:
                raise InvalidArgument(22, "readahead from a callable source needs size=")
            length = size if size is not None else 1 << 62
        else:
            self._address, length, self._keepalive = buffer_address(source)
        if size is not None:
            length = min(length, size)
        self._pages = length // page_size
        self._populated = bytearray(self._pages if self._pages < 1 << 30 else 0)
        # One byte per source page, 1 where it holds only zeros: mapped with ZEROPAGE.
        self._zeros: bytearray | None = None
        if zeros is not None and not wp and page_size == PAGE_SIZE and any(zeros):
            self._zeros = bytearray(zeros[: self._pages]).ljust(self._pages, b"\0")
        self._zeros_c: ctypes.Array[ctypes.c_uint8] | None = None
        #: UFFDIO_COPY and UFFDIO_ZEROPAGE ioctls this resolver issued from Python (the
        #: C loop's are not counted here: see the server's stats).
        self.copies = 0
        self.zeropages = 0
        self._map = AddressMap(base, self._pages * page_size)
        self._mode = 2 if wp else 0  # UFFDIO_COPY_MODE_WP
        self._shift = page_size.bit_length() - 1
        # One page, from memory, nothing remapped or removed yet: the common case,
        # resolved without the general bookkeeping.
        self._direct = self.can_prefetch and not readahead
        # The C loop also handles readahead from memory, until an event arrives.
        self._fast_ok = self.can_prefetch
        self._fast: FastPath | None = None
        self._populated_c: object = None
        self._recorder: PageRecorder | None = None
        self._record_offset = 0  # the snapshot's base page of source page 0
        self._changed = False  # a Remap, Remove or Unmap has been applied
        # A working set's runs (see guide): for a page in one, where its run ends; and
        # the readahead of a fault outside them.
        self._guided: dict[int, int] = {}
        self._guided_readahead = 0

    @property
    def populated(self) -> memoryview:
        """One byte per source page, non-zero once this resolver populated it (read-only).

        Empty for a callable source without ``size``; removed pages read 0 again.
        """
        return memoryview(self._populated).toreadonly()

    def fork(self) -> CopyFrom:
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__)
        child._populated = bytearray(self._populated)
        child._map = self._map.copy()
        child._fast = None
        child._recorder = None  # a working set is the restored process's, not its children's
        return child

    def _record_into(self, recorder: PageRecorder, first_page: int) -> None:
        """Record the demand faults' pages in ``recorder``, source page 0 being the
        snapshot's base page ``first_page``. The C loop records nothing: it stays off."""
        if self._readahead:
            raise InvalidArgument(
                22,
                "recording a working set needs readahead=0: pages readahead brings in never "
                "fault, so they would be missing from it",
            )
        self._recorder = recorder
        self._record_offset = first_page
        self._fast_ok = False

    def _record(self, index: int) -> None:
        assert self._recorder is not None
        ratio = self._page_size // PAGE_SIZE
        self._recorder.record(self._record_offset + index * ratio, ratio)

    @property
    def can_prefetch(self) -> bool:
        """Only from memory: nothing else can be copied without awaiting."""
        return self._fetch is None and self._afetch is None and bool(self._populated)

    def prefetch_pages(self, uffd: Userfaultfd, first: int, count: int) -> None:
        """Copy the source's base pages (``PAGE_SIZE``, as a working set names them)
        ``[first, first + count)``: every page of ours (a huge page, say) that holds one."""
        ratio = self._page_size // PAGE_SIZE
        index = first // ratio
        self._fill_ahead(uffd, index, -(-(first + count) // ratio) - index)

    def guide(self, runs: Iterable[tuple[int, int]], readahead: int = 0) -> None:
        """A demand fault on a page of one of these runs (base pages, as a working set names
        them) copies the rest of the run with it: the process is ahead of the prefetcher
        there, and will touch the rest next. A fault outside them brings ``readahead``
        pages behind it (not while recording: those would be missing from the record).
        Turns the one-page shortcuts off."""
        ratio = self._page_size // PAGE_SIZE
        guided = self._guided
        if self._recorder is None and readahead > self._guided_readahead:
            self._guided_readahead = readahead
            self._direct = False  # the one-page shortcut has no readahead
            self._fast = None  # the C loop's is built again, with it
        for first, count in runs:
            start, end = first // ratio, min(-(-(first + count) // ratio), self._pages)
            for index in range(start, end):
                guided[index] = end
        if guided:
            self._direct = self._fast_ok = False

    @property
    def _outside_readahead(self) -> int:
        """Pages a fault outside a guided run brings behind it: its own readahead, or a
        replayed set's (see guide), whichever is more."""
        return max(self._readahead, self._guided_readahead)

    def source_runs(self) -> list[tuple[int, int]]:
        """(first base page, pages) of the source, for populating it all."""
        return [(0, self._pages * self._page_size // PAGE_SIZE)] if self.can_prefetch else []

    def memory_parts(self) -> list[MemoryPart] | None:
        """What a native copier may map of this resolver's pages itself, as they are now:
        one part for each range still where it was mapped or moved as a whole (``mremap``),
        pages removed since blocked; None when the source is not in memory, or when it
        records a working set (every demand fault must reach ``_record``, in Python)."""
        if not self.can_prefetch or not self._address or self._recorder is not None:
            return None
        size, ratio = self._page_size, self._page_size // PAGE_SIZE
        blocked = None
        if self._changed:
            removed = self._map.removed.intervals()
            if removed:
                blocked = bytearray(self._pages)
                for start, end in removed:
                    first = max(0, (start - self._base) // size)
                    last = min(self._pages, -(-(end - self._base) // size))
                    if first < last:
                        blocked[first:last] = b"\1" * (last - first)
        parts = []
        for start, end, original in self._map.pieces():
            index = (original - self._base) // size
            pages = min((end - start) // size, self._pages - index)
            if index < 0 or pages <= 0:
                continue
            parts.append(
                MemoryPart(
                    base=start,
                    pages=pages,
                    page_size=size,
                    source=self._address + index * size,
                    mode=self._mode,
                    populated=self._populated,
                    zeros=self._zeros,
                    readahead=self._outside_readahead,
                    first=index * ratio,
                    index=index,
                    blocked=blocked,
                )
            )
        return parts

    def _fill_ahead(self, uffd: Userfaultfd, first: int, count: int) -> None:
        """Copy source pages ``[first, first + count)`` (in our page size) that are not
        populated, not removed and still where they were mapped, in as few UFFDIO_COPY
        calls as the runs allow.

        Only from memory (nothing else can be copied without awaiting). Pages a demand
        fault got to first (EEXIST) are skipped. Raises what stops all copying:
        ``MappingChanged`` (an event is unread: the server must read it first),
        ``ProcessExited``, ``UffdClosed``.
        """
        if self.can_prefetch:
            self._fill_runs(uffd, first, count, self._address)

    def _fill_runs(self, uffd: Userfaultfd, first: int, count: int, origin: int) -> None:
        """``_fill_ahead`` from the bytes of source page ``i`` at ``origin + i * page_size``
        (only those of pages ``[first, first + count)`` are read)."""
        size = self._page_size

        zeros = self._zeros

        def copy(i: int, j: int) -> None:
            if zeros is not None and zeros[i]:  # a run of zero pages (see _each_missing_run)
                self.zeropages += 1
                uffd.zeropage(self._base + i * size, (j - i) * size)
                return
            self.copies += 1
            uffd.copy(self._base + i * size, origin + i * size, (j - i) * size, wp=self._wp)

        self._each_missing_run(first, count, copy)

    def _each_missing_run(self, first: int, count: int, fill: Callable[[int, int], None]) -> None:
        """``fill(i, j)`` for each run ``[i, j)`` of pages among ``[first, first + count)``
        still missing and in place, one ioctl each. Pages a demand fault got to first (EEXIST)
        are skipped, and so is a range gone (ENOENT); what stops all filling is raised.
        A run is all zero pages or none (see ``_zeros``)."""
        populated = self._populated
        zeros = self._zeros
        size = self._page_size
        untouched = not self._changed  # no event yet: every page is where it was mapped
        i, end = max(first, 0), min(first + count, self._pages)
        while i < end:
            if populated[i] or not (untouched or self._in_place(i)):
                i += 1
                continue
            j = i + 1
            while (
                j < end
                and not populated[j]
                and (untouched or self._in_place(j))
                and (zeros is None or zeros[j] == zeros[i])
            ):
                j += 1
            try:
                fill(i, j)
            except PageExists as exc:  # a demand fault (or its readahead) got there first
                done = exc.done // size
                populated[i : i + done + 1] = b"\1" * (done + 1)
                i += done + 1
                continue
            except (MappingChanged, ProcessExited, UffdClosed) as exc:
                done = exc.done // size
                populated[i : i + done] = b"\1" * done
                raise
            except UffdError as exc:  # the range went away (ENOENT): skip it
                done = exc.done // size
                populated[i : i + done] = b"\1" * done
                i = j
                continue
            populated[i:j] = b"\1" * (j - i)
            i = j

    def _in_place(self, index: int) -> bool:
        page = self._base + index * self._page_size
        return self._map.original(page) == page and page not in self._map.removed

    def _fast_path(self) -> FastPath | None:
        if not self._fast_ok:
            return None
        if self._fast is None:
            self._populated_c = (ctypes.c_uint8 * len(self._populated)).from_buffer(self._populated)
            if self._zeros is not None and self._zeros_c is None:
                self._zeros_c = (ctypes.c_uint8 * len(self._zeros)).from_buffer(self._zeros)
            self._fast = FastPath(
                base=self._base,
                pages=self._pages,
                source=self._address,
                page_size=self._page_size,
                mode=self._mode,
                populated=ctypes.addressof(self._populated_c),
                kind=FAST_COPY,
                readahead=self._outside_readahead,
                zeros=ctypes.addressof(self._zeros_c) if self._zeros_c is not None else None,
            )
        return self._fast

    def apply(self, event: Remap | Remove | Unmap) -> None:
        self._direct = self._fast_ok = False
        self._changed = True
        page_size = self._page_size
        for start, end in self._map.apply(event):
            first = max(0, (start - self._base) // page_size)
            last = min(self._pages, -(-(end - self._base) // page_size))
            if first < last and self._populated:
                self._populated[first:last] = bytes(last - first)

    def _plan(self, fault: PageFault) -> tuple[int, int, int, bool]:
        """(page, source index, pages to copy, removed) for ``fault``."""
        page_size = self._page_size
        page = fault.address & ~(page_size - 1)
        original = self._map.original(page)
        if original is None:
            raise NoSourcePage(f"no source for the page at {page:#x} (unmapped or moved away)")
        index = (original - self._base) // page_size
        if not 0 <= index < self._pages:
            raise NoSourcePage(
                f"the page at {page:#x} is {index} pages from base, past the source's "
                f"{self._pages} pages"
            )
        if original in self._map.removed:
            return page, index, 1, True
        count = 1
        guided_end = self._guided.get(index, 0)
        readahead = self._readahead if guided_end else self._outside_readahead
        wanted = max(1 + readahead, guided_end - index)
        if wanted > 1:
            limit = min(
                self._pages - index,
                wanted,
                (self._map.run_end(page) - page) // page_size,
            )
            boundary = self._map.removed.next_boundary(original)
            if boundary is not None:
                limit = min(limit, max(1, (boundary - original) // page_size))
            populated = self._populated
            while count < limit and not populated[index + count]:
                count += 1
        return page, index, count, False

    def _zero_split(self, index: int, count: int) -> tuple[bool, int]:
        """(whether page ``index`` holds only zeros, how many of the ``count`` pages from it
        are alike): a fault maps zero pages or copies data pages, never both at once."""
        zeros = self._zeros
        if zeros is None:
            return False, count
        zero = zeros[index]
        n = 1
        while n < count and zeros[index + n] == zero:
            n += 1
        return bool(zero), n

    def _copy(self, uffd: Userfaultfd, page: int, index: int, count: int, data: Any) -> None:
        """Map ``count`` pages at ``page`` (source page ``index``) from ``data``, or zero
        pages when ``data`` is None; the pages behind the first are only readahead."""
        length = count * self._page_size
        try:
            if data is None:
                self.zeropages += 1
                uffd.zeropage(page, length)
            else:
                self.copies += 1
                uffd.copy(page, data, length, wp=self._wp)
        except UffdError as exc:
            # The faulting page came first: if it was copied, the fault is
            # resolved, and the readahead behind it was only ever optional.
            done = exc.done // self._page_size
            if self._populated and (done or isinstance(exc, PageExists)):
                self._populated[index : index + max(done, 1)] = b"\1" * max(done, 1)
            if done == 0:
                raise
            return
        if self._populated:
            self._populated[index : index + count] = b"\1" * count

    def _zero(self, uffd: Userfaultfd, page: int, index: int) -> None:
        try:
            zero_page(uffd, page, self._page_size)
        finally:
            if self._populated:
                self._populated[index] = 1

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        if self._direct:
            shift = self._shift
            index = (fault.address - self._base) >> shift
            if 0 <= index < self._pages:
                page = self._base + (index << shift)
                zeros = self._zeros
                try:
                    if zeros is not None and zeros[index]:
                        self.zeropages += 1
                        uffd._zeropage_nocheck(page, self._page_size)
                    else:
                        uffd._copy_nocheck(
                            page, self._address + (index << shift), self._page_size, self._mode
                        )
                except PageExists:
                    self._populated[index] = 1
                    raise
                self._populated[index] = 1
                if self._recorder is not None:
                    self._record(index)
                return True
        if self._afetch is not None:
            return False
        page, index, count, removed = self._plan(fault)
        if removed:  # zeros: nothing of the snapshot was asked for, nothing to record
            self._zero(uffd, page, index)
            return True
        zero, count = self._zero_split(index, count)
        if zero:
            self._copy(uffd, page, index, count, None)
        elif self._fetch is not None:
            length = count * self._page_size
            data = self._fetch(index * self._page_size, length)
            _check_fetched(data, length)
            self._copy(uffd, page, index, count, data)
        else:
            self._copy(uffd, page, index, count, self._address + index * self._page_size)
        if self._recorder is not None:
            self._record(index)
        return True

    async def resolve(self, fault: PageFault, uffd: Userfaultfd) -> None:
        if self._afetch is None:
            self.resolve_now(fault, uffd)
            return
        page, index, count, removed = self._plan(fault)
        if removed:
            self._zero(uffd, page, index)
            return
        length = count * self._page_size
        data = await self._afetch(index * self._page_size, length)
        _check_fetched(data, length)
        self._copy(uffd, page, index, count, data)
        if self._recorder is not None:
            self._record(index)


def _is_async_callable(source: object) -> bool:
    return inspect.iscoroutinefunction(source) or inspect.iscoroutinefunction(
        getattr(source, "__call__", None)  # noqa: B004
    )


def _check_fetched(data: Any, length: int) -> None:
    size = memoryview(data).nbytes
    if size != length:
        raise InvalidArgument(22, f"the source returned {size} bytes for a {length}-byte read")


class ZeroFill(Resolver):
    def __init__(self, page_size: int) -> None:
        self._page_size = page_size
        # The C loop uses UFFDIO_ZEROPAGE, which hugetlbfs refuses.
        self._fast = (
            FastPath(pages=1 << 52, page_size=page_size, kind=FAST_ZEROPAGE)
            if page_size == PAGE_SIZE
            else None
        )

    def _fast_path(self) -> FastPath | None:
        return self._fast

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        zero_page(uffd, fault.address & ~(self._page_size - 1), self._page_size)
        return True


def zero_fill(*, page_size: int = PAGE_SIZE) -> ZeroFill:
    """Answer missing faults with UFFDIO_ZEROPAGE (hugetlbfs: a COPY of a zeroed huge page)."""
    return ZeroFill(page_size)


class Unprotect(Resolver):
    def __init__(self, wake: bool, page_size: int) -> None:
        self.wakes = wake
        self._page_size = page_size
        self._fast = FastPath(
            pages=1 << 52,
            page_size=page_size,
            mode=0 if wake else 2,  # UFFDIO_WRITEPROTECT_MODE_DONTWAKE (the C loop wakes)
            kind=FAST_UNPROTECT,
        )

    def _fast_path(self) -> FastPath | None:
        return self._fast

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        uffd._unprotect_nocheck(fault.address & ~(self._page_size - 1), self._page_size, self.wakes)
        return True


def unprotect(*, wake: bool = True, page_size: int = PAGE_SIZE) -> Unprotect:
    """Answer write-protect faults by removing the protection from the page.

    ``wake=False`` uses DONTWAKE; the server then wakes the pages it resolved,
    each contiguous range once per batch.
    """
    return Unprotect(wake, page_size)


class ContinueMinor(Resolver):
    def __init__(self, page_size: int) -> None:
        self._page_size = page_size

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        uffd.continue_(_page_of(fault, self._page_size), self._page_size)
        return True


def continue_minor(*, page_size: int = PAGE_SIZE) -> ContinueMinor:
    """Answer minor faults with UFFDIO_CONTINUE: map the page already in the page cache."""
    return ContinueMinor(page_size)


AnyResolver = Resolver | ResolverFunction


class _Awaited(Resolver):
    """A plain async resolver function where a :class:`Resolver` is wanted: always awaited."""

    def __init__(self, function: ResolverFunction) -> None:
        self.function = function

    async def resolve(self, fault: PageFault, uffd: Userfaultfd) -> None:
        await self.function(fault, uffd)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.function!r})"


def as_resolver(resolver: AnyResolver) -> Resolver:
    """``resolver`` as a :class:`Resolver` (a plain async function is wrapped)."""
    if isinstance(resolver, Resolver):
        return resolver
    if not callable(resolver):
        raise TypeError(f"a resolver must be an async callable, not {type(resolver).__name__}")
    return _Awaited(resolver)


class ByKind(Resolver):
    def __init__(
        self,
        missing: AnyResolver | None,
        wp: AnyResolver | None,
        minor: AnyResolver | None,
    ) -> None:
        self._missing, self._wp, self._minor = missing, wp, minor

    def _choose(self, fault: PageFault) -> AnyResolver:
        if fault.flags & FaultFlags.MINOR:
            chosen, kind = self._minor, "minor"
        elif fault.flags & FaultFlags.WP:
            chosen, kind = self._wp, "write-protect"
        else:
            chosen, kind = self._missing, "missing"
        if chosen is None:
            raise NoSourcePage(f"no resolver for {kind} faults (at {fault.address:#x})")
        return chosen

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        chosen = self._choose(fault)
        return isinstance(chosen, Resolver) and chosen.resolve_now(fault, uffd)

    async def resolve(self, fault: PageFault, uffd: Userfaultfd) -> None:
        chosen = self._choose(fault)
        if isinstance(chosen, Resolver):
            await chosen.resolve(fault, uffd)
        else:
            await chosen(fault, uffd)

    def woke(self, fault: PageFault) -> bool:
        chosen = self._choose(fault)
        return chosen.woke(fault) if isinstance(chosen, Resolver) else True

    def apply(self, event: Remap | Remove | Unmap) -> None:
        for part in {id(p): p for p in (self._missing, self._wp, self._minor)}.values():
            if isinstance(part, Resolver):
                part.apply(event)

    def fork(self) -> ByKind:
        def forked(part: AnyResolver | None) -> AnyResolver | None:
            return part.fork() if isinstance(part, Resolver) else part

        return ByKind(forked(self._missing), forked(self._wp), forked(self._minor))


def by_kind(
    *,
    missing: AnyResolver | None = None,
    wp: AnyResolver | None = None,
    minor: AnyResolver | None = None,
) -> ByKind:
    """Route each fault to the resolver for its kind (MINOR, then WP, else MISSING)."""
    return ByKind(missing, wp, minor)
