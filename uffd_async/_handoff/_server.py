"""Serving the page faults of every process that hands its uffd over a Unix socket.

Kernel and protocol facts this module relies on (see :mod:`._transfer` for
the handshake, :mod:`uffd_async._serve._peer_lifetime` for watching the peer,
:mod:`._listener` for the socket file):

* A peer connects, sends its uffd and mappings in one message, and then may
  close the connection at once (Firecracker 1.1 to 1.11) or keep it until it
  exits (1.12 and later): the hangup is no end-of-serving signal, and a uffd
  never reports end-of-file either. A handoff is served until its process
  exits (a pidfd), and then until every process holding its end of the
  socket closed it (fork children share it). Without a pidfd the hangup
  has to do, when the message says the peer keeps its connection; else its
  memory tells (a probe ioctl says ESRCH once it is gone, see
  :func:`~._peer_lifetime.memory_gone`).
* Fork children (``EVENT_FORK``) may outlive the peer: once it is gone its
  own uffd is no longer read, and the handoff ends when the last child has
  exited too (each one's memory tells).
* The peer keeps its own copy of the uffd. Closing ours then wakes nobody
  and changes nothing for it: a fault of its that was never resolved stays
  blocked until it exits. A uffd the kernel hands *us* for a fork child
  (``EVENT_FORK``) is held by nobody else, though: closing it unregisters
  the child's memory, whose missing pages then read as zeros. So a
  connection's fds are closed only once its peer has gone as said above (or
  serving ended because its memory is gone: ESRCH), or when the whole server
  stops. (The fault server closes a fork child's uffd itself once the child
  exited, or when serving stops.)
* On hugetlbfs, ``UFFDIO_POISON`` (what a failed resolution gets) must cover
  a whole huge page: each connection is served with its mappings' page size
  when they all agree.
* Whatever a peer sends after the handshake is read and dropped (with any
  fds it carries, which ``recv()`` never installs), so that it cannot keep
  the socket readable forever. Firecracker sends nothing more.
* Draining (SIGTERM, :meth:`HandoffServer.drain`) closes the listening
  socket, so a new peer's ``connect()`` fails at once (ENOENT once the file
  is gone, ECONNREFUSED before), and those being served are served until
  they exit. Stopping instead (cancellation) closes our copies of their
  uffds: each peer keeps its own, so a fault it has pending stays blocked
  until it exits (a frozen guest), while a fork child's uffd, held by us
  alone, is unregistered and its missing pages then read as zeros.
* ``max_peers`` is checked when a connection is accepted, before anything
  is read: one more is closed unread. A peer that has already sent its uffd
  (Firecracker sends at once) learns nothing from that: Firecracker's load
  fails with EPIPE only when the close comes before its ``sendmsg``;
  otherwise it goes on and its first fault blocks for good.
* Peers are untrusted: the uid check, the bounds on the message and on the
  time to send it, and the checks on the mappings are :func:`receive_uffd`'s.
  A refused or failing peer ends its own connection, never the server.

Serving past this process lives beside it: a takeover in :mod:`._successor`,
systemd's fd store in :mod:`._fdstore`. Both see the server as
:class:`~._served.Served` (``_Seam`` here): its handoffs, a pause in accepting,
its counters and recording, a resolver for a handoff carried over.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import anyio
import attrs
from anyio.abc import TaskStatus

from .._core._abi import PAGE_SIZE, Feature
from .._core._errors import (
    HandoffError,
    InvalidArgument,
    SourceChanged,
)
from .._remote._chunked_source import ChunkedSource, FetchStats
from .._remote._open_source import SourceSpec, check_source, open_source
from .._restore._prefetch import PrefetchStats
from .._restore._replay import Replay
from .._restore._snapshot_resolver import SnapshotResolver
from .._restore._source import SnapshotSource
from .._restore._working_set import WorkingSet
from .._serve._options import ServeOptions, from_keywords
from .._serve._peer_lifetime import PROBE_INTERVAL, PeerExit, Watch, memory_gone
from .._serve._resolvers import AnyResolver
from .._serve._server import DEFAULT_SPIN, OnError, ServerStats, serve
from .._serve._stats import LatencyHistogram
from ._fdstore import FdStoreKeeper, resume_stored
from ._handover import Handover, LiveHandoff
from ._listener import Listener, check_socket_access
from ._options import PeerPolicy, ReplayOptions, check_record_path
from ._served import Progress
from ._succession import Succession
from ._successor import control_socket, offer_takeovers, take_over_from
from ._takeover import ControlSocket
from ._transfer import (
    Handoff,
    allowed_uid_set,
    peer_credentials,
    receive_uffd,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "HandoffServer",
    "HandoffStats",
    "ResolverFactory",
    "check_record_path",
    "serve_handoffs",
]

logger = logging.getLogger("uffd_async")

#: Makes the resolver for one handoff; raising :class:`HandoffError` refuses the handoff.
ResolverFactory = Callable[[Handoff], AnyResolver]

_DRAIN = 4096
#: Seconds between the lines that say who is still being served while draining.
DRAIN_REPORT_INTERVAL = 5.0


@attrs.define(kw_only=True)
class HandoffStats:
    """Counters of a :class:`HandoffServer`, over every connection so far."""

    #: Connections accepted on the socket.
    connections: int = 0
    #: Handoffs received and served; ``active`` of them are being served now.
    served: int = 0
    active: int = 0
    #: Handoffs refused: a uid not allowed, a bad message, no or wrong fds, silence,
    #: or ``over_limit``: ``policy.max_peers`` peers were being served already.
    refused: int = 0
    over_limit: int = 0
    #: Connections whose serving failed after the handoff (each one logged).
    failed: int = 0
    #: Summed over every handed-over uffd and every fork child's (see :class:`ServerStats`):
    #: faults read, faults resolved, and base pages mapped in (readahead included).
    faults: int = 0
    resolved: int = 0
    pages: int = 0
    errors: int = 0
    events: int = 0
    forks: int = 0
    #: Base pages copied in ahead of the faults (a working set, or everything); ``pages``
    #: counts them too, so the demand faults' pages are ``pages - prefetched``.
    prefetched: int = 0
    #: Demand faults a native working-set replay answered itself, beside its copies (not in
    #: ``faults``: the server never read them; their pages are in ``prefetched``).
    faults_answered: int = 0
    #: Handoffs whose every page was gone through (``populate``), so far.
    resident: int = 0
    #: ``populated_pages / mapped_pages`` (0.0 with no handoff active).
    populated: float = 0.0
    #: Now, over the active handoffs served from a snapshot: the base pages their mappings
    #: hold, and those of them populated (prefetched or faulted in, and not removed since).
    populated_pages: int = 0
    mapped_pages: int = 0

    #: Whether the server has stopped accepting and serves its peers until they exit.
    draining: bool = False

    def as_dict(self) -> dict[str, float]:
        return attrs.asdict(self)


_SUMMED = ("faults", "resolved", "pages", "errors", "events", "forks")
_CARRIED_TOTALS = frozenset(
    name for name, field in attrs.fields_dict(HandoffStats).items() if field.type in ("int", int)
)


class HandoffServer:
    """Accepts uffd handoffs on the Unix socket ``path`` and serves each one.

    ``source`` says what to serve: a snapshot file's path or a
    :class:`Snapshot` (a :class:`~uffd_async.LayeredSnapshot` too: a base image
    and its layers), an ``http(s)://`` URL of one or an
    :class:`~uffd_async.HttpSource` (each handoff's mappings are served from
    it, and must lie inside it; every handoff shares its chunks), or a
    factory ``(handoff) -> resolver``. Each connection
    gets its own :func:`~uffd_async.serve` under the server's task group,
    until its process exits (see the module's notes). See :meth:`serve` for
    what ends the server, :meth:`drain` for ending it without stopping anyone.

    ``listening_socket``: a listening Unix stream socket to accept on instead
    of binding ``path`` (socket activation: systemd made it and owns its
    file, which is never removed here; the server closes this copy when it
    ends). ``path`` then only names it in the logs.

    ``takeover``: take over from the server running on ``path`` (same uid)
    instead of binding it: its listening socket, every process it serves (fork
    children too) and its counters and recording come over, and it returns
    from :meth:`serve` (:attr:`handed_over`). Every server offers that to a
    successor, on a control socket of its own (see :mod:`._takeover`).
    A :class:`~uffd_async.HandoffError` (``TakeoverError``) if it cannot be
    done; the running server then serves on.

    ``fd_store``: keep every fd a successor needs in systemd's fd store (see
    :mod:`._fdstore`; the command line turns it on when ``$FDSTORE`` is set), so
    that a crash or a restart closes no uffd. ``stored_fds``: the ``(fd, name)``
    pairs a restarted service got back from it (``$LISTEN_FDS``, less the
    listening socket): what they served is served again, from here.

    The options come as three objects (see each one): ``policy``, a
    :class:`~uffd_async.PeerPolicy` (who may connect, bounds on the
    handshake); ``replay``, a :class:`~uffd_async.ReplayOptions` (readahead,
    record, prefetch, populate: snapshot sources only); ``serving``, a
    :class:`~uffd_async.ServeOptions` for each connection's ``serve()`` (its
    ``page_size`` is left ``None``: each handoff is served in its mappings'
    page size, so that a failed huge page is poisoned whole). Their fields may
    also be given as keywords (``allowed_uids``, ``socket_mode``,
    ``socket_group``, ``timeout``, ``max_message``, ``max_regions``;
    ``readahead``, ``record``, ``prefetch``, ``populate``; ``limit``,
    ``on_error``), not both ways at once unless they agree. ``on_error``
    left ``None``: a failed resolution poisons the page (the access raises
    SIGBUS in the peer, which never reads wrong bytes) and serving goes on;
    on a kernel without UFFDIO_POISON the fault is left blocked and that
    connection's serving stops, logged.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        source: SourceSpec | ResolverFactory,
        *,
        policy: PeerPolicy | None = None,
        replay: ReplayOptions | None = None,
        serving: ServeOptions | None = None,
        allowed_uids: Collection[int] | None = None,
        socket_mode: int | None = None,
        socket_group: int | str | None = None,
        timeout: float | None = None,
        max_message: int | None = None,
        max_regions: int | None = None,
        max_peers: int | None = None,
        readahead: int | None = None,
        limit: int | None = None,
        on_error: OnError | None = None,
        record: str | os.PathLike[str] | None = None,
        prefetch: str | os.PathLike[str] | WorkingSet | None = None,
        populate: bool | None = None,
        listening_socket: socket.socket | None = None,
        takeover: bool = False,
        fd_store: bool = False,
        stored_fds: Sequence[tuple[int, str]] = (),
    ) -> None:
        self.path = os.fspath(path)
        if not self.path:
            raise InvalidArgument(errno.EINVAL, "the socket path is empty")
        self._policy = from_keywords(
            PeerPolicy, "policy", policy,
            allowed_uids=allowed_uids, socket_mode=socket_mode, socket_group=socket_group,
            timeout=timeout, max_message=max_message, max_regions=max_regions,
            max_peers=max_peers,
        )  # fmt: skip
        self._replay_options = from_keywords(
            ReplayOptions, "replay", replay,
            readahead=readahead, record=record, prefetch=prefetch, populate=populate,
        )  # fmt: skip
        self._serving = from_keywords(
            ServeOptions, "serving", serving, limit=limit, on_error=on_error
        )
        if self._serving.page_size is not None:
            raise InvalidArgument(
                errno.EINVAL,
                "serving.page_size does not apply to a handoff server: each handoff is served "
                "in its mappings' page size; leave it None",
            )
        policy, replay = self._policy, self._replay_options
        self._socket_gid = check_socket_access(self.path, policy.socket_mode, policy.socket_group)
        if listening_socket is not None and (policy.socket_mode, self._socket_gid) != (None, None):
            raise InvalidArgument(
                errno.EINVAL,
                "a socket passed in has its file's mode and group set by whoever made it "
                "(SocketMode=, SocketGroup= in a .socket unit): drop socket_mode/socket_group",
            )
        self._listening_socket = listening_socket
        if takeover and listening_socket is not None:
            raise InvalidArgument(
                errno.EINVAL, "takeover gets the listening socket from the running server: "
                "pass no listening_socket",
            )  # fmt: skip
        self._takeover = takeover
        self._seam = _Seam(self)  # what the takeover and the fd store see of it
        self._fd_store = (
            FdStoreKeeper(self._seam, (name for _, name in stored_fds)) if fd_store else None
        )
        self._stored_fds = list(stored_fds)
        self._serials = itertools.count(1)
        if isinstance(source, SnapshotSource) or callable(source):
            self._source: str | SnapshotSource | ResolverFactory = source
        else:
            self._source = os.fspath(source)
        if not callable(self._source):
            check_source(self._source, readahead=replay.readahead)  # before any peer connects
        if callable(source) and replay.readahead:
            raise InvalidArgument(
                errno.EINVAL, "readahead applies to snapshot sources; a factory sets its own"
            )
        if replay.record is not None:
            check_record_path(replay.record)
        self._replay = Replay(
            record=replay.record, prefetch=replay.prefetch, populate=replay.populate
        )
        if self._replay.active and callable(source):
            raise InvalidArgument(
                errno.EINVAL, "record, prefetch and populate apply to snapshot sources"
            )
        self._allowed = allowed_uid_set(policy.allowed_uids)
        self._totals = HandoffStats()
        self._live: dict[int, Any] = {}  # id(its stats) -> the server of a live handoff
        self._resolvers: dict[int, SnapshotResolver] = {}  # id(handoff) -> its resolver
        self._prefetching: dict[int, tuple[PrefetchStats, SnapshotResolver]] = {}
        self._running = False
        self._opened: SnapshotSource | None = None
        self._latency = LatencyHistogram()  # of the handoffs that ended
        self._peers: dict[int, tuple[int, float]] = {}  # id(conn) -> pid, since (monotonic)
        self._draining = False
        self._accepting: anyio.CancelScope | None = None
        self._no_peers: anyio.Event | None = None
        # Takeover (_successor, through _Seam; rounds in _handover): the handoffs being
        # served, the connections not yet handed over (id(conn)), the handover under way,
        # and whether it is done.
        self._handing: dict[int, LiveHandoff] = {}
        self._handshaking: set[int] = set()
        self._handover: Handover | None = None
        self._accept_wait: anyio.CancelScope | None = None
        self._handed_over = False

    def drain(self) -> None:
        """Stop accepting (the socket is closed at once, its file removed unless it was
        passed in) and serve every peer connected until it exits; :meth:`serve` then
        returns. Call it from the event loop's thread, while :meth:`serve` runs; calling
        it again does nothing. To stop at once after all, cancel :meth:`serve`."""
        if not self._running:
            raise RuntimeError("drain() a HandoffServer while it serves")
        if self._draining:
            return
        self._draining = self._totals.draining = True
        if self._accepting is not None:
            self._accepting.cancel()

    @property
    def handed_over(self) -> bool:
        """Whether a successor took everything over (:meth:`serve` then returned)."""
        return self._handed_over

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called: no new peer is accepted."""
        return self._draining

    @property
    def peers(self) -> list[tuple[int, float]]:
        """Each connected peer's pid and for how many seconds it has been connected."""
        now = time.monotonic()
        return [(pid, now - since) for pid, since in self._peers.values()]

    def latency_histogram(self) -> tuple[tuple[float, ...], list[int], float]:
        """Every resolution's latency so far, over all handoffs: (each finite bucket's
        upper bound in seconds, the count in each bucket, +Inf last, the sum in seconds)."""
        total = LatencyHistogram()
        total.merge(self._latency)
        for live in self._live.values():
            total.merge(live.stats.latency_histogram())
        return LatencyHistogram.bounds(), list(total.counts), total.total_ns / 1e9

    @property
    def http_stats(self) -> FetchStats | None:
        """The remote source's counters (requests, bytes, retries, cache hits), if it has one."""
        source = self._opened if self._opened is not None else self._source
        return source.stats if isinstance(source, ChunkedSource) else None

    @property
    def allowed_uids(self) -> frozenset[int]:
        """This process's effective uid and ``policy.allowed_uids``: who may connect."""
        return self._allowed

    @property
    def policy(self) -> PeerPolicy:
        return self._policy

    @property
    def replay(self) -> ReplayOptions:
        return self._replay_options

    @property
    def serving(self) -> ServeOptions:
        """The serving options as given; each connection's ``serve()`` gets them with what
        ``None`` left open chosen for its handoff (its page size, its kernel's ``on_error``)."""
        return self._serving

    @property
    def stats(self) -> HandoffStats:
        """A snapshot of the counters, live connections included."""
        with contextlib.ExitStack() as paused:  # native replays held: the counts agree
            for live in self._live.values():
                paused.enter_context(live.uffd.borrower_paused())
            return self._stats_now()

    def _stats_now(self) -> HandoffStats:
        stats = attrs.evolve(self._totals)
        for live in self._live.values():
            live.count_pages()  # the prefetcher copies through its uffd too: count those now
            _add(stats, live.stats)
        for prefetching, _ in self._prefetching.values():
            stats.prefetched += prefetching.prefetched
            stats.faults_answered += prefetching.faults_answered
        for resolver in self._resolvers.values():
            populated, mapped = resolver.populated_bytes()
            stats.populated_pages += populated // PAGE_SIZE
            stats.mapped_pages += mapped // PAGE_SIZE
        if stats.mapped_pages:
            stats.populated = stats.populated_pages / stats.mapped_pages
        return stats

    async def serve(
        self, *, task_status: TaskStatus[HandoffServer] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``path`` and serve every handoff until cancelled.

        ``task_status.started()`` gets this server once the socket accepts
        connections. Errors of one connection (its handshake, its resolver
        factory, its resolutions, its socket) are logged to the
        ``uffd_async`` logger and end that connection only. What ends the
        server: cancellation; a socket path that cannot be bound (another
        server listens there, or it is not a socket: ``FileExistsError``; its
        directory is missing: ``FileNotFoundError``);
        a snapshot that cannot be opened; errors accepting connections other
        than running out of fds or memory (after which it waits and retries);
        and ``BaseException``\\ s such as ``KeyboardInterrupt``. On the way
        out every connection's fds are closed and the socket file removed.

        An :class:`~uffd_async.HttpSource` whose object changed
        (:class:`~uffd_async.SourceChanged`) fetches nothing more, so the
        server stops accepting at once (the socket file is removed: a new
        process fails to connect rather than hang), serves the processes it
        has until they exit (a fault that needs a fetch gets what ``on_error``
        says: SIGBUS by default, never bytes of another version), then raises
        that ``SourceChanged``. Restart it with a source for the new version.
        """
        if self._running:
            raise RuntimeError("this HandoffServer is already serving")
        self._running = True
        self._draining = self._totals.draining = False
        try:
            if isinstance(self._source, SnapshotSource):  # the caller's: they close it
                await self._listen(await self._source.open(), task_status)
            elif isinstance(self._source, str):  # named: opened (and closed) here
                async with open_source(self._source) as opened:
                    await self._listen(opened, task_status)
            else:  # a factory makes each handoff's resolver
                await self._listen(None, task_status)
        finally:
            self._running = False
            self._opened = None

    async def _listen(self, snapshot: SnapshotSource | None, task_status: TaskStatus[Any]) -> None:
        self._opened = snapshot
        if snapshot is not None and self._replay.active:
            self._replay.open(snapshot.size, await snapshot.version())
        changed: list[SourceChanged] = []
        adopted: list[LiveHandoff] = []
        control: ControlSocket | None = None
        try:
            # Bound before the task group: a path that cannot be bound raises as itself.
            if self._takeover:
                listener, control, adopted = await take_over_from(self._seam)
            elif self._listening_socket is not None:
                listener = Listener.adopt(self._listening_socket)
            else:
                listener = Listener(self.path, mode=self._policy.socket_mode, gid=self._socket_gid)
            if not self._takeover:
                control = control_socket(self.path)
            if self._stored_fds:  # a restart under systemd: what its fd store kept
                stored, self._stored_fds = self._stored_fds, []
                adopted += resume_stored(self._seam, stored)
            async with anyio.create_task_group() as tg:
                with listener, contextlib.ExitStack() as closing:
                    for live in adopted:
                        tg.start_soon(self._adopted, live)
                    if self._fd_store is not None:
                        tg.start_soon(self._fd_store.keep)
                    if control is not None:
                        closing.enter_context(control)
                        tg.start_soon(
                            offer_takeovers, self._seam, control, listener, tg.cancel_scope
                        )
                    with anyio.CancelScope() as accepting:
                        self._accepting = accepting
                        if self._draining:  # drain() came before the socket
                            self._accepting.cancel()
                        if snapshot is not None:
                            tg.start_soon(_stop_on_change, snapshot, accepting, changed)
                            tg.start_soon(_prepared, snapshot)  # while the first one comes
                        task_status.started(self)
                        while True:
                            if self._handover is not None:  # stopped for a successor
                                await self._handover.over.wait()
                                if self._handed_over:
                                    await anyio.sleep_forever()
                                continue
                            conn = None  # stays None if a handover cancels the wait
                            with anyio.CancelScope() as self._accept_wait:
                                conn = await listener.accept()
                            if conn is not None:
                                self._handshaking.add(id(conn))
                                tg.start_soon(self._handshake, conn, snapshot)
                if changed:  # the socket is gone: a new process cannot connect, let alone hang
                    logger.error(
                        "%s; no new process is accepted, the %d being served are served "
                        "until they exit", changed[0], self._totals.active,
                    )  # fmt: skip
                elif self._draining:
                    await self._drained()
                    tg.cancel_scope.cancel()  # nothing left but the watch on the source
        finally:
            self._accepting = None
            self._replay.save()
        if changed:
            raise changed[0]

    async def _drained(self) -> None:
        """Return once every peer connected has gone; say who is left every few seconds."""
        self._no_peers = anyio.Event()
        logger.info(
            "draining: no new process is accepted (%s closed); %d served until they exit",
            self.path, len(self._peers),
        )  # fmt: skip
        while self._peers:
            with anyio.move_on_after(DRAIN_REPORT_INTERVAL):
                await self._no_peers.wait()
            if self._peers:
                left = ", ".join(f"pid {pid} for {age:.0f} s" for pid, age in self.peers)
                logger.info("draining: still serving %d: %s", len(self._peers), left)
        logger.info("drained: every process served has exited")

    @contextlib.contextmanager
    def _slot(self, conn: socket.socket, *, always: bool = False) -> Iterator[bool]:
        """Whether this peer is admitted (``policy.max_peers``, unless ``always``: one
        already served, taken over); it counts while inside (the drain waits for it)."""
        pid, uid, _ = peer_credentials(conn)
        limit = self._policy.max_peers
        if limit is not None and len(self._peers) >= limit and not always:
            self._totals.refused += 1
            self._totals.over_limit += 1
            logger.warning(
                "refused pid %d (uid %d): %d processes are being served, the limit "
                "(max_peers %d); its connection is closed unread",
                pid, uid, len(self._peers), limit,
            )  # fmt: skip
            yield False
            return
        key = id(conn)
        self._peers[key] = (pid, time.monotonic())
        try:
            yield True
        finally:
            del self._peers[key]
            if not self._peers and self._no_peers is not None:
                self._no_peers.set()

    # -- one connection -------------------------------------------------------

    async def _handshake(self, conn: socket.socket, snapshot: SnapshotSource | None) -> None:
        try:
            await self._connection(conn, snapshot)
        finally:
            self._handshaking.discard(id(conn))

    async def _connection(self, conn: socket.socket, snapshot: SnapshotSource | None) -> None:
        totals = self._totals
        totals.connections += 1
        with conn:
            try:
                # Watch the peer before anything else: see _peer_lifetime on pid reuse.
                peer = PeerExit(conn, peer_credentials(conn)[0])
            except OSError as exc:
                totals.failed += 1
                logger.error("cannot learn who connected: %s", exc)
                return
            with peer, self._slot(conn) as admitted:
                if not admitted:
                    return
                try:
                    handoff = await receive_uffd(
                        conn,
                        allowed_uids=self._allowed,
                        max_message=self._policy.max_message,
                        timeout=self._policy.timeout,
                        backing_size=snapshot.size if snapshot is not None else None,
                        max_regions=self._policy.max_regions,
                    )
                except HandoffError as exc:
                    totals.refused += 1
                    logger.warning("refused a handoff: %s", exc)
                    return
                except Exception as exc:
                    totals.failed += 1
                    logger.error("receiving a handoff failed", exc_info=exc)
                    return
                with handoff:
                    try:
                        resolver = self._resolver(handoff, snapshot)
                    except HandoffError as exc:
                        totals.refused += 1
                        logger.warning("refused the handoff of pid %d: %s", handoff.pid, exc)
                        return
                    except SourceChanged as exc:  # it connected as the change was found
                        # Its faults get what on_error says (SIGBUS by default), never a hang.
                        resolver = functools.partial(_changed, exc)
                    except Exception as exc:
                        totals.failed += 1
                        logger.error("no resolver for pid %d", handoff.pid, exc_info=exc)
                        return
                    await self._serve_handoff(conn, handoff, resolver, peer)

    def _resolver(self, handoff: Handoff, snapshot: SnapshotSource | None) -> AnyResolver:
        if snapshot is not None:
            return snapshot.resolver(
                handoff.mappings,
                readahead=self._replay_options.readahead,
                recorder=self._replay.recorder,
            )
        assert callable(self._source)
        return self._source(handoff)

    def _serving_for(self, handoff: Handoff) -> ServeOptions:
        """The serving options for ``handoff``'s ``serve()``, what ``None`` left open settled:
        its fork children's servers get the very same."""
        serving = self._serving
        on_error = serving.on_error
        if on_error is None and handoff.uffd.available_features & Feature.POISON:
            on_error = OnError(page="poison", propagate=False)
        elif on_error is None:
            on_error = OnError(page="leave", propagate=True)
        # A busy-reading server would hold the loop the prefetcher needs.
        spin = serving.spin
        if spin is None:
            spin = 0 if self._replay.prefetching else DEFAULT_SPIN
        return attrs.evolve(serving, on_error=on_error, page_size=_page_size(handoff), spin=spin)

    async def _serve_handoff(
        self,
        conn: socket.socket,
        handoff: Handoff,
        resolver: AnyResolver,
        peer: PeerExit,
        live: LiveHandoff | None = None,
    ) -> None:
        if live is None:
            live = LiveHandoff(handoff=handoff, conn=conn, resolver=resolver, peer=peer)
        self._handing[id(handoff)] = live  # from now on a successor takes it over
        live.serial = next(self._serials)
        store = self._fd_store
        if store is not None:
            live.on_applied = store.events_applied
            store.events_applied()  # its fds: stored before its serving starts
        self._handshaking.discard(id(conn))
        totals = self._totals
        totals.served += 1
        totals.active += 1
        if isinstance(resolver, SnapshotResolver):  # its pages count as mapped from now on
            self._resolvers[id(handoff)] = resolver
        size = sum(mapping.size for mapping in handoff.mappings)
        logger.info(
            "serving pid %d (uid %d): %d mappings, %d bytes, Firecracker %s's message; %s",
            handoff.pid, handoff.uid, len(handoff.mappings), size, handoff.shape.value,
            _how_it_ends(handoff, peer),
        )  # fmt: skip
        served: list[ServerStats] = []
        peer_gone = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run_server, live, served, tg.cancel_scope, peer_gone)
                await _gone(conn, handoff, peer)
                peer_gone.set()  # serving ends once the fork children it serves have exited
        finally:
            self._handing.pop(id(handoff), None)
            if store is not None:
                store.changed()
            live.stopped.set()  # a handover under way need not wait for it
            live.close_children()
            totals.active -= 1
            self._resolvers.pop(id(handoff), None)
            for stats in served:
                self._live.pop(id(stats)).count_pages()
                _add(totals, stats)
                self._latency.merge(stats.latency_histogram())
            prefetching = self._prefetching.pop(id(handoff), None)
            if prefetching is not None:
                totals.prefetched += prefetching[0].prefetched
                totals.faults_answered += prefetching[0].faults_answered
                totals.resident += prefetching[0].populated
            self._replay.save()
        if self._handed_over:
            return  # the successor serves it: nothing is done
        summed = [stats.with_children() for stats in served]
        logger.info(
            "pid %d: done: %d faults, %d pages, %d forks",
            handoff.pid, sum(s.faults for s in summed), sum(s.pages for s in summed),
            sum(s.forks for s in summed),
        )  # fmt: skip

    async def _run_server(
        self,
        live: LiveHandoff,
        served: list[ServerStats],
        handoff_scope: anyio.CancelScope,
        peer_gone: anyio.Event,
    ) -> None:
        """Serve until cancelled. Serving that ends by itself (the memory is gone: ESRCH,
        or the peer gone, and in both cases every fork child exited) ends the handoff;
        serving that failed leaves the fds be until the peer is gone. Serving stopped for
        a successor (a round, see ``_handover``) waits for the handover: over if it took
        everything, else the next round serves on."""
        while await self._serve_round(live, served, handoff_scope, peer_gone):
            handover = self._handover
            assert handover is not None
            await handover.over.wait()
            if handover.committed:
                return
            live.resume()

    async def _serve_round(
        self,
        live: LiveHandoff,
        served: list[ServerStats],
        handoff_scope: anyio.CancelScope,
        peer_gone: anyio.Event,
    ) -> bool:
        """One round of serving; True if it stopped for a successor."""
        handoff, resolver = live.handoff, live.resolver
        try:
            async with anyio.create_task_group() as tg:

                def counted(server: Any) -> None:
                    served.append(server.stats)
                    self._live[id(server.stats)] = server
                    live.started(server)

                async def serving(*, task_status: TaskStatus[Any]) -> None:
                    await serve(
                        handoff.uffd,
                        resolver,
                        options=self._serving_for(handoff),
                        task_status=_CountedFirst(task_status, counted),
                    )
                    tg.cancel_scope.cancel()  # serving ended by itself: so does any prefetch

                server = await tg.start(serving)
                tg.start_soon(_stop_when, peer_gone, server, handoff.pid)
                if self._replay.active and isinstance(resolver, SnapshotResolver):
                    if live.prefetching is None:
                        live.prefetching = PrefetchStats()
                    self._prefetching[id(handoff)] = (live.prefetching, resolver)
                    tg.start_soon(
                        self._replay.run,
                        handoff.uffd, resolver, live.prefetching, live.resume_prefetch,
                    )  # fmt: skip
        except Exception as exc:
            self._totals.failed += 1
            self._handing.pop(id(handoff), None)  # nothing left to hand over
            live.stopped.set()
            logger.error(
                "serving pid %d failed: its faults are no longer served (the others' are)",
                handoff.pid,
                exc_info=_single(exc),
            )
        else:
            if live.stopping:
                live.round_stopped()
                return True
            # Only ESRCH or the peer's end end serve() here (we never close the uffd while
            # it runs), and it returns once the fork children it served have exited too.
            if not peer_gone.is_set():
                logger.info("pid %d: its memory is gone (ESRCH)", handoff.pid)
            handoff_scope.cancel()
        return False

    # -- what a successor goes on from (see _Seam) -------------------------------

    def _carry_on(self, state: Succession, adopted: list[LiveHandoff]) -> None:
        """Go on from the predecessor's counters, histogram and recording."""
        totals = self._totals
        now = ("active", "populated_pages", "mapped_pages")  # what is served now, not so far
        for name, value in state.totals.items():
            if name in _CARRIED_TOTALS and name not in now:
                setattr(totals, name, value)
        totals.served -= len(adopted)  # each is counted again as it is served here
        for live in adopted:  # counted again by the prefetch that goes on here
            totals.prefetched -= live.prefetching.prefetched if live.prefetching else 0
        if len(state.latency) == len(self._latency.counts):
            for index, count in enumerate(state.latency):
                self._latency.counts[index] += count
            self._latency.total_ns += state.latency_ns
        if state.recording and self._replay.recorder is not None:
            self._replay.recorder.record_pages(state.recording)

    async def _adopted(self, live: LiveHandoff) -> None:
        """Serve a handoff a predecessor handed over (a lower ``max_peers`` drops none)."""
        with live.conn, live.peer, live.handoff, self._slot(live.conn, always=True):
            await self._serve_handoff(live.conn, live.handoff, live.resolver, live.peer, live)


