"""Live snapshots: memory exactly as it was at one instant, while the program keeps running.

What QEMU's ``background-snapshot`` (6.0+) does for guest RAM, for any range a
userfaultfd has registered in WP mode, in this process or a peer's. Kernel
facts this relies on (``man 2 ioctl_userfaultfd``, admin-guide/mm/userfaultfd):

* ``UFFDIO_WRITEPROTECT`` of the range is the instant: from then on a write to
  a page blocks its thread in a WP fault until the page is unprotected. Reads
  never fault, so the saver reads protected pages while the program runs: a
  page still protected holds what it held at the instant.
* A page a writer hits is saved first, then unprotected (and its thread
  woken); the rest are saved in address order in the background, each run
  unprotected once saved (or left protected for a ``WriteTracker``, whose
  protection is the next layer's instant). So a writer waits only on the
  pages it writes before they are saved, once each.
* Without ``UFFD_FEATURE_WP_UNPOPULATED`` (6.4+), protecting skips empty
  ptes, and a page never populated would escape: its first write would not
  fault. Then every page is read once first, which maps the zero page there
  (QEMU pre-faults the same way); with the feature nothing is pre-faulted.
* While a non-cooperative event (remap, remove, unmap) is unread every
  ioctl fails (EAGAIN, see :mod:`uffd_async._core._uffd`): a run read in the
  background is written to the image only if no event arrived while it was
  read and its unprotect (or, for a tracker, a re-protect of one of its
  pages: a no-op) succeeds; otherwise it is read again. Pages moved by
  mremap are read where they are now (``EVENT_REMAP`` keeps them registered
  and protected).
* A page unmapped before it was saved is lost (zeros in the image, counted).
  Without ``EVENT_UNMAP`` nothing says so: a write fault read after its page
  was unmapped saves zeros, and its unprotect fails with ENOENT; the writer
  is then woken, to fault again there as the kernel says (SIGSEGV, EFAULT).
  A page discarded (``MADV_DONTNEED``) before it was saved has lost its
  contents too: the kernel zaps it as soon as the REMOVE event is read. It is
  read at once, which often still finds them, and counted in ``discarded``;
  QEMU refuses discards during a background snapshot for this reason.
* A page the process does not map reads nothing
  (:mod:`uffd_async._core._process_memory`), which for an unmapped page is
  right (zeros). For a wrong ``pid`` every page would be so: the range must
  be mapped in ``pid`` (``/proc/PID/maps``) before anything is protected,
  and ESRCH or EPERM (no ptrace access) are errors, never zeros. The image
  file is 0600 and written atomically (:mod:`uffd_async._core._atomic_file`):
  it holds a process's memory.
* Writes that do not go through the page tables of the registered range
  (device DMA, a ``write()`` into it from the kernel of another process) are
  not seen.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import IO, TYPE_CHECKING, Any

import anyio
import attrs
from anyio.abc import TaskStatus

from .._core._abi import PAGE_SIZE, WRITEPROTECT_MODE_DONTWAKE, Feature
from .._core._addrspace import AddressMap
from .._core._atomic_file import MappedFile
from .._core._checks import check_instance, check_int, check_page_size
from .._core._errors import InvalidArgument, MappingChanged, UffdClosed, UffdError
from .._core._events import PageFault, Remap, Remove, Unmap
from .._core._native import FAST_SAVE, FastPath
from .._core._process_memory import ProcessMemory
from .._core._uffd import Userfaultfd
from .._serve._resolvers import AnyResolver, Resolver, by_kind
from .._serve._server import FaultServer, OnError
from ._identity import identity_of, identity_samples

if TYPE_CHECKING:
    from ._tracker import WriteTracker

__all__ = ["LiveSnapshotStats", "snapshot_live"]

#: Bytes read per background run (one worker-thread read, one unprotect).
DEFAULT_RUN_BYTES = 1 << 20
_EAGAIN_PAUSE = 0.0002
#: A write fault the C loop serves also saves (and unprotects) up to this many unsaved
#: pages behind it: random writers then fault several times less.
_SAVE_AHEAD = 15
#: Seconds between two recounts of the saved bitmap (O(pages)) for the live stats.
_RECOUNT = 0.1


@attrs.define(kw_only=True)
class LiveSnapshotStats:
    """What one :func:`snapshot_live` did; read it while it runs or after."""

    #: Pages written to the image (or layer) so far, and of those, saved at a writer's
    #: fault before the background got there (the page hit, and with the C loop up to 15
    #: unsaved pages behind it, saved and unprotected together).
    pages: int = 0
    early: int = 0
    #: Pages to save in all: the range's, or (incremental) those written since the last one.
    total: int = 0
    #: Unsaved pages discarded (MADV_DONTNEED) or unmapped during the snapshot: their
    #: contents at the instant may be gone (see the module's notes).
    discarded: int = 0
    lost: int = 0
    #: The longest a write fault took to resolve, seconds: from its read to its page
    #: unprotected (for the C loop, its batch's time; the writer also waited for the read).
    longest_wait: float = 0.0
    #: Seconds from the start to the instant (protection), and to everything saved.
    instant_seconds: float = 0.0
    seconds: float = 0.0
    #: The identity of what was written: a full image's ``snapshot_identity``, or the
    #: layer's own (what the next layer names as its parent).
    identity: bytes = b""


class _ImageFile:
    """The full image: a file mapped shared, so the C fast path saves pages straight into
    it; written where its pages go, committed atomically (a path) or in place (a file)."""

    slots: int | None = None  # page index = slot

    def __init__(self, dest: str | os.PathLike[str] | IO[bytes], size: int) -> None:
        self.size = size
        self._file = MappedFile(dest, size)
        self.address = self._file.address

    def write(self, index: int, source: int, length: int, page_size: int) -> None:
        ctypes.memmove(self.address + index * page_size, source, length)

    def commit(self) -> bytes:
        samples = [ctypes.string_at(self.address + at, n) for at, n in identity_samples(self.size)]
        self.address = 0
        self._file.commit()
        return identity_of(self.size, samples)

    def abort(self) -> None:
        self.address = 0
        self._file.abort()


class _LayerFile:
    """An incremental layer: only the pages written since the parent's instant."""

    slots: int | None = None

    def __init__(self, dest: str | os.PathLike[str], size: int, pages: list[int],
                 page_size: int, parent: bytes) -> None:  # fmt: skip
        from ._layer_writer import LayerWriter

        self.size = size
        self._writer = LayerWriter(
            dest, page_size=page_size, image_size=size, pages=pages, parent=parent
        )

    def write(self, index: int, source: int, length: int, page_size: int) -> None:
        for n in range(length // page_size):
            page = (ctypes.c_char * page_size).from_address(source + n * page_size)
            self._writer.write_page(index + n, memoryview(page))

    def commit(self) -> bytes:
        return self._writer.commit()

    def abort(self) -> None:
        self._writer.abort()


class _Snapshot:
    """The state of one live snapshot: which pages are saved, where they are now.

    Under a tracker it is the tracker's :class:`~._tracker.WriteHook` (its
    ``before_unprotect``, ``fast_path`` and ``apply``, which ``_SaveFirst`` calls otherwise).
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        address: int,
        length: int,
        sink: _ImageFile | _LayerFile,
        memory: ProcessMemory,
        stats: LiveSnapshotStats,
        unprotect: bool,
        safe_reads: bool,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.uffd = uffd
        self.base = address
        self.page_size = page_size
        self.pages = length // page_size
        self.sink = sink
        self.memory = memory
        self.stats = stats
        self.unprotect = unprotect  # after saving a run (else a tracker keeps it protected)
        self.safe_reads = safe_reads  # no MISSING registration: the loop thread may read
        self.saved = bytearray(self.pages)  # 1: saved, or not wanted in this snapshot
        self._saved_c = (ctypes.c_uint8 * self.pages).from_buffer(self.saved)
        self.skipped = 0  # pages marked saved without being saved: not wanted, or unmapped
        self.background = 0  # pages the background saved (the rest were hit first)
        self._counted = 0.0  # when count() last ran
        self._fast: FastPath | None = None
        self.where = AddressMap(address, length)
        self.events = 0  # events applied: a background read that saw one is redone
        self.error: Exception | None = None  # what failed an early save
        self._page = ctypes.create_string_buffer(self.page_size)

    # -- a writer hit a page: save it first --------------------------------------

    def save_early(self, page: int, *, early: bool = True) -> None:
        """Save the page at ``page`` (a current address) if it is ours and unsaved."""
        original = self.where.original(page)
        if original is None:
            return
        index = (original - self.base) // self.page_size
        if self.saved[index]:
            return
        if self.memory.read_into(page, self._page, self.page_size):
            self.stats.lost += 1
            ctypes.memset(self._page, 0, self.page_size)  # not the last page saved: zeros
        self.sink.write(index, ctypes.addressof(self._page), self.page_size, self.page_size)
        self.saved[index] = 1
        if not early:
            self.background += 1
        # One more, not a recount of the bitmap (O(pages) per fault); what the C fast path
        # saved meanwhile is counted at the next count().
        self.stats.pages += 1
        self.stats.early = self.stats.pages - self.background

    def count(self) -> None:
        """Bring the stats up to date (pages saved by the C fast path included)."""
        stats = self.stats
        stats.pages = self.saved.count(1) - self.skipped
        stats.early = stats.pages - self.background

    def fast_path(self, marks: int | None = None) -> FastPath | None:
        """What the server's C loop may do for write faults: save, then unprotect (with
        DONTWAKE and one wake per run); only while no event moved anything."""
        if self.events or not isinstance(self.sink, _ImageFile):
            return None
        if self._fast is None:
            self._fast = FastPath(
                base=self.base,
                pages=self.pages,
                page_size=self.page_size,
                mode=WRITEPROTECT_MODE_DONTWAKE,
                populated=ctypes.addressof(self._saved_c),
                kind=FAST_SAVE,
                image=self.sink.address,
                pid=self.memory.pid,
                readahead=_SAVE_AHEAD,
            )
        self._fast.marks = marks
        return self._fast

    def before_unprotect(self, page: int) -> None:
        """What a write fault does first: save the page. A failure to save never leaves
        the writer blocked or kills it: it fails the snapshot instead."""
        started = time.perf_counter()
        try:
            self.save_early(page)
        except Exception as exc:
            if self.error is None:
                self.error = exc
        self.stats.longest_wait = max(self.stats.longest_wait, time.perf_counter() - started)

    # -- the address space changed ------------------------------------------------

    def apply(self, event: Remap | Remove | Unmap) -> None:
        self.events += 1
        if isinstance(event, Unmap):
            for index, _ in self._unsaved_in(event.start, event.end):
                self.saved[index] = 1  # gone: zeros in the image
                self.skipped += 1
                self.stats.lost += 1
        elif isinstance(event, Remove):
            for _, page in self._unsaved_in(event.start, event.end):
                self.stats.discarded += 1
                if self.safe_reads:  # at once: the kernel zaps them now (best effort)
                    self.save_early(page, early=False)
        self.where.apply(event)

    def _unsaved_in(self, start: int, end: int) -> list[tuple[int, int]]:
        """(index, current address) of the unsaved pages mapped within [start, end) now."""
        found = []
        for page in range(start & ~(self.page_size - 1), end, self.page_size):
            original = self.where.original(page)
            if original is not None:
                index = (original - self.base) // self.page_size
                if not self.saved[index]:
                    found.append((index, page))
        return found

    # -- the background ---------------------------------------------------------------

    def pieces(self, first: int, count: int) -> list[tuple[int, int, int]]:
        """(first index, pages, current address) of source pages ``[first, first + count)``
        that are still mapped, wherever they are now."""
        lo = self.base + first * self.page_size
        hi = lo + count * self.page_size
        found = []
        for current_start, current_end, original in self.where._segments:
            o_lo = max(lo, original)
            o_hi = min(hi, original + (current_end - current_start))
            if o_lo < o_hi:
                found.append((
                    (o_lo - self.base) // self.page_size,
                    (o_hi - o_lo) // self.page_size,
                    current_start + (o_lo - original),
                ))  # fmt: skip
        return sorted(found)

    def commit_run(self, first: int, count: int, current: int, buffer: Any) -> None:
        """Write the run's unsaved pages from ``buffer`` (read while they were protected),
        then unprotect the run (full snapshots). Raises MappingChanged when an event is
        unread: then nothing was written and the run must be read again."""
        saved = self.saved
        if self.unprotect:
            self.uffd.writeprotect(current, count * self.page_size, protect=False)
        else:  # a tracker keeps them protected: re-protecting an unsaved one is the probe
            probe = saved.find(0, first, first + count)
            if probe < 0:
                return
            self.uffd.writeprotect(current + (probe - first) * self.page_size, self.page_size)
        address = ctypes.addressof(buffer)
        i, end = first, first + count
        while i < end:
            if saved[i]:
                i += 1
                continue
            j = i
            while j < end and not saved[j]:
                j += 1
            self.sink.write(
                i, address + (i - first) * self.page_size, (j - i) * self.page_size, self.page_size
            )
            saved[i:j] = b"\1" * (j - i)
            self.background += j - i
            self.stats.pages += j - i
            i = j
        now = time.monotonic()
        if now - self._counted > _RECOUNT:  # not per run: a recount is O(pages)
            self._counted = now
            self.count()

    async def save_all(self, run_pages: int) -> None:
        first = self.saved.find(0)
        while 0 <= first < self.pages:
            count = min(run_pages, self.pages - first)
            for index, pages, current in self.pieces(first, count):
                if self.saved.find(0, index, index + pages) >= 0:
                    await self._save_piece(index, pages, current)
            first = self.saved.find(0, first + count)
        self.count()  # the pages the C fast path saved since the last run was committed
        if self.error is not None:
            raise self.error

    async def _save_piece(self, index: int, pages: int, current: int) -> None:
        buffer = ctypes.create_string_buffer(pages * self.page_size)
        while True:
            await anyio.lowlevel.checkpoint()  # the server's turn first: writers wait on it
            if self.error is not None:
                raise self.error
            events = self.events
            unreadable = await anyio.to_thread.run_sync(
                self.memory.read_into, current, buffer, self.page_size
            )
            if self.events != events:  # the map changed while we read: where is it now?
                for again in self.pieces(index, pages):
                    if self.saved.find(0, again[0], again[0] + again[1]) >= 0:
                        await self._save_piece(*again)
                return
            try:
                self.commit_run(index, pages, current, buffer)
            except MappingChanged:
                await anyio.sleep(_EAGAIN_PAUSE)
                continue
            self.stats.lost += unreadable
            return

    def release(self) -> None:
        """Unprotect whatever is still protected (full snapshots), waking every writer."""
        if self.unprotect and not self.uffd.closed:
            for current_start, current_end, _ in self.where._segments:
                try:
                    self.uffd.writeprotect(current_start, current_end - current_start,
                                           protect=False)  # fmt: skip
                except (UffdClosed, OSError):
                    pass  # gone (the process exited, or the range was unmapped)


class _SaveFirst(Resolver):
    """A write-protect fault: save the page if it is not saved yet, then unprotect it."""

    def __init__(self, snapshot: _Snapshot) -> None:
        self._snapshot = snapshot

    def resolve_now(self, fault: PageFault, uffd: Userfaultfd) -> bool:
        size = self._snapshot.page_size
        page = fault.address & ~(size - 1)
        self._snapshot.before_unprotect(page)
        try:
            uffd._unprotect_nocheck(page, size, True)
        except UffdError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # Unmapped while the write waited (no EVENT_UNMAP said so): wake the writer,
            # which faults again there and gets what the kernel gives (SIGSEGV, EFAULT).
            uffd.wake(page, size)
        return True

    def _fast_path(self) -> FastPath | None:
        return self._snapshot.fast_path()

    def apply(self, event: Remap | Remove | Unmap) -> None:
        self._snapshot.apply(event)


async def snapshot_live(
    uffd: Userfaultfd,
    address: int,
    length: int,
    dest: str | os.PathLike[str] | IO[bytes],
    *,
    pid: int | None = None,
    tracker: WriteTracker | None = None,
    incremental: bool = False,
    parent: bytes | None = None,
    missing: AnyResolver | None = None,
    run_bytes: int = DEFAULT_RUN_BYTES,
    limit: int = 64,
    page_size: int = PAGE_SIZE,
    stats: LiveSnapshotStats | None = None,
    task_status: TaskStatus[LiveSnapshotStats] = anyio.TASK_STATUS_IGNORED,
) -> LiveSnapshotStats:
    """Write ``[address, address + length)`` as it was at one instant to ``dest``, while
    the program keeps writing to it.

    Use it with ``await tg.start(ua.snapshot_live, ...)``: ``task_status.started()``
    gets the stats once the range is protected, which is the snapshot's instant.
    The range must be registered on ``uffd`` in WP mode (not WP_ASYNC). ``pid``: the
    process whose memory it is, for a uffd handed over by another process (reading
    it needs ptrace access); this one by default. ``dest``: a path (written
    atomically) or a binary file (truncated). ``missing``: resolves MISSING faults
    of a MISSING|WP range meanwhile. Without ``tracker`` this serves the range's
    faults itself, and every page is unprotected once saved.

    With a :class:`~uffd_async.WriteTracker` running on the range (fault mode),
    its server serves the faults (saving first) and the instant is its
    ``collect()``: ``incremental=True`` then writes only the pages written since
    the previous collect, as a layer on top of ``parent`` (the identity of the
    image below; see :class:`~uffd_async.LayeredSnapshot`), and pages stay
    protected for the next one. Returns the :class:`LiveSnapshotStats`.
    Cancelling it unprotects everything (without a tracker) and writes nothing.
    """
    check_int("address", address)
    check_int("length", length)
    check_instance("uffd", uffd, Userfaultfd)
    check_page_size("page_size", page_size)
    if address % page_size or length <= 0 or length % page_size:
        raise InvalidArgument(
            errno.EINVAL, f"[{address:#x}, +{length:#x}) is not aligned to {page_size}-byte pages"
        )
    check_int("run_bytes", run_bytes, minimum=page_size)
    if uffd.features & Feature.WP_ASYNC:
        raise InvalidArgument(
            errno.EINVAL,
            "a uffd with WP_ASYNC resolves write faults in the kernel, so no page can be saved "
            "before it is written: open it without WP_ASYNC",
        )
    if incremental and tracker is None:
        raise InvalidArgument(
            errno.EINVAL, "incremental=True needs the WriteTracker that ran since the last one"
        )
    if incremental and parent is None:
        raise InvalidArgument(errno.EINVAL, "a layer needs parent= (the identity below it)")
    if tracker is not None:
        if page_size != PAGE_SIZE:
            raise InvalidArgument(errno.EINVAL, "a WriteTracker tracks 4 KiB pages only")
        if tracker.mode != "fault":
            raise InvalidArgument(errno.EINVAL, "a live snapshot needs a fault-mode WriteTracker")
        if (tracker.start, tracker.length) != (address, length):
            raise InvalidArgument(errno.EINVAL, "the tracker must track exactly this range")
        if tracker.write_hook is not None:
            raise InvalidArgument(errno.EBUSY, "a live snapshot of this tracker is under way")
    stats = stats if stats is not None else LiveSnapshotStats()
    started = time.monotonic()
    memory = ProcessMemory(pid)
    _check_mapped(memory.pid, address, length)
    if not uffd.features & Feature.WP_UNPOPULATED and tracker is None:
        # Protection would skip empty ptes: populate them (reading maps the zero page).
        scratch = ctypes.create_string_buffer(min(length, run_bytes))
        for at in range(address, address + length, len(scratch)):
            piece = (ctypes.c_char * min(len(scratch), address + length - at)).from_buffer(scratch)
            await anyio.to_thread.run_sync(memory.read_into, at, piece, page_size)
    sink: _ImageFile | _LayerFile
    snapshot: _Snapshot | None = None
    try:
        if tracker is not None and incremental:
            if not isinstance(dest, (str, os.PathLike)):
                raise InvalidArgument(errno.EINVAL, "a layer is written to a path (atomically)")
            assert parent is not None
            snapshot = _under_tracker(uffd, address, length, dest, memory, stats, tracker,
                                      parent, missing)  # fmt: skip
            await _run(snapshot, run_bytes, started, task_status, tracker)
            return stats
        sink = _ImageFile(dest, length)
        snapshot = _Snapshot(uffd, address, length, sink, memory, stats, unprotect=tracker is None,
                             safe_reads=missing is None, page_size=page_size)  # fmt: skip
        stats.total = snapshot.pages
        if tracker is not None:
            tracker.attach(snapshot)  # no await until collect(): a write between is saved
            tracker.collect()
            await _run(snapshot, run_bytes, started, task_status, tracker)
            return stats
        resolver = _SaveFirst(snapshot)
        serving: AnyResolver = resolver
        if missing is not None:
            serving = by_kind(missing=missing, wp=resolver)
        async with FaultServer(uffd, serving, limit=limit, on_error=OnError()) as server:
            try:
                uffd.writeprotect(address, length, protect=True)  # the instant
                await _run(snapshot, run_bytes, started, task_status)
            finally:
                snapshot.release()
                waited = server.stats.latency_us(100) / 1e6
                stats.longest_wait = max(stats.longest_wait, waited)
        return stats
    except BaseException:
        if snapshot is not None:
            snapshot.sink.abort()
        raise
    finally:
        if tracker is not None and snapshot is not None:
            tracker.detach(snapshot)


def _check_mapped(pid: int, address: int, length: int) -> None:
    """The range is registered on the uffd, so mapped in the process it belongs to: where
    process ``pid`` does not map all of it, ``pid`` is the wrong one, and every read of
    it would fail (an image of zeros). Read from ``/proc/PID/maps``: nothing faults."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.readlines()
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}: whose memory is it?") from None
    except PermissionError as exc:
        raise PermissionError(
            errno.EPERM, f"cannot read the memory of process {pid} (no ptrace access): {exc}"
        ) from None
    end, position = address + length, address
    for line in lines:
        low, _, high = line.split(" ", 1)[0].partition("-")
        start, stop = int(low, 16), int(high, 16)
        if start <= position < stop:
            position = stop
            if position >= end:
                return
    raise InvalidArgument(
        errno.EFAULT,
        f"[{address:#x}, +{length:#x}) is not mapped in process {pid} (from {position:#x}): "
        "pid must be the process whose memory the uffd serves",
    )


