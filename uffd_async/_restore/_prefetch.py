"""Copying pages in ahead of the faults: a working set first, then (if asked) everything else.

Runs beside :func:`~uffd_async.serve`, in the same event loop, through a
resolver that knows where each source page is now (``copy_from`` from memory,
or a snapshot's resolver). Kernel and loop facts it relies on:

* One UFFDIO_COPY per contiguous run, bounded (2 MiB by default): a run costs
  about what a single fault round trip does, so a working set arrives at the
  speed of memory, and a demand fault never waits behind more than one run.
* Demand faults go first, without starving the prefetch. Between runs the
  prefetcher yields, and yields again if the uffd is readable (``poll``, no
  read), so the server reads what waits; it does not wait for the uffd to go
  quiet, which a process that keeps faulting never lets happen. And a fault
  on a page of the working set that the prefetcher has not reached brings
  the rest of that page's recorded run with it (``guide``): there the
  process is ahead, and it touches the rest next.
* The resolver's bookkeeping is consistent whenever the prefetcher runs: the
  server reads a batch and applies its Remove/Remap/Unmap events without an
  await in between. While such an event is still unread in the kernel, every
  COPY fails (``MappingChanged``: :mod:`uffd_async._core._uffd`): the
  prefetcher waits for the server to read it, and plans the run again. So a
  page removed (``MADV_DONTNEED``, a balloon) or moved (``mremap``) since is
  never filled with snapshot bytes at a stale place: it is skipped.
* EEXIST means a demand fault (or its readahead) got there first: those pages
  are skipped. ESRCH means the process is gone, a closed uffd that serving
  ended: both end the prefetch quietly.
* Prefetching never waits on the faulting threads: pages it copies wake
  nobody who is not already waiting on them.
"""

from __future__ import annotations

import functools
import logging
import select
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, runtime_checkable

import anyio
import attrs
from anyio.abc import TaskStatus

from .._core._abi import PAGE_SIZE
from .._core._checks import check_int
from .._core._errors import (
    FetchError,
    MappingChanged,
    ProcessExited,
    SnapshotClosed,
    SourceChanged,
    UffdClosed,
)
from .._core._uffd import Userfaultfd
from .._serve._chunk_fill import ChunkFill
from .._serve._resolvers import AnyResolver, MemoryPart
from ._native_replay import NativeProgress, native_replay_enabled, replay_natively
from ._working_set import WorkingSet

__all__ = ["PrefetchStats", "prefetch"]

logger = logging.getLogger("uffd_async")

#: The largest run one UFFDIO_COPY copies.
DEFAULT_RUN_BYTES = 2 << 20
#: Pages a demand fault outside the working set brings behind it while a set is replayed:
#: a set that drifted then costs no more than readahead alone.
SET_READAHEAD = 15
_EAGAIN_PAUSE = 0.0002


@runtime_checkable
class Prefetchable(Protocol):
    """What :func:`prefetch` needs of the resolver it fills ahead of the faults.

    ``copy_from``'s resolvers (:class:`~uffd_async.resolvers.CopyFrom`, and the chunked
    copier of an HTTP source) and :class:`~uffd_async.SnapshotResolver` implement it.
    Pages are named as a working set names them: base pages (``PAGE_SIZE``) of the
    source. A resolver whose source is fetched a chunk at a time offers its
    ``chunk_fill``; one from memory copies runs with ``prefetch_pages``.
    """

    @property
    def chunk_fill(self) -> ChunkFill | None:
        """What to fetch chunks ahead for and fill (see ChunkFill), or None: memory."""

    @property
    def can_prefetch(self) -> bool:
        """Whether its bytes can be copied without awaiting (memory, a mapped file)."""

    def prefetch_pages(self, uffd: Userfaultfd, first: int, count: int) -> None:
        """Copy base pages ``[first, first + count)`` that are missing and still in place."""

    def guide(self, runs: Iterable[tuple[int, int]], readahead: int = 0) -> None:
        """Make a demand fault in one of these runs bring the rest of its run, and one
        outside them ``readahead`` pages behind it."""

    def memory_parts(self) -> list[MemoryPart] | None:
        """What a native copier may map itself (see ``_native_replay``), or None."""

    def source_runs(self) -> list[tuple[int, int]]:
        """(first base page, pages) of everything it serves, for populating it all."""


