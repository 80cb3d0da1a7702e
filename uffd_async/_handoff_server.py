"""Serving the page faults of every process that hands its uffd over a Unix socket.

Kernel and protocol facts this module relies on (see :mod:`._handoff_io` for
the handshake itself):

* A peer connects, sends its uffd and mappings in one message, and keeps the
  connection open for as long as it wants its faults served: Firecracker
  does exactly that. Its end of the socket closes when it closes it or exits
  (and only when every process holding that end did: a forked child shares
  it). That hangup is the only end-of-serving signal there is: a uffd never
  reports end-of-file, its faults just stop coming when the process dies.
* The peer keeps its own copy of the uffd. Closing ours then wakes nobody
  and changes nothing for it: a fault of its that was never resolved stays
  blocked until it exits. A uffd the kernel hands *us* for a fork child
  (``EVENT_FORK``) is held by nobody else, though: closing it unregisters
  the child's memory, whose missing pages then read as zeros. So a
  connection's fds are closed only once its peer hung up, or when the whole
  server stops, even if serving its uffd ended earlier. (The fault server
  closes a fork child's uffd itself when serving the parent's stops.)
* On hugetlbfs, ``UFFDIO_POISON`` (what a failed resolution gets) must cover
  a whole huge page: each connection is served with its mappings' page size
  when they all agree.
* Whatever a peer sends after the handshake is read and dropped (with any
  fds it carries, which ``recv()`` never installs), so that it cannot keep
  the socket readable forever. Firecracker sends nothing more.
* Peers are untrusted: the uid check, the bounds on the message and on the
  time to send it, and the checks on the mappings are :func:`receive_uffd`'s.
  A refused or failing peer ends its own connection, never the server.
* A path left behind by a server that died is a socket nobody listens on
  (``connect`` gets ECONNREFUSED): it is replaced. A path where someone
  listens, or that is not a socket, is left alone. On the way out the socket
  file is removed, unless something else has replaced it since.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable, Collection
from typing import Any

import anyio
import attrs
from anyio.abc import TaskStatus

from ._abi import PAGE_SIZE, Feature
from ._errors import HandoffError, InvalidArgument
from ._handoff import DEFAULT_MAX_REGIONS
from ._handoff_io import DEFAULT_MAX_MESSAGE, DEFAULT_TIMEOUT, Handoff, receive_uffd
from ._server import OnError, ServerStats, serve
from ._snapshot import Snapshot
from .resolvers import AnyResolver

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["HandoffServer", "HandoffStats", "ResolverFactory", "serve_handoffs"]

logger = logging.getLogger("uffd_async")

#: Makes the resolver for one handoff; raising :class:`HandoffError` refuses the handoff.
ResolverFactory = Callable[[Handoff], AnyResolver]

#: accept() errors that mean "too many fds or too little memory right now": wait and retry.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESOURCE_BACKOFF = 0.1
_DRAIN = 4096


@attrs.define(kw_only=True)
class HandoffStats:
    """Counters of a :class:`HandoffServer`, over every connection so far."""

    #: Connections accepted on the socket.
    connections: int = 0
    #: Handoffs received and served; ``active`` of them are being served now.
    served: int = 0
    active: int = 0
    #: Handoffs refused: a uid not allowed, a bad message, no or wrong fds, silence.
    refused: int = 0
    #: Connections whose serving failed after the handoff (each one logged).
    failed: int = 0
    #: Summed over every handed-over uffd (fork children count in ``forks`` only).
    faults: int = 0
    resolved: int = 0
    errors: int = 0
    events: int = 0
    forks: int = 0

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


_SUMMED = ("faults", "resolved", "errors", "events", "forks")


class HandoffServer:
    """Accepts uffd handoffs on the Unix socket ``path`` and serves each one.

    ``source`` says what to serve: a snapshot file's path or a
    :class:`Snapshot` (each handoff's mappings are served from it, and must
    lie inside it), or a factory ``(handoff) -> resolver``. Each connection
    gets its own :func:`~uffd_async.serve` under the server's task group,
    until its peer hangs up. See :meth:`serve` for what ends the server.

    ``allowed_uids``: the uids a peer may run as (default: this process's
    effective uid only; add Firecracker's, or the jailer's, to serve it).
    ``timeout``, ``max_message``, ``max_regions``: bounds on the handshake,
    as in :func:`~uffd_async.receive_uffd`. ``readahead``: pages copied past
    each fault (snapshot sources only). ``limit``: as in ``serve()``.
    ``on_error``: what a failed resolution does; by default the page is
    poisoned (the access raises SIGBUS in the peer, which never reads wrong
    bytes) and serving goes on; on a kernel without UFFDIO_POISON the fault
    is left blocked and that connection's serving stops, logged.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        source: str | os.PathLike[str] | Snapshot | ResolverFactory,
        *,
        allowed_uids: Collection[int] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_regions: int = DEFAULT_MAX_REGIONS,
        readahead: int = 0,
        limit: int = 64,
        on_error: OnError | None = None,
    ) -> None:
        self.path = os.fspath(path)
        if not self.path:
            raise InvalidArgument(errno.EINVAL, "the socket path is empty")
        if isinstance(source, Snapshot) or callable(source):
            self._source: str | Snapshot | ResolverFactory = source
        else:
            self._source = os.fspath(source)
        if isinstance(readahead, bool) or not isinstance(readahead, int) or readahead < 0:
            raise InvalidArgument(errno.EINVAL, f"readahead must be an int >= 0, not {readahead!r}")
        if callable(source) and readahead:
            raise InvalidArgument(
                errno.EINVAL, "readahead applies to snapshot sources; a factory sets its own"
            )
        if on_error is not None and not isinstance(on_error, OnError):
            raise TypeError(f"on_error must be an OnError or None, not {type(on_error).__name__}")
        if not timeout > 0:
            raise InvalidArgument(errno.EINVAL, f"timeout must be positive, not {timeout!r}")
        self._allowed = frozenset({os.geteuid()} if allowed_uids is None else allowed_uids)
        self._timeout = timeout
        self._max_message = max_message
        self._max_regions = max_regions
        self._readahead = readahead
        self._limit = limit
        self._on_error = on_error
        self._totals = HandoffStats()
        self._live: dict[int, ServerStats] = {}
        self._running = False

    @property
    def allowed_uids(self) -> frozenset[int]:
        return self._allowed

    @property
    def stats(self) -> HandoffStats:
        """A snapshot of the counters, live connections included."""
        stats = attrs.evolve(self._totals)
        for live in self._live.values():
            for name in _SUMMED:
                setattr(stats, name, getattr(stats, name) + getattr(live, name))
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
        server listens there, or it is not a socket: ``FileExistsError``);
        a snapshot that cannot be opened; errors accepting connections other
        than running out of fds or memory (after which it waits and retries);
        and ``BaseException``\\ s such as ``KeyboardInterrupt``. On the way
        out every connection's fds are closed and the socket file removed.
        """
        if self._running:
            raise RuntimeError("this HandoffServer is already serving")
        self._running = True
        try:
            if isinstance(self._source, str):
                with Snapshot(self._source) as opened:
                    await self._listen(opened, task_status)
            else:
                given = self._source if isinstance(self._source, Snapshot) else None
                await self._listen(given, task_status)
        finally:
            self._running = False

    async def _listen(self, snapshot: Snapshot | None, task_status: TaskStatus[Any]) -> None:
        listener, identity = _bind(self.path)
        try:
            with listener:
                async with anyio.create_task_group() as tg:
                    task_status.started(self)
                    while True:
                        conn = await _accept(listener)
                        if conn is not None:
                            tg.start_soon(self._connection, conn, snapshot)
        finally:
            _unlink_if_ours(self.path, identity)

    # -- one connection -------------------------------------------------------

    async def _connection(self, conn: socket.socket, snapshot: Snapshot | None) -> None:
        totals = self._totals
        totals.connections += 1
        with conn:
            try:
                handoff = await receive_uffd(
                    conn,
                    allowed_uids=self._allowed,
                    max_message=self._max_message,
                    timeout=self._timeout,
                    backing_size=snapshot.size if snapshot is not None else None,
                    max_regions=self._max_regions,
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
                except Exception as exc:
                    totals.failed += 1
                    logger.error("no resolver for pid %d", handoff.pid, exc_info=exc)
                    return
                await self._serve_handoff(conn, handoff, resolver)

    def _resolver(self, handoff: Handoff, snapshot: Snapshot | None) -> AnyResolver:
        if snapshot is not None:
            return snapshot.resolver(handoff.mappings, readahead=self._readahead)
        assert callable(self._source)
        return self._source(handoff)

    def _on_error_for(self, handoff: Handoff) -> OnError:
        if self._on_error is not None:
            return self._on_error
        if handoff.uffd.available_features & Feature.POISON:
            return OnError(page="poison", propagate=False)
        return OnError(page="leave", propagate=True)

    async def _serve_handoff(
        self, conn: socket.socket, handoff: Handoff, resolver: AnyResolver
    ) -> None:
        totals = self._totals
        totals.served += 1
        totals.active += 1
        size = sum(mapping.size for mapping in handoff.mappings)
        logger.info(
            "serving pid %d (uid %d): %d mappings, %d bytes",
            handoff.pid, handoff.uid, len(handoff.mappings), size,
        )  # fmt: skip
        served: list[ServerStats] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run_server, handoff, resolver, served)
                await _hangup(conn)
                tg.cancel_scope.cancel()
        finally:
            totals.active -= 1
            for stats in served:
                del self._live[id(stats)]
                for name in _SUMMED:
                    setattr(totals, name, getattr(totals, name) + getattr(stats, name))
        logger.info(
            "pid %d hung up: %d faults resolved, %d forks",
            handoff.pid, sum(s.resolved for s in served), sum(s.forks for s in served),
        )  # fmt: skip

    async def _run_server(
        self, handoff: Handoff, resolver: AnyResolver, served: list[ServerStats]
    ) -> None:
        """Serve until cancelled; if serving ends first, log why and leave the fds be."""
        try:
            async with anyio.create_task_group() as tg:
                server = await tg.start(
                    functools.partial(
                        serve,
                        handoff.uffd,
                        resolver,
                        limit=self._limit,
                        on_error=self._on_error_for(handoff),
                        page_size=_page_size(handoff),
                    )
                )
                served.append(server.stats)
                self._live[id(server.stats)] = server.stats
        except Exception as exc:
            self._totals.failed += 1
            logger.error(
                "serving pid %d failed: its faults are no longer served (the others' are)",
                handoff.pid,
                exc_info=_single(exc),
            )
        else:
            # The process exited, or the uffd was closed. Fork children of it may
            # still run on the uffds we hold: those stay open until it hangs up.
            logger.info("pid %d: serving its uffd ended; waiting for it to hang up", handoff.pid)


async def serve_handoffs(
    path: str | os.PathLike[str],
    source: str | os.PathLike[str] | Snapshot | ResolverFactory,
    *,
    allowed_uids: Collection[int] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_message: int = DEFAULT_MAX_MESSAGE,
    max_regions: int = DEFAULT_MAX_REGIONS,
    readahead: int = 0,
    limit: int = 64,
    on_error: OnError | None = None,
    task_status: TaskStatus[HandoffServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every process that hands its uffd over on ``path``, until cancelled.

    ``HandoffServer(path, source, ...).serve()``; ``task_status.started()``
    receives the :class:`HandoffServer`, whose ``stats`` you may read.
    """
    server = HandoffServer(
        path,
        source,
        allowed_uids=allowed_uids,
        timeout=timeout,
        max_message=max_message,
        max_regions=max_regions,
        readahead=readahead,
        limit=limit,
        on_error=on_error,
    )
    await server.serve(task_status=task_status)


