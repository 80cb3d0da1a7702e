"""Every live uffd kept in systemd's fd store, so that a crash or a restart closes none.

Under systemd with ``FileDescriptorStoreMax=`` (it then sets ``$FDSTORE``), the
handoff server pushes each fd a successor needs (each peer's uffd, its
connection and memfd, each fork child's uffd) as it appears, removes it once
its peer has gone, and keeps beside them a small sealed memfd with the state
(:mod:`._succession`: the same message a takeover sends, each fd named by its
``FDNAME``). A restarted service gets them all back in ``$LISTEN_FDS`` and
serves on (:func:`stored_state`). Facts this relies on:

* ``FDSTORE=1`` with ``FDNAME=`` stores the fds of that notify message under
  that name (one fd a message here, so a name is one fd); ``FDSTOREREMOVE=1``
  with ``FDNAME=`` drops them. ``FDPOLL=0``: systemd would otherwise drop an
  fd that polls ``EPOLLHUP``/``EPOLLERR``. Names are printable ASCII but
  ``:``, at most 255 characters. Stored fds come back in ``$LISTEN_FDS`` with
  their names in ``$LISTEN_FDNAMES``, beside the socket unit's.
* systemd holds its copies until they are removed: a uffd stays registered
  while any process holds it, so a crashed server's peers wait for the next
  one (their faults stay pending in the uffd) and never read zeros, fork
  children included, whose uffd nobody else holds.
* A state replaced is pushed under a new name first (``ua-state.N``, N one
  higher), and the old one removed after: a crash in between leaves both, and
  the newest one counts.
* The kernel lets a Remove (``madvise``) return once the server has *read* the
  event, not applied it, and a fault read with it is answered after it (the
  events of a read are applied first). So the state is pushed from the
  fault server's own hook (``on_applied``), before it answers anything read
  with the events: once a fault read after a Remove is answered, the state with
  that Remove is in the store. What is left is the instant between the read
  and that push (a few hundred microseconds, see the README). A fork child's
  uffd is pushed the same way as its serving starts, a new peer's fds before
  its serving starts. Recorded pages are looked for every
  :data:`STATE_INTERVAL` seconds (what the last such interval recorded may be
  missing after a crash: a slower prefetch next time, never a wrong byte).
* A peer gone has its fds removed at once; a server stopping (cancelled)
  removes nothing: the next one serves them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence

import anyio
import anyio.lowlevel
import attrs

from .._core._errors import TakeoverError, UffdClosed
from ._handover import LiveHandoff, adopt, carry, wake_everything
from ._served import Served, succession_state
from ._succession import VERSIONS, decode_state, encode_state
from ._systemd import notify
from ._takeover import Taken, read_state, sealed_memfd

__all__ = [
    "STATE_INTERVAL",
    "FdStore",
    "FdStoreKeeper",
    "fd_store_available",
    "resume_stored",
    "stored_state",
]

logger = logging.getLogger("uffd_async")

#: Seconds between checks of the state for changes that need it pushed again.
STATE_INTERVAL = 0.1
STATE_PREFIX = "ua-state."
_STATE_NAME = re.compile(r"ua-state\.(\d{1,18})")


def fd_store_available() -> bool:
    """Whether a service manager listens (``$NOTIFY_SOCKET``) and keeps fds (``$FDSTORE``)."""
    store = os.environ.get("FDSTORE", "")
    return bool(os.environ.get("NOTIFY_SOCKET")) and store.isdigit() and int(store) > 0


class FdStore:
    """What this process has in the fd store, by name, and the pushes and removals to keep
    it equal to what is served. ``stored``: the names a predecessor left there."""

    def __init__(self, stored: Iterable[str] = ()) -> None:
        self._stored = set(stored)
        generations = [int(m.group(1)) for m in map(_STATE_NAME.fullmatch, self._stored) if m]
        self._generation = max(generations, default=0)
        self._state: bytes | None = None
        self._children: dict[int, tuple[object, str]] = {}  # id(uffd) -> it, its name
        self._next_child = 0

    def child_name(self, serial: int, uffd: object) -> str:
        """A name for a fork child's uffd that no other fd in the store has."""
        known = self._children.get(id(uffd))
        if known is None or known[0] is not uffd:
            self._next_child += 1
            known = self._children[id(uffd)] = (uffd, f"child.{serial}.{self._next_child}")
        return known[1]

    def sync(self, named: dict[str, int], state: bytes) -> None:
        """Push what is not stored yet, then the state if it changed, then remove the rest."""
        for name, fd in named.items():
            if name not in self._stored and _push(name, fd):
                self._stored.add(name)
        if state != self._state:
            memfd = sealed_memfd(state)
            try:
                name = f"{STATE_PREFIX}{self._generation + 1}"
                if _push(name, memfd):
                    self._generation += 1
                    self._stored.add(name)
                    self._state = state
            finally:
                os.close(memfd)
        current = f"{STATE_PREFIX}{self._generation}"
        for name in sorted(self._stored - set(named) - {current}):
            if notify("FDSTOREREMOVE=1", f"FDNAME={name}"):
                self._stored.discard(name)
        self._children = {key: entry for key, entry in self._children.items() if entry[1] in named}


