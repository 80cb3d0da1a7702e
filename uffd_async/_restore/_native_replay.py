"""A working set's runs copied from native code, off the event loop and without the GIL.

:func:`~uffd_async._restore._prefetch.prefetch` hands its runs here first (on by default;
``with native_replay(False):`` turns it off, a context variable, so tasks started inside
the block inherit it): a worker thread maps them with ``ua_replay``
(``_core/_native_lib.c``), and while it runs it is also the uffd's reader and answers the
demand faults itself, in C: the loop only plans the runs, lends the reads, and takes them
back. Kernel and loop facts it relies on:

* Only parts whose bytes are in memory here (``memory_parts()``: ``copy_from`` from
  memory, a :class:`~uffd_async.Snapshot`'s or layered snapshot's mapping): within a part
  every page is where the part says, so a run is (destination, source, length), a fault's
  answer the same copy. Remote sources go the loop's way (a chunk at a time).
* A process that faults in a run ahead of the replay is there now: the fault is answered
  with the rest of its run, and the replay goes on from the run after it (the runs it
  passed were faulted in; a second pass maps whatever was skipped). So the thread stays
  ahead of the process instead of copying behind it. A fault outside the set brings
  ``readahead`` pages behind it (a drifted set costs no more than readahead alone).
* A uffd's records are read once, and a Remove read lets its discard go on: so the
  thread borrows the reads whole (``Userfaultfd.lend_reads``) and copies only between its
  own reads. What it cannot answer (an event, a write-protect or minor fault, a fault
  outside its parts, an ioctl error) it hands back with every record behind it, before
  any further copy: the server reads them first, in order. After a fault it stops for,
  the thread starts again at once; after an event, once the server has read and applied
  it, the rest of the set is planned again from the resolver's ``memory_parts()`` as they
  are now: a range moved (``mremap``) is a part at its new place, a page removed
  (``MADV_DONTNEED``) is blocked (never mapped by the thread: its fault goes to the
  server, which maps zeros), an unmapped range is no part at all.
* EEXIST (a page mapped meanwhile) is skipped; an event unread when a copy is issued
  (EAGAIN) is read next.
* Cancelled, it sets the stop flag and waits (shielded) for the thread, which stops
  at its next copy: no thread outlives it. Closing the uffd stops it too, and waits
  out the copy in flight: the fd's number is reused once closed.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import contextvars
import ctypes
import errno
import threading
from collections.abc import Callable, Iterator, Sequence

import anyio
import attrs

from .._core import _native
from .._core._abi import MSG, PAGE_SIZE
from .._core._errors import ProcessExited
from .._core._uffd import Userfaultfd
from .._serve._resolvers import MemoryPart

__all__ = [
    "NativeProgress",
    "native_replay",
    "native_replay_enabled",
    "replay_natively",
]

_STOP_POLL = 0.0005
_REPORT_EVERY = 0.005
#: The most pages one copy maps: a demand fault waits behind at most that much.
SLICE_PAGES = 64
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("native_replay", default=True)


@contextlib.contextmanager
def native_replay(enabled: bool = True) -> Iterator[None]:
    """Whether prefetches started inside the block (and in tasks started there) replay
    natively (the default) or on the event loop."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def native_replay_enabled() -> bool:
    return _ENABLED.get() and _native.HAS_REPLAY


@attrs.define
class NativeProgress:
    """What a native replay got through."""

    #: The working set's runs not gone through (the loop's path does those), in order.
    left: list[tuple[int, int]] = attrs.Factory(list)
    #: Whether every run that populates the rest was gone through.
    populated: bool = False
    #: The working set's first runs wholly gone through (the rest may not be).
    runs: int = 0
    #: Base pages it mapped, demand faults it answered, and when (``time.monotonic()``)
    #: the working set was gone through (0.0: not).
    pages: int = 0
    faults: int = 0
    set_done: float = 0.0
    #: Of ``pages``, those mapped as zero pages (UFFDIO_ZEROPAGE, nothing copied).
    zero_pages: int = 0
    #: Times a fault ahead moved the replay past runs to where the process was.
    jumps: int = 0
    #: Records handed back to the server (what the thread could not answer).
    handed_back: int = 0
    #: The event that stopped it (``uffd_msg.event``: a remove, remap, ...), or 0: the
    #: layout changed, and the caller plans the rest again.
    event: int = 0


