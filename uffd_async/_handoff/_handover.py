"""Each handoff as a takeover sees it: stopped for a successor, carried over, or resumed.

The handoff server keeps one :class:`LiveHandoff` per peer it serves. Serving
runs in rounds: a round is one ``serve()`` of the peer's uffd (with its fork
children inside). A takeover stops the round (``hand_over``: nothing more is
read, every fault read and not answered is woken, the fork children's uffds
are kept open), and then either the successor gets it all (:func:`carry`) or
the next round serves on, with the same resolver, the same children, the same
recording and the prefetch going on from where it stopped. Facts it relies on:

* A fork child's uffd is held by us alone: it is never closed while a
  takeover may still fail, and only once it is ours for good (the peer's
  serving ended) or the successor holds it.
* A successor knows nothing of this process's objects: it gets the mappings,
  the events each resolver applied (:mod:`._succession`), and the fds, and
  builds its resolvers again (:func:`adopt`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import anyio
import attrs

from .._core._events import Remap, Remove, Unmap
from .._core._uffd import Userfaultfd
from .._restore._prefetch import PrefetchStats
from .._serve._peer_lifetime import PeerExit
from .._serve._resolvers import AnyResolver, Resolver
from ._succession import Carried, CarriedHandoff, Prefetched
from ._takeover import Taken
from ._transfer import Handoff, kernel_features

__all__ = ["Handover", "LiveHandoff", "adopt", "carry", "wake_everything"]

ResolverEvent = Remap | Remove | Unmap
Child = tuple[Userfaultfd, AnyResolver, list[ResolverEvent]]


@attrs.define(eq=False)
class Handover:
    """One handover under way: over once the successor has everything, or failed."""

    over: anyio.Event = attrs.field(factory=anyio.Event)
    committed: bool = False


@attrs.define(eq=False, kw_only=True)
class LiveHandoff:
    """One peer being served, across the rounds of its serving."""

    handoff: Handoff
    conn: socket.socket
    resolver: AnyResolver
    peer: PeerExit
    #: Fork children a stopped round (or a predecessor) handed over: the next round serves them.
    children: list[Child] = attrs.field(factory=list)
    #: The Remove/Remap/Unmap events the resolver applied so far, in order.
    applied: list[ResolverEvent] = attrs.field(factory=list)
    prefetching: PrefetchStats | None = None
    #: How far the prefetch got when its round stopped: the next round goes on from there.
    resume_prefetch: PrefetchStats | None = None
    server: Any = None
    stopping: bool = False
    stopped: anyio.Event = attrs.field(factory=anyio.Event)
    #: A number of its own in this process (systemd's fd store names its fds by it).
    serial: int = 0
    #: Called once each event is applied, by every round's server (and its children's):
    #: systemd's fd store gets the state at once, not at its next look.
    on_applied: Callable[[], None] | None = None

    def started(self, server: Any) -> None:
        """A round's server started (before it read anything): give it the state so far."""
        self.server = server
        server.applied = self.applied
        server.on_applied = self.on_applied
        children, self.children = self.children, []
        if children:
            server.adopt_children(children)
        if self.stopping:
            server.hand_over()

    def stop(self) -> None:
        """Stop the round for a successor (see ``_Server.hand_over``); ``stopped`` says when."""
        self.stopping = True
        if self.server is not None:
            self.server.hand_over()

    def round_stopped(self) -> None:
        """The round stopped for a successor: keep what the next one (or it) needs."""
        server, self.server = self.server, None
        if server is not None:
            self.applied = server.applied
            self.children.extend(server.handed_children)
            server.handed_children = []
        if self.prefetching is not None:
            self.resume_prefetch = attrs.evolve(self.prefetching)
        self.stopped.set()

    def resume(self) -> None:
        self.stopping = False
        self.stopped = anyio.Event()

    def close_children(self) -> None:
        """Close the children's uffds left over (the serving ended, or a successor has them)."""
        children, self.children = self.children, []
        for uffd, _, _ in children:
            uffd.close()