def _page_size(handoff: Handoff) -> int:
    """The mappings' page size when they agree (so that a failed huge page is poisoned
    whole: hugetlbfs refuses less), else the base page size."""
    sizes = {mapping.page_size for mapping in handoff.mappings}
    return sizes.pop() if len(sizes) == 1 else PAGE_SIZE


# -- the socket ----------------------------------------------------------------


def _bind(path: str) -> tuple[socket.socket, tuple[int, int] | None]:
    """A listening, non-blocking socket at ``path``, and the identity of its file."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or _abstract(path):
                raise
            _remove_stale(path)
            sock.bind(path)
        identity = None
        if not _abstract(path):
            status = os.stat(path)
            identity = (status.st_dev, status.st_ino)
        sock.listen()
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, identity


def _abstract(path: str) -> bool:
    return path.startswith("\0")


def _remove_stale(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse anything else."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise FileExistsError(
            errno.EEXIST, f"{path} exists and is not a socket: remove it or choose another path"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left behind by a server that is gone
            return
        except BlockingIOError:
            pass  # someone listens, with a full backlog
    raise FileExistsError(
        errno.EADDRINUSE, f"another server is listening on {path}: stop it or choose another path"
    )


def _unlink_if_ours(path: str, identity: tuple[int, int] | None) -> None:
    if identity is None:
        return
    try:
        status = os.lstat(path)
        if (status.st_dev, status.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass


async def _accept(listener: socket.socket) -> socket.socket | None:
    """The next connection, or None when accept() failed in a way worth retrying."""
    await anyio.wait_readable(listener)
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, ConnectionAbortedError):
        return None
    except OSError as exc:
        if exc.errno not in _RESOURCE_ERRORS:
            raise
        logger.error("accepting a connection failed (%s); retrying shortly", exc)
        await anyio.sleep(_RESOURCE_BACKOFF)
        return None
    return conn


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


def _single(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups, for a readable log."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