class _Plan:
    """The C arrays: the runs (the set's, then populate's), each part's run of every page,
    and the parts, sorted by address (the thread finds a fault's part by bisection).
    ``owners[k]`` is the working-set run native run ``k`` belongs to. Built from flat
    integer arrays: it is on the way to the first copy."""

    def __init__(
        self,
        parts: Sequence[MemoryPart],
        set_runs: Sequence[tuple[int, int]],
        populate_runs: Sequence[tuple[int, int]],
    ) -> None:
        self._keep: list[object] = []
        self._addresses: dict[int, int] = {}
        parts = sorted(parts, key=lambda part: part.base)
        populated = [self._c_bytes(part.populated) + part.index for part in parts]
        zeros = [
            self._c_bytes(part.zeros) + part.index if part.zeros is not None else 0
            for part in parts
        ]
        blocked = [
            self._c_bytes(part.blocked) + part.index if part.blocked is not None else 0
            for part in parts
        ]
        run_of = [array.array("i", [-1]) * part.pages for part in parts]
        # The parts in the working set's naming, to find a run's parts by bisection.
        by_first = sorted(range(len(parts)), key=lambda p: parts[p].first)
        starts = [parts[p].first for p in by_first]
        ends = [parts[p].first + parts[p].pages * parts[p].page_size // PAGE_SIZE for p in by_first]
        disjoint = all(ends[n] <= starts[n + 1] for n in range(len(starts) - 1))
        fields = array.array("Q")  # ua_replay_run's eight words, run after run
        self.owners = array.array("q")
        for owner, runs in ((True, set_runs), (False, populate_runs)):
            for w, (first, count) in enumerate(runs):
                n = max(bisect.bisect_right(starts, first) - 1, 0) if disjoint else 0
                while n < len(by_first) and starts[n] < first + count:
                    p = by_first[n]
                    n += 1
                    part = parts[p]
                    ratio = part.page_size // PAGE_SIZE
                    low, high = max(first, part.first), min(first + count, ends[n - 1])
                    if low >= high:
                        continue
                    index = (low - part.first) // ratio
                    end = min(-(-(high - part.first) // ratio), part.pages)
                    if owner:
                        run_of[p][index:end] = array.array("i", [len(self.owners)]) * (end - index)
                    size = part.page_size
                    fields.extend(
                        (
                            part.base + index * size,
                            part.source + index * size,
                            end - index,
                            size,
                            part.mode,
                            populated[p] + index,
                            zeros[p] + index if zeros[p] else 0,
                            blocked[p] + index if blocked[p] else 0,
                        )
                    )
                    self.owners.append(w if owner else -1)
        self.count = len(self.owners)
        self.set_entries = sum(1 for owner in self.owners if owner >= 0)
        self._scanned = 0  # entries known gone through, from the first (see done_before)
        if not fields:
            fields.extend([0] * 8)
        self._keep.append(fields)
        self.runs = (_native.ReplayRun * max(1, self.count)).from_buffer(fields)
        self.done = (ctypes.c_uint8 * max(1, self.count))()
        self.parts = (_native.ReplayPart * len(parts))()
        for p, part in enumerate(parts):
            self._keep.append(run_of[p])
            address, _ = run_of[p].buffer_info()
            fast = self.parts[p].fast
            fast.base, fast.pages, fast.page_size = part.base, part.pages, part.page_size
            fast.source, fast.mode, fast.readahead = part.source, part.mode, part.readahead
            fast.populated, fast.zeros = populated[p], zeros[p] or None
            fast.kind = _native.FAST_COPY
            self.parts[p].run_of = address
            self.parts[p].blocked = blocked[p] or None

    def _c_bytes(self, buffer: bytearray) -> int:
        """The address of ``buffer``'s bytes, kept alive (and unresizable) with the plan."""
        address = self._addresses.get(id(buffer))
        if address is None:
            view = (ctypes.c_uint8 * len(buffer)).from_buffer(buffer)
            self._keep.append(view)
            address = self._addresses[id(buffer)] = ctypes.addressof(view)
        return address

    def done_before(self, set_runs: int) -> int:
        """How many of the working set's first runs are wholly gone through (what a
        successor taking over may skip)."""
        k = self._scanned
        while k < self.set_entries and self.done[k]:
            k += 1
        self._scanned = k
        return self.owners[k] if k < self.set_entries else set_runs

    def left(self, set_runs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The working-set runs with a native run not gone through."""
        undone = {self.owners[k] for k in range(self.set_entries) if not self.done[k]}
        return [run for w, run in enumerate(set_runs) if w in undone]

    def populated(self) -> bool:
        return all(self.done[k] for k in range(self.set_entries, self.count))


async def replay_natively(
    uffd: Userfaultfd,
    parts: Sequence[MemoryPart],
    runs: Sequence[tuple[int, int]],
    populate_runs: Sequence[tuple[int, int]] = (),
    on_progress: Callable[[NativeProgress], None] | None = None,
) -> NativeProgress:
    """Map ``runs`` (a working set's, in snapshot base pages), then ``populate_runs``, into
    ``parts`` from a worker thread that answers the demand faults meanwhile, as far as it
    can go without a decision; what is left is the caller's (``progress.left``).

    ``on_progress(progress)`` is called every few milliseconds while it runs (pages and
    faults so far), and once at the end. Nothing is done when the uffd's reads are lent
    already (another replay)."""
    progress = NativeProgress(left=list(runs))
    if not parts or not (runs or populate_runs) or uffd.closed:
        return progress
    plan = _Plan(parts, runs, populate_runs)
    pending = ctypes.create_string_buffer(_native.REPLAY_READ * MSG.size)
    control = _native.ReplayControl(
        slice_pages=SLICE_PAGES,
        set_runs=plan.set_entries,
        done=ctypes.addressof(plan.done),
        parts=plan.parts,
        nparts=len(parts),
        pending=ctypes.addressof(pending),
        pending_cap=len(pending),
    )

    def report() -> None:
        progress.runs = plan.done_before(len(runs))
        progress.pages = control.bytes_copied // PAGE_SIZE
        progress.faults = control.faults
        progress.zero_pages = control.zero_bytes // PAGE_SIZE
        progress.jumps = control.jumps
        if control.set_done_ns:
            progress.set_done = control.set_done_ns / 1e9
        if on_progress is not None:
            on_progress(progress)

    status = _native.REPLAY_STOPPED
    try:
        while True:
            status = await _run_once(uffd, plan, control, pending, report)
            progress.handed_back += control.pending_len // MSG.size
            if status != _native.REPLAY_HANDBACK or control.event or uffd.closed:
                progress.event = control.event
                break  # an event: the caller plans again, with the layout as it is now
            # Faults it could not answer went back to the server: go on.
    finally:
        progress.left = plan.left(runs)
        progress.populated = plan.populated()
        report()
    if status == _native.REPLAY_ERROR and control.error == errno.ESRCH:
        raise ProcessExited(errno.ESRCH, "the process exited")
    # Any other error: the loop's path meets it again and says what it is.
    return progress


async def _run_once(
    uffd: Userfaultfd,
    plan: _Plan,
    control: _native.ReplayControl,
    pending: ctypes.Array[ctypes.c_char],
    report: Callable[[], None],
) -> int:
    """One run of the thread, with the uffd's reads lent to it; the records it hands back
    are given back with the reads. What it maps is counted as it goes (``report``)."""

    def pause() -> None:
        _native.lib.ua_replay_pause(ctypes.byref(control))
        count()

    loan = uffd.lend_reads(
        lambda: _native.lib.ua_replay_quiesce(ctypes.byref(control)),
        pause=pause,
        resume=lambda: _native.lib.ua_replay_resume(ctypes.byref(control)),
    )
    if loan is None:
        return _native.REPLAY_STOPPED
    control.stop = control.event = 0
    control.pending_len = 0
    counted = control.bytes_copied
    finished = threading.Event()
    fd = uffd.fileno()

    def work() -> int:
        try:
            return int(_native.lib.ua_replay(fd, plan.runs, plan.count, ctypes.byref(control)))
        finally:
            finished.set()

    def count() -> None:
        nonlocal counted
        mapped = control.bytes_copied
        loan.count_filled(mapped - counted)
        counted = mapped
        report()

    async def counting() -> None:
        while True:
            await anyio.sleep(_REPORT_EVERY)
            count()

    status = _native.REPLAY_STOPPED
    cancelled = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(counting)
            try:
                status = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            finally:
                tg.cancel_scope.cancel()
    except BaseException:
        cancelled = True
        control.stop = 1  # the thread stops at its next copy
        with anyio.CancelScope(shield=True):
            while not finished.is_set():
                await anyio.sleep(_STOP_POLL)
        raise
    finally:
        count()
        loan.give_back(pending.raw[: control.pending_len], wake_faults=cancelled)
    if control.event:  # the server applies it before anything is planned again
        await loan.taken()
    return status
