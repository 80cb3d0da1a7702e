"""Wait, bounded, for a dropped client's TCP connections to be closed.

obstore has no ``close()``: its store's connections close when the store is
dropped, but not then and there. Dropping it drops the pool's handles, and each
connection's task, on obstore's own (tokio) threads, notices a moment later and
closes its socket (a millisecond or two here, sometimes more on a loaded host).
So an ``aclose`` that only dropped the store returned with sockets still open: a
caller that checks for leaked descriptors right after (as the test suite does)
would see them, and a process that forks or execs just then would inherit them.

:class:`ClosingSockets` makes that close synchronous enough: taken when the
client is made, it lists the process's TCP sockets; after the client is dropped,
:meth:`ClosingSockets.wait` waits until every TCP socket opened since is closed.
Sockets another client opened meanwhile are in that list too and stay open; the
wait tells them apart by time, not by name (nothing names a socket's owner): it
ends once none of the rest has closed for ``settle`` seconds (since the drop, or
since the last one closed), or at ``bound`` whatever happens. So it costs a few
milliseconds alone, and at most ``settle`` more beside other clients.

Kernel facts this module relies on:

* ``/proc/self/fd/N`` of a socket reads ``socket:[INODE]``; ``/proc/self/net/tcp``
  and ``tcp6`` list the TCP sockets of the process's network namespace, the
  inode in their tenth column. A socket whose fd is closed leaves ``/proc/self/fd``
  at once (the connection may linger in the kernel, in TIME_WAIT, owned by no fd).
"""

from __future__ import annotations

import os
import time

import anyio

__all__ = ["ClosingSockets"]

_TABLES = ("/proc/self/net/tcp", "/proc/self/net/tcp6")


def _socket_fds() -> dict[str, str]:
    """The process's sockets: inode -> fd."""
    found: dict[str, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd in names:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (or the listing's own fd)
        if target.startswith("socket:["):
            found[target[8:-1]] = fd
    return found


def _tcp_inodes() -> set[str]:
    """Inodes of the TCP sockets of this network namespace."""
    inodes: set[str] = set()
    for table in _TABLES:
        try:
            with open(table) as lines:
                next(lines, None)  # the header
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


class ClosingSockets:
    """The TCP sockets a client opens from now on, to wait for once it is dropped."""

    def __init__(self) -> None:
        self._before = set(_socket_fds())

    def opened(self) -> set[str]:
        """Inodes of TCP sockets of this process opened since, still open."""
        new = set(_socket_fds()) - self._before
        return new & _tcp_inodes() if new else new

    async def wait(self, *, settle: float = 0.1, bound: float = 1.0) -> set[str]:
        """Wait until the sockets opened since are closed (see the module for when it stops
        early); returns those still open. Shielded: it runs in ``aclose``."""
        with anyio.CancelScope(shield=True):
            left = self.opened()
            start = last_closed = time.monotonic()
            pause = 0.0005
            while left:
                now = time.monotonic()
                if now - start >= bound or (now - last_closed >= settle):
                    break
                await anyio.sleep(pause)
                pause = min(pause * 2, 0.01)
                still = left & set(_socket_fds())
                if len(still) < len(left):
                    last_closed = time.monotonic()
                left = still
        return left
