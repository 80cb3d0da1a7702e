"""How long a handed-over uffd is served: the life of the process that sent it.

Kernel and protocol facts this module relies on:

* A uffd never says that its process is gone: faults just stop coming, and
  only a resolving ioctl (which needs a fault to be tried) finds the memory
  gone (ESRCH). The peer's socket says nothing either: Firecracker before
  1.12 closes it right after the handshake and its guest lives on, while
  1.12 and later keep it open until they exit (see
  :mod:`uffd_async._handoff._wire`).
* A pidfd does say it: it polls readable once the process has exited, in
  whatever pid namespace it lives. ``SO_PEERPIDFD`` (Linux 6.5) hands one
  over for the process that ``connect()``\\ ed, with no race at all: the
  kernel holds that process's ``struct pid`` since the connect.
* Before 6.5, ``pidfd_open()`` (5.3) on the ``SO_PEERCRED`` pid. That pid
  was taken at ``connect()``; if the peer exited since and the pid went to
  another process, we would watch a stranger. This opens the pidfd as soon
  as the connection is accepted, before reading anything, which leaves the
  window from the peer's ``connect()`` to our ``accept()``. Linux hands out
  pids cyclically up to ``pid_max`` (4194304 on 64-bit systems with
  systemd), so a reuse needs that many processes created within the window:
  race-free enough. A peer gone already is ``ESRCH``: it ended.
* ``SO_PEERCRED`` gives pid 0 for a peer in a pid namespace we cannot see
  (ours is a child of its namespace): then only ``SO_PEERPIDFD`` helps.
* Linux 6.16 and later hand out a pidfd even for a peer already reaped (it
  polls readable at once); 6.5 to 6.15 say EINVAL or ESRCH instead.
* Without any pidfd, and for the fork children the kernel hands over
  (``EVENT_FORK``: no pid comes with them), the memory itself tells: every
  resolving ioctl, once its arguments are checked, makes sure the uffd's mm
  still has users before looking at any page, and says ESRCH once the
  process exited (or exec'd). A ``UFFDIO_ZEROPAGE`` of a page no process
  registers (64 KiB, or ``vm.mmap_min_addr`` if higher: nothing maps there
  without ``MAP_FIXED``) says ENOENT while it lives, and maps nothing: a
  probe, :func:`memory_gone`, asked every ``PROBE_INTERVAL`` seconds (EAGAIN,
  an event unread, also says it lives).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import os
import socket

import anyio

from .._core import _abi
from .._core._abi import PAGE_SIZE
from .._core._uffd import Userfaultfd

__all__ = ["PeerExit", "Watch", "memory_gone"]

#: ``SO_PEERPIDFD`` from asm-generic/socket.h, where Python's socket module lacks it.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
#: A kernel without the option (or a seccomp filter standing in for one) says ENOPROTOOPT;
#: one with it says EINVAL (no task any more) or ESRCH (no peer pid) when the peer is gone.
_NO_PEERPIDFD = frozenset({errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_PEER_GONE = frozenset({errno.EINVAL, errno.ESRCH})
#: pidfd_open: ENOSYS before 5.3 (or filtered); ESRCH when the pid is gone.
_NO_PIDFD_OPEN = frozenset({errno.ENOSYS, errno.EPERM, errno.EINVAL})
#: How often :func:`memory_gone` asks, in seconds.
PROBE_INTERVAL = 0.2


class Watch(enum.Enum):
    """How the end of a peer is learned."""

    #: A pidfd from ``SO_PEERPIDFD``.
    PEER_PIDFD = "SO_PEERPIDFD"
    #: A pidfd from ``pidfd_open()`` on the ``SO_PEERCRED`` pid.
    PIDFD_OPEN = "pidfd_open"
    #: The peer had exited before it could be watched.
    EXITED = "exited"
    #: No pidfd: the kernel has neither way, or the pid is not visible from here.
    NONE = "none"


class PeerExit:
    """A pidfd for the process at the other end of a connection, or the reason there is none.

    Open it right after ``accept()``. It owns the pidfd: :meth:`close` it.
    """

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self._pidfd: int | None = None
        self.why_not = ""
        self.watch = self._open(conn, pid)

    def _open(self, conn: socket.socket, pid: int) -> Watch:
        try:
            self._pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
            return Watch.PEER_PIDFD
        except OSError as exc:
            if exc.errno in _PEER_GONE:
                return Watch.EXITED
            if exc.errno not in _NO_PEERPIDFD:
                raise
            reasons = [f"SO_PEERPIDFD: {os.strerror(exc.errno)} (Linux 6.5+ has it)"]
        if pid <= 0:
            reasons.append(
                "SO_PEERCRED gives pid 0: the peer is in a pid namespace not visible here"
            )
            self.why_not = "; ".join(reasons)
            return Watch.NONE
        try:
            self._pidfd = os.pidfd_open(pid)
            return Watch.PIDFD_OPEN
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return Watch.EXITED
            if exc.errno not in _NO_PIDFD_OPEN:
                raise
            reasons.append(f"pidfd_open: {os.strerror(exc.errno)} (Linux 5.3+ has it)")
        self.why_not = "; ".join(reasons)
        return Watch.NONE

    @property
    def watched(self) -> bool:
        """Whether :meth:`wait` can tell when the peer exits."""
        return self.watch is not Watch.NONE

    async def wait(self) -> None:
        """Return once the peer has exited; never, when it cannot be watched."""
        if self.watch is Watch.EXITED:
            return
        if self._pidfd is None:
            await anyio.sleep_forever()
        assert self._pidfd is not None
        await anyio.wait_readable(self._pidfd)

    def close(self) -> None:
        """Close the pidfd (telling the event loop first). Idempotent."""
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            try:
                anyio.notify_closing(fd)
            except RuntimeError:
                pass  # no event loop running here: nobody waits on it
            os.close(fd)

    def __enter__(self) -> PeerExit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@functools.cache
def _probe_address() -> int:
    """The lowest page ``mmap`` may hand out: never mapped, let alone registered, in practice."""
    try:
        with open("/proc/sys/vm/mmap_min_addr") as file:
            lowest = int(file.read())
    except (OSError, ValueError):
        lowest = 0
    return max(1 << 16, -(-lowest // PAGE_SIZE) * PAGE_SIZE)


def memory_alive(uffd: Userfaultfd) -> bool:
    """Whether the process whose memory ``uffd`` serves still has it (see the notes)."""
    if uffd.closed:
        return False
    probe = bytearray(_abi.ZEROPAGE.pack(_probe_address(), PAGE_SIZE, 0, 0))
    try:
        fcntl.ioctl(uffd.fileno(), _abi.UFFDIO_ZEROPAGE, probe, True)
    except OSError as exc:
        return exc.errno != errno.ESRCH  # ENOENT: alive; EAGAIN: alive, an event is unread
    return True


async def memory_gone(uffd: Userfaultfd, interval: float = PROBE_INTERVAL) -> None:
    """Return once the process whose memory ``uffd`` serves has exited, or ``uffd`` closed."""
    while memory_alive(uffd):
        await anyio.sleep(interval)
