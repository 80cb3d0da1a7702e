"""A uffd's reads lent to another reader for a while (a native thread that answers faults).

A uffd's records are read once: two readers at once would each see half of them, and a
Remove read by one lets the discard go on while the other may still be copying. So a
borrower (the native replay: ``_restore/_native_replay.py``) takes the reads whole:
while the loan is out, :meth:`Userfaultfd._read_raw` reads nothing, and the event loop's
reader waits for the loan to come back instead of for the fd to be readable (it would be
readable all along: the borrower reads when it gets to it). What the borrower read and
could not handle comes back with the loan, in order, and is read first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import anyio

from ._abi import PAGE_SIZE
from ._errors import UffdError
from ._events import PageFault

if TYPE_CHECKING:
    from ._uffd import Userfaultfd

__all__ = ["ReadLoan"]


class ReadLoan:
    """The reads of one uffd, lent out; see :meth:`Userfaultfd.lend_reads`."""

    def __init__(
        self,
        uffd: Userfaultfd,
        before_close: Callable[[], None],
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
    ) -> None:
        self._uffd = uffd
        self._before_close = before_close
        self._pause, self._resume = pause, resume
        self._returned = anyio.Event()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The borrower held between two of its steps, its counts brought up to date: what
        is read of the uffd's counts and the resolvers' bitmaps meanwhile agrees."""
        if self._pause is None or self._resume is None or self.returned:
            yield
            return
        self._pause()
        try:
            yield
        finally:
            self._resume()

    @property
    def returned(self) -> bool:
        return self._returned.is_set()

    async def wait(self) -> None:
        """Until the reads are given back (or the uffd closed)."""
        await self._returned.wait()

    def closing(self, _fd: int) -> None:
        """The uffd is being closed: the borrower stops reading it, and the loan ends."""
        self._before_close()
        self._end()

    def count_filled(self, filled: int) -> None:
        """The borrower mapped ``filled`` more bytes in (the uffd's count, its servers' stats)."""
        self._uffd._filled += filled

    def give_back(self, records: bytes = b"", *, wake_faults: bool = False) -> None:
        """End the loan: ``records`` (whole ``uffd_msg`` records the borrower read and did
        not handle) are read first. With ``wake_faults`` (the borrower was cancelled: the
        server may be stopping too, and never read them), their faults' threads are woken
        instead, to fault again for whoever reads next; the other events are read first."""
        uffd = self._uffd
        if self.returned:
            return
        if records and not uffd.closed:
            events = uffd.decode(records)
            if wake_faults:
                for fault in [e for e in events if isinstance(e, PageFault)]:
                    try:
                        uffd.wake(fault.address & ~(PAGE_SIZE - 1), PAGE_SIZE)
                    except UffdError:
                        pass  # its range is gone: nobody waits there
                events = [e for e in events if not isinstance(e, PageFault)]
            uffd._push_back(events)
        self._end()

    async def taken(self) -> None:
        """Until the records given back were all read (the server applies what it reads
        before it awaits again, so an event given back is applied then), or the uffd
        closed. A server must be reading this uffd."""
        uffd = self._uffd
        turns = 0
        while uffd._unhandled and not uffd.closed:
            turns += 1  # the server reads within a turn or two; if it does not, no busy wait
            await anyio.sleep(0 if turns < 100 else 0.001)

    def _end(self) -> None:
        uffd = self._uffd
        if uffd._loan is self:
            uffd._loan = None
        uffd._forget_on_close(self.closing)
        self._returned.set()
