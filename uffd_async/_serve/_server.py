"""The fault server: reads events, runs resolvers under one task group, never drops a fault.

Kernel facts this module relies on:

* Each fault is delivered once (:mod:`uffd_async._core._reader`): a fault read
  and not resolved is a thread blocked until someone resolves it or the uffd
  closes. So every fault the server read but did not resolve, when it stops
  for any reason, is pushed back onto the handle for the next reader.
* Every thread that faults on a page gets its own event, and one resolving
  ioctl wakes them all. Faults on a page whose resolution is under way are
  coalesced into it.
* :class:`PageExists` (EEXIST, which wakes nobody: see :mod:`uffd_async._core._uffd`):
  the server wakes the page itself.
* :class:`MappingChanged` (EAGAIN: a Remove/Remap/Unmap/Fork is unread, see
  :mod:`uffd_async._core._uffd`): the server reads and applies pending
  events, then retries the deferred faults; non-cooperative events in a
  batch are applied before the faults in it (a fault may be read before the
  REMOVE that concerns it).
* A thread blocked on a page that was remapped or unmapped waits on the old
  address; the server wakes it there, and it retries its access.
* With UFFDIO_POISON, an access to a poisoned page raises SIGBUS in the
  thread instead of reading anything: the safe answer when a resolver failed.
* A fork child's uffd (``EVENT_FORK``) is held by nobody else, and no pid
  comes with it: its own server serves it, with this one's options, until
  its memory is gone (the child exited or exec'd: ``_peer_lifetime``), even
  after the parent exited; closing it sooner would turn the child's missing
  pages into zeros.
* Handing over to another process (``hand_over``, a takeover): a fault pushed
  back onto this handle would never reach it, so each one read and not
  answered is woken instead (``UFFDIO_WAKE``): its thread retries the access,
  faults again, and the kernel queues a new event for whoever reads next.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .._core._abi import MSG, PAGE_SIZE, Feature
from .._core._checks import check_instance
from .._core._errors import (
    InvalidArgumentType,
    MappingChanged,
    PageExists,
    ProcessExited,
    UffdClosed,
    UffdError,
)
from .._core._events import Event, Fork, PageFault, Remap, Remove, Unmap
from .._core._memory import serving_here
from .._core._native import FastCounts, lib
from .._core._reader import EventReader
from .._core._uffd import Userfaultfd
from ._options import DEFAULT_SPIN, OnError, ServeOptions, from_keywords, settle
from ._peer_lifetime import memory_gone
from ._pool import WorkerPool
from ._resolvers import AnyResolver, Resolver, zero_page
from ._stats import ServerStats

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("uffd_async")

_MSG_SIZE = MSG.size

#: How often (at most) a worker reads the uffd after a resolution, in ns; see ``_poll``.
_POLL_NS = 100_000
_RETRY_DELAYS = (0.0, 0.0001, 0.0005, 0.001, 0.005)


class _Server:
    def __init__(self, uffd: Userfaultfd, resolver: AnyResolver, options: ServeOptions) -> None:
        check_instance("options", options, ServeOptions)
        check_instance("uffd", uffd, Userfaultfd)
        if not callable(resolver):
            raise InvalidArgumentType(
                f"resolver must be an async callable, not {type(resolver).__name__}"
            )
        self.uffd = uffd
        self.resolver = resolver
        self.inline = resolver if isinstance(resolver, Resolver) else None
        self._awaited = resolver.resolve if isinstance(resolver, Resolver) else resolver
        self._woke = resolver.woke if isinstance(resolver, Resolver) else None
        #: Every option this server serves with, no choice left open: its fork children's
        #: servers are made of this very object (the fields below are derived from it).
        self.options = settle(options)
        on_error, page_size, spin = self.options.on_error, self.options.page_size, self.options.spin
        assert on_error is not None and page_size is not None and spin is not None  # settled
        self.on_error = on_error
        self.page_mask = ~(page_size - 1)
        self.page_size = page_size
        self.stats = ServerStats()
        self._spin_ns = int(spin * 1e9)
        self.reader = EventReader(
            uffd, batch=self.options.batch, spin=spin, prefilter=self._fast if self.inline else None
        )
        self._in_flight: dict[int, PageFault] = {}
        self._pool = WorkerPool(self._resolve_async, self.options.limit, after=self._poll)
        self._polled = 0  # perf_counter_ns() of the last poll
        self._queued: deque[PageFault] = deque()
        self._deferred: list[PageFault] = []
        self._retrying = False
        self._tg: TaskGroup | None = None
        self._children: TaskGroup | None = None
        self._exited = False
        self._left: list[PageFault] = []  # failed with on_error "leave": handed back at the end
        self._undisposed: list[PageFault] = []  # failed; on_error's answer met EAGAIN
        self._unreported: list[tuple[PageFault, Exception]] = []
        self._filled_before = uffd._filled
        #: The Remove/Remap/Unmap events applied so far, in order: a successor's resolver
        #: applies them again (``_handoff._succession``).
        self.applied: list[Remap | Remove | Unmap] = []
        #: Called once the Remove/Remap/Unmap events of a read are applied (before its
        #: faults), and once each fork child is served (its children's servers call it
        #: too): a handoff server pushes its state to systemd's fd store then.
        self.on_applied: Callable[[], None] | None = None
        self._handing_over = False
        self._child_servers: list[_Server] = []
        #: After :meth:`hand_over`: every fork child's uffd, resolver and applied events.
        self.handed_children: list[
            tuple[Userfaultfd, AnyResolver, list[Remap | Remove | Unmap]]
        ] = []

    # -- the loop ----------------------------------------------------------

    async def run(self, task_status: TaskStatus[Any]) -> None:
        with serving_here():  # a Region access on this thread must not wait on us
            await self._run(task_status)

    async def _run(self, task_status: TaskStatus[Any]) -> None:
        try:
            # Fork children get a task group of their own: they go on being
            # served when this uffd's process exits, and end with their own.
            async with anyio.create_task_group() as children:
                self._children = children
                try:
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        task_status.started(self)
                        reader = self.reader
                        handle = self._handle
                        while not self._exited:
                            try:
                                events = await reader.receive_batch()
                            except anyio.ClosedResourceError:
                                break
                            handle(events)
                        tg.cancel_scope.cancel()
                finally:
                    self._tg = None
                    self._hand_back()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

    def _fast(self, data: bytes) -> bytes:
        """Resolve what the C loop can (see ``ua_resolve_batch``); return the records it left."""
        assert self.inline is not None
        fast = self.inline._fast_path()
        if fast is None:
            return data
        count = len(data) // _MSG_SIZE
        handled = (ctypes.c_uint8 * count)()
        counts = FastCounts()
        started = time.perf_counter_ns()
        done = lib.ua_resolve_batch(
            self.uffd._fd, data, count, ctypes.byref(fast), handled, ctypes.byref(counts)
        )
        if not done:
            return data
        stats = self.stats
        stats._record(time.perf_counter_ns() - started)
        stats.faults += done
        stats.resolved += counts.resolved
        stats.eexist += counts.eexist
        self.uffd._filled += counts.filled
        self.count_pages()
        if done == count:
            return b""
        view = memoryview(data)
        return b"".join(
            view[i * _MSG_SIZE : (i + 1) * _MSG_SIZE] for i in range(count) if not handled[i]
        )

    def count_pages(self) -> None:
        self.stats.pages = (self.uffd._filled - self._filled_before) // PAGE_SIZE

    def _hand_back(self) -> None:
        """Give every fault read but not resolved back to the uffd (or, handing over to
        another process, wake its page: the thread faults again, for the next reader)."""
        self.count_pages()
        unresolved = (
            self._left
            + self._undisposed
            + list(self._in_flight.values())
            + list(self._queued)
            + self._deferred
        )
        self._left = []
        self._undisposed = []
        self._in_flight.clear()
        self._pool.pending.clear()
        self._queued.clear()
        self._deferred = []
        self.stats.in_flight = 0
        if unresolved and not self.uffd.closed:
            self.uffd._push_back(list(unresolved))
        self.reader.close()
        if self._handing_over and self.uffd._unhandled:
            events, self.uffd._unhandled = self.uffd._unhandled, []
            pages = [e.address & self.page_mask for e in events if isinstance(e, PageFault)]
            if pages:
                self._wake_pages(pages)

    def _handle(self, events: list[Event], retried: list[PageFault] | None = None) -> None:
        """Apply non-cooperative events, then dispatch ``retried`` and the new faults."""
        faults = [event for event in events if isinstance(event, PageFault)]
        if len(faults) < len(events):
            for event in events:
                if not isinstance(event, PageFault):
                    self._apply(event)
            if self.on_applied is not None:
                self.on_applied()
        self.stats.faults += len(faults)
        if retried:
            self.stats.retries += len(retried)
            faults = retried + faults
        if not faults:
            return
        resolved: set[int] = set()
        wakes: list[int] = []
        dispatch = self._dispatch
        try:
            for index, fault in enumerate(faults):
                try:
                    dispatch(fault, resolved, wakes)
                except BaseException:
                    self._queued.extend(faults[index + 1 :])  # read, never handled
                    raise
        finally:
            if wakes:
                self._wake_pages(wakes)
            self.count_pages()

    def _apply(self, event: Fork | Remap | Remove | Unmap) -> None:
        stats = self.stats
        if isinstance(event, Fork):
            stats.forks += 1
            child = self.resolver.fork() if isinstance(self.resolver, Resolver) else self.resolver
            assert self._children is not None
            self._children.start_soon(self._serve_child, event.uffd, child, list(self.applied))
            return
        stats.events += 1
        self.applied.append(event)
        if self.inline is not None:
            self.inline.apply(event)
        if isinstance(event, (Remap, Unmap)):
            start = event.from_address if isinstance(event, Remap) else event.start
            end = start + event.length if isinstance(event, Remap) else event.end
            self._release_moved(start, end)

    def _release_moved(self, start: int, end: int) -> None:
        """Faults waiting at addresses that moved or vanished: wake them to retry."""
        for pending in (self._queued, self._deferred):
            stale = [f for f in pending if start <= f.address < end]
            for fault in stale:
                pending.remove(fault)
                self._wake(fault.address & self.page_mask, self.page_size)

    # -- dispatch ----------------------------------------------------------

    def _dispatch(self, fault: PageFault, resolved: set[int], wakes: list[int]) -> None:
        stats = self.stats
        page = fault.address & self.page_mask
        if page in resolved or page in self._in_flight:
            stats.coalesced += 1
            return
        inline = self.inline
        if inline is not None:
            started = time.perf_counter_ns()
            try:
                done = inline.resolve_now(fault, self.uffd)
            except PageExists:
                stats.eexist += 1
                resolved.add(page)
                wakes.append(page)
                return
            except MappingChanged:
                self._defer(fault)
                return
            except ProcessExited:
                self.process_exited()
                return
            except UffdClosed:
                return  # closing the uffd woke every waiting thread: nothing to answer
            except Exception as exc:
                self._failed_inline(fault, exc)
                resolved.add(page)
                return
            if done:
                stats._record(time.perf_counter_ns() - started)
                stats.resolved += 1
                resolved.add(page)
                if not inline.woke(fault):
                    wakes.append(page)
                return
        if len(self._in_flight) >= self.options.limit:
            self._queued.append(fault)
        else:
            self._start(fault)

    def _start(self, fault: PageFault) -> None:
        """Hand ``fault`` to a worker task (see ``_pool``)."""
        self._in_flight[fault.address & self.page_mask] = fault
        self.stats.in_flight = len(self._in_flight)
        self.reader._spin_ns = 0  # the resolutions need the event loop, not a busy reader
        assert self._tg is not None
        self._pool.submit(self._tg, fault)

    async def _resolve_async(self, fault: PageFault) -> None:
        started = time.perf_counter_ns()
        try:
            await self._awaited(fault, self.uffd)
        except BaseException as exc:
            await self._unresolved(fault, exc)
            return
        stats = self.stats
        stats._record(time.perf_counter_ns() - started)
        stats.resolved += 1
        page = fault.address & self.page_mask
        if self._woke is not None and not self._woke(fault):
            self._wake(page, self.page_size)
        self._finish(page)

    async def _unresolved(self, fault: PageFault, exc: BaseException) -> None:
        """A resolution raised ``exc``: what each kernel answer or resolver error means."""
        page = fault.address & self.page_mask
        if isinstance(exc, MappingChanged):  # an event is unread: retry once it is applied
            self._finish(page)
            self._defer(fault)
        elif isinstance(exc, (PageExists, ProcessExited, UffdClosed)):
            if isinstance(exc, PageExists):
                self.stats.eexist += 1
                self._wake(page, self.page_size)
            elif isinstance(exc, ProcessExited):
                self.process_exited()
            # (UffdClosed: closing the uffd woke every waiting thread.)
            self._finish(page)
        elif isinstance(exc, Exception):  # the resolver failed
            await self._dispose_failed(fault)  # if this raises, the fault stays in flight
            self._finish(page)
            self._report(fault, exc)
        else:  # cancelled: _hand_back returns the fault to the uffd
            self.count_pages()
            raise exc

    def _finish(self, page: int) -> None:
        """``page``'s resolution is over: make room for the faults queued behind it."""
        self.count_pages()
        in_flight = self._in_flight
        del in_flight[page]
        self.stats.in_flight = len(in_flight)
        if not in_flight:
            self.reader._spin_ns = self._spin_ns
        if self._queued:
            self._start_queued()

    def _poll(self) -> None:
        """After a resolution: faults already pending start now, not after every other
        resolution ready in this loop iteration has run (they would start in step).
        At most one read per ``_POLL_NS``: a fault waits that long at most, and
        reads bring in several faults each."""
        now = time.perf_counter_ns()
        if now - self._polled >= _POLL_NS and self._tg is not None and not self._exited:
            self._polled = now
            events = self.reader.poll()
            if events:
                self._handle(events)

    def _start_queued(self) -> None:
        while self._queued and len(self._in_flight) < self.options.limit and self._tg is not None:
            fault = self._queued.popleft()
            if fault.address & self.page_mask in self._in_flight:
                self.stats.coalesced += 1
                continue
            self._start(fault)

    # -- EAGAIN: drain, apply, retry ----------------------------------------

    def _defer(self, fault: PageFault) -> None:
        self._deferred.append(fault)
        self._start_retrying()

    def _start_retrying(self) -> None:
        if not self._retrying and self._tg is not None:
            self._retrying = True
            self._tg.start_soon(self._retry_deferred)

    async def _retry_deferred(self) -> None:
        try:
            attempt = 0
            while self._deferred or self._undisposed:
                await anyio.sleep(_RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)])
                attempt += 1
                try:  # the events behind the EAGAIN
                    pending = self.uffd.read_events(self.options.batch)
                except UffdClosed:
                    return
                faults, self._deferred = self._deferred, []
                self._handle(pending, retried=faults)
                failed, self._undisposed = self._undisposed, []
                for fault in failed:
                    self._apply_page_action_now(fault)  # re-queues itself on EAGAIN
                unreported, self._unreported = self._unreported, []
                for fault, exc in unreported:
                    self._report(fault, exc)
        finally:
            self._retrying = False

    def hand_over(self) -> None:
        """Stop for a successor in another process: read nothing more, wake every fault read
        and not answered (it faults again, for the successor to read), and keep the fork
        children's uffds open (in :attr:`handed_children`) instead of closing them."""
        self._handing_over = True
        for child in self._child_servers:
            child.hand_over()
        self.process_exited()

    def children_now(self) -> list[tuple[Userfaultfd, list[Remap | Remove | Unmap]]]:
        """Each fork child's uffd served now (and its children's), with the events applied."""
        served: list[tuple[Userfaultfd, list[Remap | Remove | Unmap]]] = []
        for child in self._child_servers:
            served.append((child.uffd, child.applied))
            served.extend(child.children_now())
        return served

    def adopt_children(
        self, children: list[tuple[Userfaultfd, AnyResolver, list[Remap | Remove | Unmap]]]
    ) -> None:
        """Serve fork children a predecessor served (each until it exits), as if forked here."""
        assert self._children is not None
        for uffd, resolver, applied in children:
            self._children.start_soon(self._serve_child, uffd, resolver, applied)

    def process_exited(self) -> None:
        """The process whose memory this uffd serves is gone: nothing will fault again.

        Stops serving this uffd; its fork children, if any, are served until they end.
        """
        self._exited = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # -- errors ------------------------------------------------------------

    def _page_action(self, fault: PageFault) -> Literal["poison", "zero", "leave"] | Resolver:
        action = self.on_error.page
        if action == "poison" and not self.uffd.available_features & Feature.POISON:
            return "leave"
        return action

    def _apply_page_action_now(self, fault: PageFault) -> bool:
        """Dispose of a failed fault's page synchronously; False if it needs awaiting."""
        page = fault.address & self.page_mask
        action = self._page_action(fault)
        try:
            if action == "poison":
                self.uffd.poison(page, self.page_size)
            elif action == "zero":
                zero_page(self.uffd, page, self.page_size)
            elif action == "leave":
                self._left.append(fault)  # the thread stays blocked while this server runs
            elif not action.resolve_now(fault, self.uffd):
                return False
        except PageExists:
            self._wake(page, self.page_size)
        except UffdClosed:
            pass  # closed under us: the thread was woken by the close
        except MappingChanged:
            # An event is unread: dispose of the page once it has been read.
            self._undisposed.append(fault)
            self._start_retrying()
        return True

    def _failed_inline(self, fault: PageFault, exc: Exception) -> None:
        self.stats.errors += 1
        if self._apply_page_action_now(fault):
            self._report(fault, exc)
            return
        # A fallback resolver that must await: it runs as a task, like any resolution.
        page = fault.address & self.page_mask
        self._in_flight[page] = fault
        assert self._tg is not None
        self._tg.start_soon(self._fallback_task, fault, page, exc)

    async def _fallback_task(self, fault: PageFault, page: int, exc: Exception) -> None:
        disposed = False
        try:
            await self._dispose_failed(fault, counted=True)
            disposed = True
        finally:
            if disposed:
                del self._in_flight[page]
                self._start_queued()
        self._report(fault, exc)

    async def _dispose_failed(self, fault: PageFault, *, counted: bool = False) -> None:
        """Give a failed fault's page what ``on_error`` says, awaiting a fallback if need be."""
        if not counted:
            self.stats.errors += 1
            if self._apply_page_action_now(fault):
                return
        action = self._page_action(fault)
        assert isinstance(action, Resolver)
        try:
            await action.resolve(fault, self.uffd)
        except PageExists:
            self._wake(fault.address & self.page_mask, self.page_size)

    def _report(self, fault: PageFault, exc: Exception) -> None:
        if any(f is fault for f in self._undisposed):
            # Its page is not disposed of yet (an event was unread): report
            # once it is, or the thread could be left blocked behind the error.
            self._unreported.append((fault, exc))
            return
        if self.on_error.propagate:
            raise exc
        # One line that says what the faulting thread sees; the traceback is for DEBUG.
        logger.error(
            "resolver failed for %s: %s: %s; %s",
            fault, type(exc).__name__, exc, _what_it_sees(self.on_error),
        )  # fmt: skip
        logger.debug("resolver failed for %s", fault, exc_info=exc)

    # -- wakes -------------------------------------------------------------

    def _wake(self, start: int, length: int) -> None:
        try:
            self.uffd.wake(start, length)
        except UffdClosed:
            pass

    def _wake_pages(self, pages: list[int]) -> None:
        """Wake each contiguous run of pages with one UFFDIO_WAKE."""
        pages.sort()
        size = self.page_size
        start = end = pages[0]
        for page in pages[1:]:
            if page == end + size:
                end = page
            elif page != end:
                self._wake(start, end - start + size)
                start = end = page
        self._wake(start, end - start + size)

    # -- fork children --------------------------------------------------------

    async def _serve_child(
        self, uffd: Userfaultfd, resolver: AnyResolver, applied: list[Remap | Remove | Unmap]
    ) -> None:
        """Serve a fork child's uffd with this server's options until the child exits
        (no pid comes with it: its memory tells, see ``_peer_lifetime``), or until
        this server stops. It is nobody else's: closing it unregisters the child's
        memory, whose missing pages would then read as zeros."""
        if self._handing_over:  # forked as this server stopped: the successor serves it
            self.handed_children.append((uffd, resolver, applied))
            return
        child = _Server(uffd, resolver, self.options)
        child.applied, child.on_applied = applied, self.on_applied
        self.stats.children.append(child.stats)
        self._child_servers.append(child)
        if self.on_applied is not None:
            self.on_applied()

        async def until_it_exits() -> None:
            await memory_gone(uffd)
            child.process_exited()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(until_it_exits)
                await child.run(anyio.TASK_STATUS_IGNORED)
                tg.cancel_scope.cancel()
        finally:
            self._child_servers.remove(child)
            if child._handing_over:
                self.handed_children.append((uffd, resolver, child.applied))
                self.handed_children.extend(child.handed_children)
            else:
                uffd.close()