def _under_tracker(
    uffd: Userfaultfd,
    address: int,
    length: int,
    dest: Any,
    memory: ProcessMemory,
    stats: LiveSnapshotStats,
    tracker: WriteTracker,
    parent: bytes,
    missing: AnyResolver | None,
) -> _Snapshot:
    """The instant of a layer: the tracker's collect() (no await between it and the hook)."""
    pages = tracker.dirty_indexes()
    sink = _LayerFile(dest, length, pages, PAGE_SIZE, parent)
    snapshot = _Snapshot(uffd, address, length, sink, memory, stats, unprotect=False,
                         safe_reads=missing is None)  # fmt: skip
    snapshot.saved[:] = b"\1" * snapshot.pages
    for index in pages:
        snapshot.saved[index] = 0
    snapshot.skipped = snapshot.pages - len(pages)
    stats.total = len(pages)
    tracker.attach(snapshot)
    written = tracker.collect()
    assert len(written) == len(pages)
    return snapshot


async def _run(
    snapshot: _Snapshot, run_bytes: int, started: float,
    task_status: TaskStatus[LiveSnapshotStats], tracker: WriteTracker | None = None,
) -> None:  # fmt: skip
    stats = snapshot.stats
    stats.instant_seconds = time.monotonic() - started
    task_status.started(stats)
    await snapshot.save_all(max(1, run_bytes // snapshot.page_size))
    if tracker is not None:
        tracker.detach(snapshot)  # all saved: its faults need nothing from us any more
    # The sync (msync, fsync: up to seconds) runs in a worker thread: a tracker's writers
    # must not wait for it on the event loop. Every wanted page is saved, so the C loop
    # never writes into the image again (it only reads the saved bitmap).
    stats.identity = await anyio.to_thread.run_sync(snapshot.sink.commit)
    stats.seconds = time.monotonic() - started