class _Seam:
    """A :class:`HandoffServer` as the takeover (``_successor``) and the fd store
    (``_fdstore``) see it: :class:`~._served.Served`."""

    def __init__(self, server: HandoffServer) -> None:
        self._server = server

    @property
    def path(self) -> str:
        return self._server.path

    @property
    def timeout(self) -> float:
        return self._server.policy.timeout

    @property
    def draining(self) -> bool:
        return self._server.draining

    def handoffs(self) -> list[LiveHandoff]:
        return list(self._server._handing.values())

    def handshaking(self) -> bool:
        return bool(self._server._handshaking)

    def pause(self) -> Handover:
        server = self._server
        handover = server._handover = Handover()
        if server._accept_wait is not None:
            server._accept_wait.cancel()
        return handover

    def resume(self, handover: Handover, *, handed_over: bool) -> None:
        server = self._server
        if handed_over:  # the successor holds everything: never serve again
            handover.committed = server._handed_over = True
            server._replay.handed_over()
        else:
            server._handover = None
        handover.over.set()

    def progress(self, *, latency: bool, recording: bool = True) -> Progress:
        server = self._server
        histogram = LatencyHistogram()
        if latency:
            histogram.merge(server._latency)
            for live in server._live.values():
                histogram.merge(live.stats.latency_histogram())
        recorder = server._replay.recorder
        return Progress(
            totals={
                name: value
                for name, value in attrs.asdict(server.stats).items()
                if isinstance(value, int) and not isinstance(value, bool)
            },
            latency=histogram,
            recording=(
                None if recorder is None or not recording else tuple(recorder.working_set().pages)
            ),
        )

    def recorded(self) -> int:
        recorder = self._server._replay.recorder
        return 0 if recorder is None else len(recorder)

    def carry_on(self, state: Succession, adopted: list[LiveHandoff]) -> None:
        self._server._carry_on(state, adopted)

    def resolver_for(self, handoff: Handoff) -> AnyResolver:
        return self._server._resolver(handoff, self._server._opened)


