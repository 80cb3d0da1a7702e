"""Await-based write tracking: which pages were written since the last collect.

Two modes, both starting from a write-protected range:

* ``"fault"``: the first write to a protected page raises a WP fault; the
  tracker records the page and unprotects it (the writer waits for that,
  once per page per collect period). ``next_write()`` reports each one.
  MADV_DONTNEED drops the protection with the pages, so later writes there
  raise nothing: with ``UFFD_FEATURE_EVENT_REMOVE`` on the uffd, the tracker
  counts discarded pages as written, and collect() protects them again.
  Untouched pages are protected too only with ``UFFD_FEATURE_WP_UNPOPULATED``
  (see :mod:`._live_snapshot`), so the uffd must have it.
* ``"async"``: ``UFFD_FEATURE_WP_ASYNC``, the kernel resolves the faults
  itself and writers never wait for Python; ``collect()`` is one PAGEMAP_SCAN
  that reports written pages and protects them again in the same walk.

No write is lost between collects: in fault mode ``collect()`` re-protects the
dirty pages *before* it swaps in a fresh set, and runs without awaiting, so a
write either landed before the re-protect (and its page is in the returned
set; read the page after ``collect()`` returns) or faults afterwards into the
next set. Leaving the tracker unprotects the range, so no writer stays blocked.

A live snapshot of the range (:func:`~uffd_async.snapshot_live` with ``tracker=``)
attaches a :class:`WriteHook`: the tracker's resolver calls it at every write fault
and event, and otherwise knows nothing of snapshots.
"""

from __future__ import annotations

import ctypes
import errno
import re
from collections import deque
from typing import Any, Literal, Protocol

import anyio

from .._core._abi import PAGE_SIZE, WRITEPROTECT_MODE_DONTWAKE, Feature, Mode
from .._core._checks import check_instance, check_int
from .._core._errors import InvalidArgument, UnsupportedFeature
from .._core._events import PageFault, Remap, Remove, Unmap
from .._core._native import FAST_UNPROTECT, FastPath
from .._core._pagemap import scan_written
from .._core._uffd import Userfaultfd
from .._serve._resolvers import AnyResolver, NoSourcePage, Resolver, by_kind
from .._serve._server import FaultServer, OnError

__all__ = ["WriteHook", "WriteTracker"]


class WriteHook(Protocol):
    """What runs at a tracker's write faults besides the tracker's own bookkeeping (a live
    snapshot saving each page before its writer changes it). See :meth:`WriteTracker.attach`."""

    def before_unprotect(self, page: int) -> None:
        """A write fault on ``page``: it stays protected, its writer blocked, until this
        returns."""

    def fast_path(self, marks: int | None = None) -> FastPath | None:
        """What the server's C loop may do for write faults instead, setting ``marks`` (the
        address of the tracker's dirty bitmap) for each page; None: every fault comes here."""

    def apply(self, event: Remap | Remove | Unmap) -> None:
        """An event moved, discarded or unmapped memory (before the tracker counts it)."""


