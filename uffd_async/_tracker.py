"""Await-based write tracking: which pages were written since the last collect.

Two modes, both starting from a write-protected range:

* ``"fault"``: the first write to a protected page raises a WP fault; the
  tracker records the page and unprotects it (the writer waits for that,
  once per page per collect period). ``next_write()`` reports each one.
  Untouched pages are protected too only with ``UFFD_FEATURE_WP_UNPOPULATED``
  (without it, protecting an empty pte does nothing), so the uffd must have it.
* ``"async"``: ``UFFD_FEATURE_WP_ASYNC``, the kernel resolves the faults
  itself and writers never wait for Python; ``collect()`` is one PAGEMAP_SCAN
  that reports written pages and protects them again in the same walk.

No write is lost between collects: in fault mode ``collect()`` re-protects the
dirty pages *before* it swaps in a fresh set, and runs without awaiting, so a
write either landed before the re-protect (and its page is in the returned
set; read the page after ``collect()`` returns) or faults afterwards into the
next set. Leaving the tracker unprotects the range, so no writer stays blocked.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import anyio

from ._abi import PAGE_SIZE, Feature, Mode
from ._errors import InvalidArgument, UnsupportedFeature
from ._events import PageFault
from ._pagemap import scan_written
from ._server import FaultServer, OnError
from ._uffd import Userfaultfd
from .resolvers import AnyResolver, Resolver, by_kind


class _RecordWrites(Resolver):
    def __init__(self, tracker: WriteTracker) -> None:
        self._tracker = tracker

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        page = fault.address & ~(PAGE_SIZE - 1)
        uffd.writeprotect(page, PAGE_SIZE, protect=False)
        self._tracker._written(page)
        return True


class WriteTracker:
    """Tracks the pages written in ``[start, start + length)``.

    ``async with WriteTracker(uffd, start, length) as tracker``; then
    ``await tracker.next_write()`` or ``async for page in tracker`` (fault
    mode), and ``tracker.collect()``: the pages written since the last
    collect, sorted, write-protected again. ``register=False`` when the
    range is already registered with a mode that includes WP; ``missing=``
    resolves MISSING faults of a MISSING|WP range meanwhile.
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
    ) -> None:
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
        self._dirty: set[int] = set()
        self._news: deque[int] = deque()
        self._arrived = anyio.Event()
        self._server: FaultServer | None = None
        self._active = False

    @property
    def mode(self) -> str:
        return self._mode

    async def __aenter__(self) -> WriteTracker:
        uffd = self._uffd
        if self._register:
            uffd.register(self._start, self._length, Mode.WP)
        uffd.writeprotect(self._start, self._length, protect=True)
        self._active = True
        if self._mode == "fault":
            resolver: AnyResolver = _RecordWrites(self)
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

    def _written(self, page: int) -> None:
        self._dirty.add(page)
        self._news.append(page)
        self._arrived.set()

    async def next_write(self) -> int:
        """The next page written for the first time since it was last collected."""
        if self._mode != "fault":
            raise InvalidArgument(
                22, "next_write() needs fault mode: in async mode writes raise no event"
            )
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

    def collect(self) -> list[int]:
        """Pages written since the last collect, protected again before they are returned."""
        if not self._active:
            raise anyio.ClosedResourceError
        if self._mode == "async":
            pages: list[int] = []
            for start, end in scan_written(self._start, self._start + self._length):
                pages.extend(range(start, end, PAGE_SIZE))
            return pages
        dirty = sorted(self._dirty)
        for start, length in _runs(dirty):
            self._uffd.writeprotect(start, length, protect=True)
        self._dirty = set()
        return dirty


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Contiguous (start, length) runs of sorted page addresses."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
        else:
            runs.append((page, PAGE_SIZE))
    return runs
