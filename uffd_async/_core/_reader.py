"""Reading a userfaultfd from the event loop: typed events, one reader at a time.

Facts this module relies on:

* A uffd opened by this library is non-blocking. ``read()`` returns whole
  records (:mod:`._events`), or EAGAIN when none is pending; readiness comes from
  the event loop (``anyio.wait_readable``: epoll on trio, the selector on
  asyncio, libuv on uvloop), so waiting costs no thread. A read that returned
  fewer records than asked for emptied the queue: the next receive waits for
  readiness instead of reading EAGAIN first.
* The kernel delivers each fault once and never again. Events a server read
  but did not get to handle are pushed back onto the handle
  (``Userfaultfd._push_back``), and every reader hands those out first.
* ``Userfaultfd.close()`` calls the hook registered here, which runs
  ``anyio.notify_closing`` before the fd is closed: a task waiting to read
  wakes with ``ClosedResourceError`` instead of waiting on a dead number.
  Close the handle from the event loop's thread.
* While the uffd's reads are lent (``Userfaultfd.lend_reads``: a native thread answers
  the faults), reading finds nothing and the reader waits for the loan to end, not for
  readiness (the fd stays readable until the borrower reads): what the borrower could
  not handle comes back pushed back, and is read first. A wait for readiness already
  under way when the reads are lent is woken (``notify_closing``, the fd left open:
  both trio and anyio's asyncio only unregister it) to wait on the loan instead: the
  borrower may read the record it waits for, and give it back only to ``_unhandled``.
* Faults can come back to back for as long as their threads live: a thread
  resumed by a resolution faults again within microseconds, often before
  the uffd was seen empty, and ``spin`` catches the rest. Such a stream
  never makes a read wait, so the reader checkpoints after
  :data:`~uffd_async._core._loops.SLICE_NS` without one (whatever the reads found:
  faults, events, or records the prefilter handled): other tasks run (other
  uffds' readers among them) and a cancellation arrives, bounded by time,
  not by how often the uffd happens to run dry.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import anyio.lowlevel

from ._abi import MSG
from ._checks import check_int, check_seconds
from ._errors import UffdClosed
from ._events import Event
from ._loops import SLICE_NS
from ._uffd import Userfaultfd

__all__ = ["EventReader"]

#: What ``_read_some`` returns when the prefilter handled every record it read.
_HANDLED: list[Event] = []
_MSG_SIZE = MSG.size


class EventReader:
    """Typed events from ``uffd``, read ``batch`` records at a time.

    ``spin`` (seconds, at most 0.01) keeps reading for that long before
    sleeping in the event loop when nothing is pending: a fault that follows
    closely (the same thread, resumed, touching its next page) is then read
    without a trip through epoll and the scheduler, at the cost of that much
    busy CPU, during which other tasks do not run.

    ``prefilter`` sees the raw records of each read first and returns those
    it did not handle itself (the server's C fast path); only those are
    decoded and handed out.

    ``async for event in reader`` ends when the uffd is closed;
    ``receive()`` and ``receive_batch()`` raise ``anyio.ClosedResourceError``
    then. Two tasks reading at once: ``anyio.BusyResourceError``.
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        *,
        batch: int = 64,
        spin: float = 0.0,
        prefilter: Callable[[bytes], bytes] | None = None,
    ) -> None:
        check_int("batch", batch, minimum=1)
        check_seconds("spin", spin, maximum=0.01, zero=True)
        self._uffd = uffd
        self._batch = batch
        self._spin_ns = int(spin * 1e9)
        self._waited = time.perf_counter_ns()  # when this reader last gave the loop back
        self._prefilter = prefilter
        self._buffered: list[Event] = []
        self._busy = False
        self._drained = False  # the last read emptied the uffd
        self._short = batch * _MSG_SIZE  # a read of fewer bytes emptied it
        uffd._on_close(_notify_closing)

    @property
    def uffd(self) -> Userfaultfd:
        return self._uffd

    async def receive_batch(self) -> list[Event]:
        """Every event that is ready (at least one), waiting for one if need be."""
        if self._busy:
            raise anyio.BusyResourceError("reading from")
        self._busy = True
        try:
            if self._buffered:
                events, self._buffered = self._buffered, []
                return events
            uffd = self._uffd
            read = self._read_some
            while True:
                if time.perf_counter_ns() - self._waited >= SLICE_NS:
                    # Events kept coming without a wait: let other tasks run, and
                    # cancellation arrive, before reading more (never after: events
                    # read and then cancelled would be lost).
                    await anyio.lowlevel.checkpoint()
                    self._waited = time.perf_counter_ns()
                if self._drained:
                    self._drained = False
                    if not self._spin_ns and not uffd._unhandled:
                        await self._wait_readable()
                        self._waited = time.perf_counter_ns()
                events = read()
                if events is _HANDLED:
                    continue
                if events:
                    return events
                if self._spin_ns:
                    deadline = time.perf_counter_ns() + self._spin_ns
                    while not events and time.perf_counter_ns() < deadline:
                        events = read()
                    if events is _HANDLED:
                        continue
                    if events:
                        return events
                await self._wait_readable()
                self._waited = time.perf_counter_ns()
                self._drained = False  # readable: read, whatever another task's poll found
        except UffdClosed:
            raise anyio.ClosedResourceError from None
        finally:
            self._busy = False

    async def _wait_readable(self) -> None:
        """Until there may be something to read: the fd readable, or its reads given back
        by the reader they were lent to (what it left is read first)."""
        uffd = self._uffd
        loan = uffd._loan
        if loan is not None:
            await loan.wait()
            return
        uffd._readiness_waits += 1
        try:
            await anyio.wait_readable(uffd.fileno())
        except anyio.ClosedResourceError:
            if uffd.closed:
                raise
            # Not closed: the reads were lent meanwhile (lend_reads woke this wait, whose
            # records the borrower reads now): the next wait is on the loan.
        finally:
            uffd._readiness_waits -= 1

    def _read_some(self) -> list[Event]:
        """Pending events; with a prefilter, only what it left (``_HANDLED`` if nothing)."""
        uffd = self._uffd
        if uffd._unhandled:
            return uffd._read(self._batch)  # pushed back: they come first
        data = uffd._read_raw(self._batch)
        if not data:
            return []
        self._drained = len(data) < self._short
        prefilter = self._prefilter
        if prefilter is not None:
            data = prefilter(data)
            if not data:
                return _HANDLED
        return uffd.decode(data)

    def poll(self) -> list[Event]:
        """The events ready right now, without waiting (``[]`` if none, or closed).

        For a task other than the one receiving (the server's workers, between
        resolutions): a fault read here starts its resolution a loop iteration
        or more sooner. Never call it from inside ``receive_batch``'s task.
        """
        if self._buffered:
            events, self._buffered = self._buffered, []
            return events
        try:
            events = self._read_some()
        except UffdClosed:
            return []
        return [] if events is _HANDLED else events

    async def receive(self) -> Event:
        """The next event."""
        if not self._buffered:
            self._buffered = await self.receive_batch()
        return self._buffered.pop(0)

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except anyio.ClosedResourceError:
            raise StopAsyncIteration from None

    def push_back(self, events: list[Event]) -> None:
        """Return events that were received but not handled; they come out first."""
        self._buffered = list(events) + self._buffered

    def close(self) -> None:
        """Hand events received but never handled back to the uffd, for the next reader."""
        if self._buffered and not self._uffd.closed:
            self._uffd._push_back(self._buffered)
        self._buffered = []


def _notify_closing(fd: int) -> None:
    try:
        anyio.notify_closing(fd)
    except RuntimeError:
        pass  # not in an event loop's thread: nothing there is waiting on it
