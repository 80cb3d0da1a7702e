"""What a runner is given and what it gives back: the contract every handler is measured by.

A *runner* is any callable ``Runner = Callable[[Job], Served]``. The harness
prepares a fresh region and uffd for each run, hands them over in a
:class:`Job`, and the runner must:

1. start serving faults on ``job.uffd`` for ``[job.address, job.address + job.length)``;
2. call ``job.workload.run()`` exactly once, from any thread (it blocks,
   without the GIL, until the C workload threads are done, and returns the
   elapsed nanoseconds; the harness reads the time from there, so setup and
   teardown are not measured);
3. stop serving, and return :class:`Served` with its counters, after setting
   ``job.seen[i] = 1`` for every page ``i`` it resolved.

How to resolve a fault on page ``i`` (address ``job.address + i * job.page_size``):

* ``job.mode == "missing"``: UFFDIO_COPY one page from ``job.source + i * page_size``.
  With ``job.readahead = N``, copy the fault page plus up to N following pages
  not yet copied (``job.seen`` is the bitmap) in one ioctl. A fault for a page
  already copied gets UFFDIO_WAKE, as does EEXIST. With ``job.slow_us``, each
  fetch (each copy) first waits that long: ``time.sleep`` in a serial handler,
  ``anyio.sleep`` in an async one, which may overlap up to its concurrency limit.
* ``job.mode == "wp"``: the pages are populated and write-protected; each
  fault is a write to one of them. Unprotect the page (UFFDIO_WRITEPROTECT
  without MODE_WP); with ``job.wake_separately``, pass DONTWAKE and then
  UFFDIO_WAKE the page.

A runner must not close ``job.uffd`` or change its registration. If it fails
while the workload is blocked on a fault, it calls ``job.abort(reason)``,
which wakes every waiting thread so ``workload.run()`` returns; the harness
calls the same on its timeout. Raising :class:`NotImplementedError` before
running the workload marks the runner as skipped, with the message shown.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

import attrs

import uffd_async as ua

from ._c import native

Mode = Literal["missing", "wp"]
Access = Literal["read", "touch", "mark"]


class Workload:
    """The C workload of one run: T pthreads touch their share of the region, once per page."""

    def __init__(
        self, *, address: int, pages: int, page_size: int, threads: int, access: Access
    ) -> None:
        self.address = address
        self.pages = pages
        self.page_size = page_size
        self.threads = threads
        self.access: Access = access
        self.elapsed_ns: int | None = None
        self._lock = threading.Lock()
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    def run(self) -> int:
        """Run it to the end (GIL released throughout); returns elapsed nanoseconds."""
        with self._lock:
            if self._started:
                raise RuntimeError("the workload of a run may only run once")
            self._started = True
        self.elapsed_ns = native().workload_run(
            self.address, self.pages, self.page_size, self.threads, self.access
        )
        return self.elapsed_ns


class Abort:
    """Unblocks a run that went wrong: unregister the range, then wake every waiter.

    UFFDIO_UNREGISTER wakes threads blocked on MISSING faults; WP waiters need
    the explicit UFFDIO_WAKE. Either way they then fault the ordinary way, the
    workload finishes, and the run fails with the first reason given. The uffd
    stays open (closing it under a running handler could let its fd number be
    reused); the harness closes it once the runner has returned.
    """

    def __init__(self, uffd: ua.Userfaultfd, address: int, length: int) -> None:
        self._uffd = uffd
        self._address = address
        self._length = length
        self._lock = threading.Lock()
        self.reason: str | None = None

    def __call__(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            for unblock in (self._uffd.unregister, self._uffd.wake):
                try:
                    unblock(self._address, self._length)
                except ua.UffdError:
                    pass


@attrs.frozen(kw_only=True)
class Job:
    """One run's parameters and resources; see the module docstring for the contract."""

    scenario: str
    case: str
    mode: Mode
    uffd: ua.Userfaultfd
    address: int
    length: int
    page_size: int
    pages: int
    source: int
    threads: int
    readahead: int
    slow_us: int
    wake_separately: bool
    seen: bytearray
    workload: Workload
    timeout: float
    abort: Callable[[str], None]


@attrs.frozen(kw_only=True)
class Served:
    """A runner's counters: ``faults`` page-fault events handled; ``resolved`` pages
    populated (missing) or unprotected (wp) by the runner."""

    faults: int
    resolved: int


Runner = Callable[[Job], Served]