class FdStoreKeeper:
    """Keeps systemd's fd store equal to what ``served`` serves (:meth:`keep`, a task),
    pushed at once when told (:meth:`events_applied`, :meth:`changed`). ``stored``: the
    names a predecessor left there."""

    def __init__(self, served: Served, stored: Iterable[str] = ()) -> None:
        self._served = served
        self._store = FdStore(stored)
        self._wakeup: anyio.Event | None = None  # set: push the state now
        self._last: object = None  # what the state last pushed held
        self._recording: tuple[int, ...] | None = None  # as the last look saw it
        self._recorded = -1  # how many pages that was
        self._stale = False  # pushed with an older recording since: the next look pushes it

    def events_applied(self) -> None:
        """A handoff's server applied events (or serves a new fork child), or a handoff
        is about to be served: push the state now, before anything else runs, so that a
        crash an instant later still has it. What cannot be pushed now (a child's uffd
        closed as it was looked at, an error) is left to :meth:`keep`."""
        if self._wakeup is None:  # not kept (yet, or any more)
            return
        try:
            pushed = self._push(fresh=False)
        except Exception:  # raised again where keep() looks: never in a handoff's serving
            pushed = False
        if not pushed:
            self._wakeup.set()

    def changed(self) -> None:
        """A handoff has gone: :meth:`keep` pushes the state as soon as it runs (never once
        the server is stopping: a stopped server's fds stay in the store)."""
        if self._wakeup is not None:
            self._wakeup.set()

    async def keep(self) -> None:
        """Push the state when told of a change, and look every ``STATE_INTERVAL`` for
        recorded pages; until cancelled."""
        self._last = None
        try:
            while True:
                wakeup = self._wakeup = anyio.Event()  # before looking: nothing missed
                if not self._push(fresh=True):  # a child ended just now: look again
                    await anyio.sleep(STATE_INTERVAL / 10)
                    continue
                with anyio.move_on_after(STATE_INTERVAL):
                    await wakeup.wait()
                # Woken as the server stops (a handoff's end, in its cancellation): push
                # nothing, or the next server would lose the handoffs.
                await anyio.lowlevel.checkpoint()
        finally:
            self._wakeup = None

    def _push(self, *, fresh: bool) -> bool:
        """Push what is served, if it changed since the last push; False if a child's uffd
        closed as it was looked at (look again). ``fresh``: with the recording as it is now;
        else (an event's push, on the fault path: quick) with the last look's, and the next
        look pushes it fresh (a recording is a hint for the next restore: never urgent)."""
        store, served = self._store, self._served
        lives = served.handoffs()
        fds: list[int] = []
        names: dict[int, str] = {}
        try:
            carried = [carry(live, fds, now=True) for live in lives]
            for live in lives:
                serial, handoff = live.serial, live.handoff
                names[handoff.uffd.fileno()] = f"uffd.{serial}"
                names[live.conn.fileno()] = f"conn.{serial}"
                if handoff.memfd is not None:
                    names[handoff.memfd] = f"memfd.{serial}"
                children = [uffd for uffd, _, _ in live.children]
                if live.server is not None:
                    children += [uffd for uffd, _ in live.server.children_now()]
                for uffd in children:
                    names[uffd.fileno()] = store.child_name(serial, uffd)
        except UffdClosed:
            return False
        now = (
            tuple(names[fd] for fd in fds),
            [(len(h.events), [len(c.events) for c in h.children]) for h in carried],
            served.recorded(),
        )
        if now == self._last and not (fresh and self._stale):
            return True  # fds, events and recording as pushed
        if fresh or self._recorded < 0:
            progress = served.progress(latency=False, recording=True)
            self._recording, self._recorded = progress.recording, now[2]
        else:
            progress = served.progress(latency=False, recording=False)
            progress = attrs.evolve(progress, recording=self._recording)
        self._stale = self._recorded != now[2]
        state = succession_state(progress, VERSIONS[-1], fds, carried, names=now[0])
        store.sync(dict(zip(now[0], fds, strict=True)), encode_state(state))
        self._last = now
        return True


def resume_stored(served: Served, stored: list[tuple[int, str]]) -> list[LiveHandoff]:
    """Serve on what a predecessor left in systemd's fd store (it crashed, or stopped):
    the handoffs ``served`` is to serve, woken, its counters gone on from."""
    taken = stored_state(stored)
    if taken is None:
        return []
    adopted: list[LiveHandoff] = []
    try:
        for carried in taken.state.handoffs:
            try:
                live = adopt(taken, carried, served.resolver_for)
            except (TakeoverError, OSError) as exc:
                logger.warning("pid %d is not served again: %s", carried.pid, exc)
                continue
            adopted.append(live)
            wake_everything(live)  # what the dead server read and never answered
        served.carry_on(taken.state, adopted)
    finally:
        taken.close()
    logger.info("resumed from the fd store: %d processes served again", len(adopted))
    return adopted


def _push(name: str, fd: int) -> bool:
    return notify("FDSTORE=1", f"FDNAME={name}", "FDPOLL=0", fds=[fd])


def stored_state(passed: Sequence[tuple[int, str]]) -> Taken | None:
    """The newest state among the fds a service manager passed (its fd store's), as a
    :class:`Taken` whose fds are those it names (``None`` where one is missing); ``None``
    if no state came. Every passed fd the state does not name is closed here (our copy:
    the store keeps its own); the rest are closed by :meth:`Taken.close` unless taken."""
    states = sorted(
        ((int(m.group(1)), fd) for fd, name in passed if (m := _STATE_NAME.fullmatch(name))),
        reverse=True,
    )
    taken = None
    try:
        if states:
            state = decode_state(read_state(states[0][1]))
            by_name = {name: fd for fd, name in passed}
            missing = [name for name in state.names if name not in by_name]
            if missing:  # gone from the store as we went: nothing to resume there
                logger.warning("the fd store lacks %s: what they served is not resumed", missing)
            fds: list[int | None] = [by_name.get(name) for name in state.names]
            taken = Taken(state=state, fds=fds, conn=None, timeout=0.0)
    finally:
        kept = set() if taken is None else {fd for fd in taken.fds if fd is not None}
        for fd, _ in passed:
            if fd not in kept:
                os.close(fd)
    return taken