class _RecordWrites(Resolver):
    """Unprotects the page and sets its byte in the tracker's dirty bitmap."""

    def __init__(self, tracker: WriteTracker, wake: bool) -> None:
        self._tracker = tracker
        self.wakes = wake
        self._fast = FastPath(
            base=tracker._start,
            pages=len(tracker._dirty),
            page_size=PAGE_SIZE,
            mode=0 if wake else WRITEPROTECT_MODE_DONTWAKE,
            populated=ctypes.addressof(tracker._dirty_c),
            kind=FAST_UNPROTECT,
        )

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        tracker = self._tracker
        index = (fault.address - tracker._start) // PAGE_SIZE
        if not 0 <= index < len(tracker._dirty):
            raise NoSourcePage(f"a write-protect fault at {fault.address:#x}, outside the tracker")
        page = tracker._start + index * PAGE_SIZE
        if tracker._hook is not None:  # a live snapshot saves the page before it is written
            tracker._hook.before_unprotect(page)
        uffd._unprotect_nocheck(page, PAGE_SIZE, self.wakes)
        tracker._written(index)
        return True

    def _fast_path(self) -> FastPath | None:
        # The C loop records into the bitmap but cannot announce (only while nobody
        # awaits next_write()), nor save a page for a live snapshot first.
        tracker = self._tracker
        if tracker._announce:
            return None
        if tracker._hook is not None:
            return tracker._hook.fast_path(marks=ctypes.addressof(tracker._dirty_c))
        return self._fast

    def apply(self, event: Remap | Remove | Unmap) -> None:
        """MADV_DONTNEED drops the protection with the pages: count them as written.

        Their contents did change (to zeros), and the next collect() protects
        them again, so later writes fault once more. Needs EVENT_REMOVE.
        """
        tracker = self._tracker
        if tracker._hook is not None:
            tracker._hook.apply(event)
        if isinstance(event, Remove):
            first = max(0, (event.start - tracker._start) // PAGE_SIZE)
            last = min(len(tracker._dirty), -(-(event.end - tracker._start) // PAGE_SIZE))
            for index in range(first, last):
                tracker._written(index)


class WriteTracker:
    """Tracks the pages written in ``[start, start + length)``.

    ``async with WriteTracker(uffd, start, length) as tracker``; then
    ``await tracker.next_write()`` or ``async for page in tracker`` (fault
    mode), and ``tracker.collect()``: the pages written since the last
    collect, sorted, write-protected again. ``register=False`` when the
    range is already registered with a mode that includes WP; ``missing=``
    resolves MISSING faults of a MISSING|WP range meanwhile. ``wake=False``
    unprotects with DONTWAKE and wakes each contiguous run once per batch.
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        start: int,
        length: int,
        *,
        mode: Literal["fault", "async"] = "fault",
        register: bool = True,
        missing: AnyResolver | None = None,
        limit: int = 64,
        wake: bool = True,
    ) -> None:
        check_instance("uffd", uffd, Userfaultfd)
        check_int("start", start)
        check_int("length", length)
        if mode not in ("fault", "async"):
            raise InvalidArgument(22, f"mode must be 'fault' or 'async', not {mode!r}")
        if mode == "async":
            needed = Feature.WP_ASYNC
            hint = "open the uffd with Feature.WP_ASYNC for async tracking"
        else:
            needed = Feature.WP_UNPOPULATED
            hint = "open the uffd with Feature.WP_UNPOPULATED so untouched pages are tracked"
        if not uffd.features & needed:
            raise UnsupportedFeature(needed, hint)
        if mode == "fault" and uffd.features & Feature.WP_ASYNC:
            raise InvalidArgument(22, "fault mode needs a uffd without WP_ASYNC")
        self._uffd = uffd
        self._start = start
        self._length = length
        self._mode = mode
        self._register = register
        self._missing = missing
        self._limit = limit
        if length // PAGE_SIZE > _MAX_PAGES:
            raise InvalidArgument(
                22, f"{length:#x} bytes is more than a tracker's {_MAX_PAGES} pages"
            )
        if length <= 0 or length % PAGE_SIZE or start % PAGE_SIZE:
            raise InvalidArgument(22, f"[{start:#x}, +{length:#x}) is not a page-aligned range")
        # One byte per page, set by the first write since the last collect. It
        # never changes size: the server's C loop writes it through a pointer.
        self._dirty = bytearray(length // PAGE_SIZE)
        self._dirty_c = (ctypes.c_uint8 * len(self._dirty)).from_buffer(self._dirty)
        self._wake = wake
        self._announce = False
        self._news: deque[int] = deque()
        self._arrived = anyio.Event()
        self._server: FaultServer | None = None
        self._active = False
        self._hook: WriteHook | None = None  # a live snapshot under way (see attach)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def start(self) -> int:
        """The first address of the tracked range."""
        return self._start

    @property
    def length(self) -> int:
        """The tracked range's length in bytes."""
        return self._length

    @property
    def write_hook(self) -> WriteHook | None:
        """The hook attached now (a live snapshot under way), or None."""
        return self._hook

    def attach(self, hook: WriteHook) -> None:
        """Call ``hook`` at every write fault and event from now on, until :meth:`detach`.

        One hook at a time: a second live snapshot of the range while one is under
        way is refused (EBUSY). Attach without awaiting before :meth:`collect` (the
        instant), so that no write between the two escapes the hook.
        """
        if self._hook is not None:
            raise InvalidArgument(errno.EBUSY, "a live snapshot of this tracker is under way")
        self._hook = hook

    def detach(self, hook: WriteHook) -> None:
        """Stop calling ``hook``; nothing happens if it is not the one attached."""
        if self._hook is hook:
            self._hook = None

    async def __aenter__(self) -> WriteTracker:
        uffd = self._uffd
        if self._register:
            uffd.register(self._start, self._length, Mode.WP)
        uffd.writeprotect(self._start, self._length, protect=True)
        self._active = True
        if self._mode == "fault":
            resolver: AnyResolver = _RecordWrites(self, self._wake)
            if self._missing is not None:
                resolver = by_kind(missing=self._missing, wp=resolver)
            self._server = FaultServer(uffd, resolver, limit=self._limit, on_error=OnError())
            try:
                await self._server.__aenter__()
            except BaseException:
                self._release()
                raise
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        server, self._server = self._server, None
        try:
            if server is not None:
                return await server.__aexit__(*exc_info)
            return None
        finally:
            self._release()

    def _release(self) -> None:
        """Unprotect the range (waking any writer still blocked) and stop tracking."""
        self._active = False
        if not self._uffd.closed:
            self._uffd.writeprotect(self._start, self._length, protect=False)
            if self._register:
                self._uffd.unregister(self._start, self._length)
        self._arrived.set()

    # -- fault mode -------------------------------------------------------------

    def _written(self, index: int) -> None:
        self._dirty[index] = 1
        if self._announce:
            self._news.append(self._start + index * PAGE_SIZE)
            self._arrived.set()

    async def next_write(self) -> int:
        """The next page written for the first time since it was last collected.

        Writes are announced from the first call on (before it, the server
        records them in bulk, without announcing each one).
        """
        if self._mode != "fault":
            raise InvalidArgument(
                22, "next_write() needs fault mode: in async mode writes raise no event"
            )
        self._announce = True
        while not self._news:
            if not self._active:
                raise anyio.ClosedResourceError
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return self._news.popleft()

    def __aiter__(self) -> WriteTracker:
        return self

    async def __anext__(self) -> int:
        try:
            return await self.next_write()
        except anyio.ClosedResourceError:
            raise StopAsyncIteration from None

    # -- both modes -------------------------------------------------------------

    def dirty_indexes(self) -> list[int]:
        """The pages :meth:`collect` would return now, as page indexes from :attr:`start`,
        without protecting or clearing anything. Fault mode only: in async mode the kernel
        keeps them, and this is empty."""
        return [
            index
            for run in _DIRTY_RUN.finditer(self._dirty)
            for index in range(run.start(), run.end())
        ]

    def collect(self) -> list[int]:
        """Pages written since the last collect, protected again before they are returned."""
        if not self._active:
            raise anyio.ClosedResourceError
        if self._mode == "async":
            pages: list[int] = []
            for start, end in scan_written(self._start, self._start + self._length):
                pages.extend(range(start, end, PAGE_SIZE))
            return pages
        pages = []
        base = self._start
        for run in _DIRTY_RUN.finditer(self._dirty):
            start, end = run.span()
            self._uffd.writeprotect(base + start * PAGE_SIZE, (end - start) * PAGE_SIZE)
            pages.extend(range(base + start * PAGE_SIZE, base + end * PAGE_SIZE, PAGE_SIZE))
        ctypes.memset(self._dirty_c, 0, len(self._dirty))  # in place: C holds a pointer
        return pages


_DIRTY_RUN = re.compile(b"\x01+")
#: One byte of bitmap per page: 2**32 pages (16 TiB) is 4 GiB of it.
_MAX_PAGES = 1 << 32