def _what_it_sees(on_error: OnError) -> str:
    """What a failed fault's thread gets, in words, for the log."""
    page = on_error.page
    if page == "poison":
        return "its page is poisoned: the access gets SIGBUS"
    if page == "zero":
        return "it reads a zero page"
    if page == "leave":
        return "it stays blocked"
    return "the fallback resolver served it"


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error of an internal task group, or the group itself."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    real = [exc for exc in leaves if not isinstance(exc, anyio.get_cancelled_exc_class())]
    if len(real) == 1:
        return real[0]
    return group


async def serve(
    uffd: Userfaultfd,
    resolver: AnyResolver,
    *,
    options: ServeOptions | None = None,
    limit: int | None = None,
    batch: int | None = None,
    on_error: OnError | None = None,
    page_size: int | None = None,
    spin: float | None = None,
    task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Resolve ``uffd``'s faults with ``resolver`` until cancelled or the uffd is closed.

    At most ``limit`` (default 64) resolutions that await run at once; further
    faults wait in order, none is dropped. ``spin`` (seconds, default 50 us)
    busy-polls the uffd that long before sleeping in the event loop, while no
    resolution is awaiting something (see :class:`EventReader`); 0 turns it off.
    :class:`~uffd_async.resolvers.Resolver` objects that can answer without
    awaiting do so inline, without a task. A resolver
    error propagates out of ``serve`` unless ``on_error`` says otherwise.
    ``options``: all of these as one :class:`ServeOptions` (then leave the
    keywords out: one that disagrees with it is refused).
    ``task_status.started()`` receives an object whose ``stats`` is a
    :class:`ServerStats`.
    """
    options = from_keywords(
        ServeOptions, "options", options,
        limit=limit, batch=batch, on_error=on_error, page_size=page_size, spin=spin,
    )  # fmt: skip
    await _Server(uffd, resolver, options).run(task_status)


class FaultServer:
    """``serve()`` in the background of an ``async with`` block.

    Takes ``serve()``'s options, as keywords or as one :class:`ServeOptions`.
    Leaving the block stops the server (faults it read but did not resolve go
    back to the uffd); a resolver error cancels the block and is raised from it.
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        resolver: AnyResolver,
        *,
        options: ServeOptions | None = None,
        limit: int | None = None,
        batch: int | None = None,
        on_error: OnError | None = None,
        page_size: int | None = None,
        spin: float | None = None,
    ) -> None:
        options = from_keywords(
            ServeOptions, "options", options,
            limit=limit, batch=batch, on_error=on_error, page_size=page_size, spin=spin,
        )  # fmt: skip
        self._server = _Server(uffd, resolver, options)
        self._tg: TaskGroup | None = None

    @property
    def stats(self) -> ServerStats:
        return self._server.stats

    @property
    def uffd(self) -> Userfaultfd:
        return self._server.uffd

    async def __aenter__(self) -> FaultServer:
        if self._tg is not None:
            raise RuntimeError("this FaultServer is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self._server.run)
        except BaseException:
            await tg.__aexit__(*sys.exc_info())
            raise
        self._tg = tg
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        try:
            return await tg.__aexit__(*exc_info)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None


__all__ = [
    "DEFAULT_SPIN",
    "FaultServer",
    "OnError",
    "ServeOptions",
    "ServerStats",
    "UffdError",
    "serve",
]
