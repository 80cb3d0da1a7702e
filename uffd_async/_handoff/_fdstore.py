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
  the newest one counts. The state is pushed whenever the fds change, and
  checked every :data:`STATE_INTERVAL` seconds for new Remove/Remap/Unmap
  events and recorded pages: what happened in the last such interval before a
  crash may be missing from it (see the README).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence

from ._succession import decode_state
from ._systemd import notify
from ._takeover import Taken, read_state, sealed_memfd

__all__ = ["STATE_INTERVAL", "FdStore", "fd_store_available", "stored_state"]

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