def carry(live: LiveHandoff, fds: list[int], *, now: bool = False) -> CarriedHandoff:
    """What a successor needs of ``live`` (stopped); its fds are appended to ``fds``.
    ``now``: of ``live`` as it is served now, not stopped (for systemd's fd store)."""

    def index(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    handoff = live.handoff
    prefetch = live.resume_prefetch
    applied: list[ResolverEvent] = live.applied
    children = [(uffd, events) for uffd, _, events in live.children]
    if now:
        prefetch = live.prefetching
        if live.server is not None:
            applied = live.server.applied
            children += live.server.children_now()
    return CarriedHandoff(
        mappings=handoff.mappings,
        shape=handoff.shape,
        pid=handoff.pid,
        uid=handoff.uid,
        gid=handoff.gid,
        uffd=index(handoff.uffd.fileno()),
        conn=index(live.conn.fileno()),
        memfd=None if handoff.memfd is None else index(handoff.memfd),
        events=tuple(applied),
        children=tuple(
            Carried(uffd=index(uffd.fileno()), events=tuple(events)) for uffd, events in children
        ),
        prefetch=None
        if prefetch is None
        else Prefetched(
            prefetched=prefetch.prefetched,
            runs=prefetch.runs,
            working_set_done=prefetch.working_set_done,
            populated=prefetch.populated,
        ),
    )


def adopt(
    taken: Taken, carried: CarriedHandoff, make_resolver: Callable[[Handoff], AnyResolver]
) -> LiveHandoff:
    """A successor's :class:`LiveHandoff` for what a predecessor carried over: the fds taken
    from ``taken``, a resolver made again and brought up to date with the events applied."""
    available = kernel_features()
    conn = socket.socket(fileno=taken.take(carried.conn))
    conn.setblocking(False)
    handoff = Handoff(
        uffd=Userfaultfd._adopt(taken.take(carried.uffd), available=available),
        mappings=carried.mappings,
        shape=carried.shape,
        memfd=None if carried.memfd is None else taken.take(carried.memfd),
        pid=carried.pid,
        uid=carried.uid,
        gid=carried.gid,
    )
    children: list[Child] = []
    try:
        for child in carried.children:
            children.append(
                (Userfaultfd._adopt(taken.take(child.uffd), available=available), None, [])  # type: ignore[arg-type]
            )
        peer = PeerExit(conn, carried.pid)
        try:
            resolver = make_resolver(handoff)
            for index, child in enumerate(carried.children):
                forked = resolver.fork() if isinstance(resolver, Resolver) else resolver
                _apply(forked, child.events)
                children[index] = (children[index][0], forked, list(child.events))
            _apply(resolver, carried.events)
        except BaseException:
            peer.close()
            raise
    except BaseException:
        for uffd, _, _ in children:
            uffd.close()
        handoff.close()
        conn.close()
        raise
    prefetch = carried.prefetch
    stats = None
    if prefetch is not None:
        stats = PrefetchStats(
            prefetched=prefetch.prefetched,
            runs=prefetch.runs,
            working_set_done=prefetch.working_set_done,
            populated=prefetch.populated,
        )
    return LiveHandoff(
        handoff=handoff,
        conn=conn,
        resolver=resolver,
        peer=peer,
        children=children,
        applied=list(carried.events),
        prefetching=stats,
        resume_prefetch=None if stats is None else attrs.evolve(stats),
    )


def wake_everything(live: LiveHandoff) -> None:
    """Wake every thread waiting on ``live``'s memory (its children's too): faults a dead
    server read and never answered are asleep, and the kernel never sends them again.
    Woken, each thread faults again where its page is still missing."""
    ranges = [(m.base_host_virt_addr, m.size) for m in live.handoff.mappings]
    for events in [live.applied, *(events for _, _, events in live.children)]:
        ranges += [(e.to_address, e.length) for e in events if isinstance(e, Remap)]
    for uffd in [live.handoff.uffd, *(uffd for uffd, _, _ in live.children)]:
        for start, length in ranges:
            uffd.wake(start, length)


def _apply(resolver: AnyResolver, events: tuple[ResolverEvent, ...]) -> None:
    if isinstance(resolver, Resolver):
        for event in events:
            resolver.apply(event)