@attrs.define(kw_only=True)
class PrefetchStats:
    """What one :func:`prefetch` did; read it while it runs or after."""

    #: Base pages (``PAGE_SIZE``) the prefetcher copied in.
    prefetched: int = 0
    #: The working set's runs gone through, from the first: a successor taking over skips
    #: that many (a native replay may be further on; never less far).
    runs: int = 0
    #: Demand faults the native replay answered itself (the server never read them).
    faults_answered: int = 0
    #: The working set was gone through (``True`` at once when there was none).
    working_set_done: bool = False
    #: Every page was gone through (``populate=True``), so the process is fully resident
    #: but for what it removed since.
    populated: bool = False
    #: Seconds from the start to the working set done, and to everything done.
    working_set_seconds: float = 0.0
    seconds: float = 0.0


async def prefetch(
    uffd: Userfaultfd,
    resolver: AnyResolver,
    working_set: WorkingSet | None = None,
    *,
    populate: bool = False,
    run_bytes: int = DEFAULT_RUN_BYTES,
    readahead: int = SET_READAHEAD,
    stats: PrefetchStats | None = None,
    task_status: TaskStatus[PrefetchStats] = anyio.TASK_STATUS_IGNORED,
) -> PrefetchStats:
    """Copy ``working_set``'s pages into ``uffd``'s memory ahead of the faults, in recorded
    order, while ``serve(uffd, resolver)`` runs; then, with ``populate``, every other page.

    ``resolver`` is the one being served: ``copy_from`` from memory, or a
    snapshot's resolver (whose working-set pages are snapshot offsets). It must
    be served at the same time (the prefetcher lets the server read pending
    events and faults first). A demand fault in a run of the set brings the rest of
    the run; one outside the set, ``readahead`` pages behind it. From memory, a worker
    thread in C maps the runs and answers the faults meanwhile (see ``_native_replay``;
    ``native_replay(False)`` keeps it all on the loop). Returns (and
    ``task_status.started()`` gets) the :class:`PrefetchStats`, filled in as it goes.
    """
    if not isinstance(resolver, Prefetchable) or not (
        resolver.chunk_fill is not None or resolver.can_prefetch
    ):
        raise TypeError(
            f"{type(resolver).__name__} cannot prefetch: use copy_from from memory or from an "
            "HttpSource (not from a callable), or a snapshot's resolver"
        )
    fill = resolver.chunk_fill
    check_int("run_bytes", run_bytes, minimum=PAGE_SIZE)
    check_int("readahead", readahead, minimum=0)
    stats = stats if stats is not None else PrefetchStats()
    task_status.started(stats)
    run_pages = run_bytes // PAGE_SIZE
    started = time.monotonic()
    poller = select.poll()
    try:
        poller.register(uffd.fileno(), select.POLLIN)
        if fill is not None:  # remote: fetch whole chunks ahead (a fault's chunk is whole)
            if working_set is not None:
                chunks = _chunks_of(working_set.runs(run_pages), fill.chunk_source.chunk_size)
                await _fetch_chunks(uffd, fill, chunks, poller, stats)
        else:
            runs = list(working_set.runs(run_pages)) if working_set is not None else []
            if runs:  # a fault outside the set brings its readahead
                resolver.guide([], readahead)
            parts = resolver.memory_parts() if native_replay_enabled() else None
            while parts and (runs or (populate and not stats.populated)):
                everything = list(_everything(resolver, run_pages)) if populate else []
                before = (stats.prefetched, stats.faults_answered, stats.runs)

                def count(progress: NativeProgress, before: tuple[int, ...] = before) -> None:
                    stats.prefetched = before[0] + progress.pages
                    stats.faults_answered = before[1] + progress.faults
                    stats.runs = before[2] + progress.runs  # a prefix: a successor skips it

                progress = await replay_natively(uffd, parts, runs, everything, count)
                if progress.set_done and not stats.working_set_done:
                    stats.working_set_done = True
                    stats.working_set_seconds = max(0.0, progress.set_done - started)
                if progress.set_done:
                    stats.populated = populate and progress.populated
                runs = progress.left
                # Stopped by an event (applied by now): plan the rest with the new layout.
                parts = resolver.memory_parts() if progress.event else None
            if runs:  # a fault ahead of the prefetcher brings its run's rest
                resolver.guide(runs, readahead)
            await _copy_runs(uffd, resolver, runs, poller, stats)
        if not stats.working_set_done:
            stats.working_set_done = True
            stats.working_set_seconds = time.monotonic() - started
        if populate and not stats.populated:
            if fill is not None:
                chunks = _chunks_of(_everything(resolver, run_pages), fill.chunk_source.chunk_size)
                await _fetch_chunks(uffd, fill, chunks, poller, stats)
            else:
                await _copy_runs(uffd, resolver, _everything(resolver, run_pages), poller, stats)
            stats.populated = True
    except (ProcessExited, UffdClosed, SnapshotClosed, SourceChanged):
        pass  # the process is gone, serving ended, or the source is unusable: nothing to do
    stats.seconds = time.monotonic() - started
    return stats