async def serve_handoffs(
    path: str | os.PathLike[str],
    source: SourceSpec | ResolverFactory,
    *,
    policy: PeerPolicy | None = None,
    replay: ReplayOptions | None = None,
    serving: ServeOptions | None = None,
    allowed_uids: Collection[int] | None = None,
    socket_mode: int | None = None,
    socket_group: int | str | None = None,
    timeout: float | None = None,
    max_message: int | None = None,
    max_regions: int | None = None,
    max_peers: int | None = None,
    readahead: int | None = None,
    limit: int | None = None,
    on_error: OnError | None = None,
    record: str | os.PathLike[str] | None = None,
    prefetch: str | os.PathLike[str] | WorkingSet | None = None,
    populate: bool | None = None,
    listening_socket: socket.socket | None = None,
    takeover: bool = False,
    fd_store: bool = False,
    stored_fds: Sequence[tuple[int, str]] = (),
    task_status: TaskStatus[HandoffServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every process that hands its uffd over on ``path``, until cancelled.

    ``HandoffServer(path, source, ...).serve()``, with the same options;
    ``task_status.started()`` receives the :class:`HandoffServer`, whose
    ``stats`` you may read, and whose ``drain()`` ends it without stopping anyone.
    """
    server = HandoffServer(
        path, source, policy=policy, replay=replay, serving=serving,
        allowed_uids=allowed_uids, socket_mode=socket_mode, socket_group=socket_group,
        timeout=timeout, max_message=max_message, max_regions=max_regions,
        readahead=readahead, record=record, prefetch=prefetch, populate=populate,
        limit=limit, on_error=on_error, max_peers=max_peers, listening_socket=listening_socket,
        takeover=takeover, fd_store=fd_store, stored_fds=stored_fds,
    )  # fmt: skip
    await server.serve(task_status=task_status)


def _page_size(handoff: Handoff) -> int:
    """The mappings' page size when they agree (so that a failed huge page is poisoned
    whole: hugetlbfs refuses less), else the base page size."""
    sizes = {mapping.page_size for mapping in handoff.mappings}
    return sizes.pop() if len(sizes) == 1 else PAGE_SIZE


def _add(totals: HandoffStats, stats: ServerStats) -> None:
    summed = stats.with_children()
    for name in _SUMMED:
        setattr(totals, name, getattr(totals, name) + getattr(summed, name))


# -- when a handoff ends ------------------------------------------------------


def _how_it_ends(handoff: Handoff, peer: PeerExit) -> str:
    if peer.watch is Watch.EXITED:
        return "it has exited already"
    if peer.watched:
        return f"until it exits (pidfd from {peer.watch.value})"
    if handoff.shape.keeps_connection:
        return f"until it hangs up (no pidfd: {peer.why_not})"
    return (
        f"no pidfd ({peer.why_not}) and Firecracker {handoff.shape.value} closes its socket "
        "right after the handshake: serving ends when its memory is found gone (asked every "
        f"{PROBE_INTERVAL:g} s)"
    )


async def _gone(conn: socket.socket, handoff: Handoff, peer: PeerExit) -> None:
    """Return once the handoff's peer is gone, as well as this can be told (see the notes)."""
    if peer.watched:
        await peer.wait()
        await _hangup(conn)  # fork children that share the socket still run
    elif handoff.shape.keeps_connection:
        await _hangup(conn)
    else:
        await memory_gone(handoff.uffd)


class _CountedFirst(TaskStatus[Any]):
    """Hands the started server to ``count`` before passing it on: it may resolve faults
    before the task that started it runs again, and its stats must add up from the first."""

    def __init__(self, status: TaskStatus[Any], count: Callable[[Any], None]) -> None:
        self._status, self._count = status, count

    def started(self, value: Any = None) -> None:
        self._count(value)
        self._status.started(value)


async def _stop_when(peer_gone: anyio.Event, server: Any, pid: int) -> None:
    """Once the peer is gone, stop serving its uffd (nothing faults there again); the fork
    children that outlive it are served until they exit (see ``_server._serve_child``)."""
    await peer_gone.wait()
    if server.stats.forks:
        logger.info("pid %d: gone; its fork children are served until they exit", pid)
    server.process_exited()


async def _hangup(conn: socket.socket) -> None:
    """Return once the peer closed its end; drop whatever it sends meanwhile."""
    while True:
        await anyio.wait_readable(conn)
        try:
            data = conn.recv(_DRAIN)
        except BlockingIOError:
            continue
        except OSError:
            return  # ECONNRESET and the like: gone all the same
        if not data:
            return


async def _prepared(source: SnapshotSource) -> None:
    """``source.prepare()`` (a snapshot's zero-page scan) in a worker thread, off the first
    restore's critical path; a failure is only logged: a process's restore learns it again
    and fails as itself."""
    try:
        await anyio.to_thread.run_sync(source.prepare)
    except Exception as exc:
        logger.warning("preparing the snapshot failed: %s", exc)


async def _stop_on_change(
    source: SnapshotSource, accepting: anyio.CancelScope, changed: list[SourceChanged]
) -> None:
    changed.append(await source.wait_changed())
    accepting.cancel()


async def _changed(exc: SourceChanged, fault: object, uffd: object) -> None:
    """The resolver of a handoff received once its source had changed: every fault fails."""
    raise exc


def _single(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups, for a readable log."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
