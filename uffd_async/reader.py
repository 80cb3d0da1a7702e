"""Reading a userfaultfd from the event loop: typed events, one reader at a time.

Facts this module relies on:

* A uffd opened by this library is non-blocking. ``read()`` returns whole
  ``uffd_msg`` records, or EAGAIN when none is pending; readiness comes from
  the event loop (``anyio.wait_readable``: epoll on trio, the selector on
  asyncio), so waiting costs no thread.
* The kernel delivers each fault once and never again. Events a server read
  but did not get to handle are pushed back onto the handle
  (``Userfaultfd._push_back``), and every reader hands those out first.
* ``Userfaultfd.close()`` calls the hook registered here, which runs
  ``anyio.notify_closing`` before the fd is closed: a task waiting to read
  wakes with ``ClosedResourceError`` instead of waiting on a dead number.
  Close the handle from the event loop's thread.
"""

from __future__ import annotations

import anyio

from ._errors import UffdClosed
from ._events import Event
from ._uffd import Userfaultfd

__all__ = ["EventReader"]


class EventReader:
    """Typed events from ``uffd``, read ``batch`` records at a time.

    ``async for event in reader`` ends when the uffd is closed;
    ``receive()`` and ``receive_batch()`` raise ``anyio.ClosedResourceError``
    then. Two tasks reading at once: ``anyio.BusyResourceError``.
    """

    def __init__(self, uffd: Userfaultfd, *, batch: int = 64) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, not {batch!r}")
        self._uffd = uffd
        self._batch = batch
        self._buffered: list[Event] = []
        self._busy = False
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
            while True:
                try:
                    events = uffd.read_events(self._batch)
                except UffdClosed:
                    raise anyio.ClosedResourceError from None
                if events:
                    return events
                await anyio.wait_readable(uffd.fileno())
        except UffdClosed:
            raise anyio.ClosedResourceError from None
        finally:
            self._busy = False

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