def _everything(resolver: Prefetchable, run_pages: int) -> Iterator[tuple[int, int]]:
    for first, count in resolver.source_runs():
        for start in range(first, first + count, run_pages):
            yield start, min(run_pages, first + count - start)


async def _copy_runs(
    uffd: Userfaultfd,
    resolver: Prefetchable,
    runs: Iterable[tuple[int, int]],
    poller: select.poll,
    stats: PrefetchStats,
) -> None:
    for first, count in runs:
        await _fill(
            uffd, poller, stats, functools.partial(resolver.prefetch_pages, uffd, first, count)
        )


async def _fill(
    uffd: Userfaultfd, poller: select.poll, stats: PrefetchStats, fill: Callable[[], object]
) -> None:
    """One run, ``fill()``, once the server had its turn; planned again while it meets an
    unread event (the server reads and applies it meanwhile)."""
    await _after_the_demand(uffd, poller)
    while True:
        before = uffd._filled  # no await below: only this copies meanwhile
        try:
            fill()
        except MappingChanged:
            stats.prefetched += (uffd._filled - before) // PAGE_SIZE
            await anyio.sleep(_EAGAIN_PAUSE)
            continue
        stats.prefetched += (uffd._filled - before) // PAGE_SIZE
        break
    stats.runs += 1


def _chunks_of(runs: Iterable[tuple[int, int]], chunk_size: int) -> Iterator[int]:
    """The chunks holding base pages ``runs``, each once, in order of first appearance."""
    seen: set[int] = set()
    for first, count in runs:
        start = first * PAGE_SIZE // chunk_size
        end = -(-(first + count) * PAGE_SIZE // chunk_size)
        for chunk in range(start, end):
            if chunk not in seen:
                seen.add(chunk)
                yield chunk


async def _fetch_chunks(
    uffd: Userfaultfd,
    fill: ChunkFill,
    chunks: Iterable[int],
    poller: select.poll,
    stats: PrefetchStats,
) -> None:
    """Fetch ``chunks`` (those with a page still missing), several at a time, and fill
    each as it lands. Half the source's connections stay free for demand faults,
    whose fetches also go before these at the source: a prefetch is a guess, a
    demand fault is a stopped thread."""
    source = fill.chunk_source
    limiter = anyio.Semaphore(max(1, source.concurrency // 2))
    ended: list[BaseException] = []

    async def one(chunk: int) -> None:
        try:
            try:
                data = await source.chunk(chunk, demand=False)
            except SourceChanged:
                raise
            except FetchError as exc:  # the demand faults will try again, and fail as they must
                logger.warning("prefetch: %s", exc)
                return
            lo = chunk * source.chunk_size
            await _fill(uffd, poller, stats, functools.partial(fill.fill_span, uffd, lo, data))
        except (ProcessExited, UffdClosed, SnapshotClosed, SourceChanged) as exc:
            ended.append(exc)
            tg.cancel_scope.cancel()
        finally:
            limiter.release()

    async with anyio.create_task_group() as tg:
        for chunk in chunks:
            if not fill.chunk_missing(chunk):  # resident already
                continue
            await limiter.acquire()
            if ended:
                limiter.release()
                break
            if not fill.chunk_missing(chunk):  # a demand fault brought it while we waited
                limiter.release()
                continue
            tg.start_soon(one, chunk)
    if ended:
        if isinstance(ended[0], SourceChanged):
            logger.error("prefetch stopped: %s", ended[0])
        raise UffdClosed("serving ended") if not isinstance(ended[0], SourceChanged) else ended[0]


async def _after_the_demand(uffd: Userfaultfd, poller: select.poll) -> None:
    """Let the server have its turn first: whatever it has to read, it reads now.

    One turn, not until the uffd is quiet: a process that keeps faulting keeps it
    readable, and a prefetcher that waited for quiet would starve behind it.
    """
    if uffd.closed:
        raise UffdClosed("the uffd was closed: serving ended")
    await anyio.lowlevel.checkpoint()
    if poller.poll(0):
        await anyio.lowlevel.checkpoint()
