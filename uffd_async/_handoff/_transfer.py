"""Handing a userfaultfd over a Unix socket, as Firecracker does: both ends.

Protocol and kernel facts this module relies on:

* Firecracker connects to the handler's Unix stream socket and sends *one*
  ``sendmsg``: the JSON mappings (:mod:`._wire`) as data, the uffd as one
  ``SCM_RIGHTS`` fd; forks of Firecracker add the guest memory's memfd as a
  second fd. Its example handlers read that with one ``recvmsg`` into a buffer
  of about 1 KiB. Nothing frames the message: it is what that one ``recvmsg``
  returns, and the connection stays open afterwards.
* On a stream socket the kernel attaches passed fds to the first chunk (skb)
  of a ``sendmsg``, about 36 KiB with default buffers, and a ``recvmsg`` that
  receives fds stops after that chunk. A larger message can never arrive whole
  with its fds, so :func:`send_uffd` refuses to send one; a message received
  that way, refused, with bytes still queued behind it (``FIONREAD``), was
  cut there, and is reported as too long rather than as bad JSON.
* ``SO_PEERCRED`` gives the peer's pid, effective uid and gid as of its
  ``connect()`` (or ``socketpair()``); the pid is 0 when the peer lives in
  another pid namespace. The uid is checked before anything is read: a
  refused peer's fds stay queued in the socket, and the kernel releases them
  when the caller closes it.
* Received fds are installed in our fd table at once; ``MSG_CMSG_CLOEXEC``
  makes them close-on-exec atomically. An ancillary buffer of
  ``CMSG_SPACE(2 * 4)`` holds exactly two fds: with more, the kernel installs
  the two that fit, drops the rest and sets ``MSG_CTRUNC``. ``MSG_TRUNC``
  means a datagram or seqpacket message did not fit; a stream message is
  read with one byte to spare, and that byte arriving means it was too long.
* A uffd is an anonymous inode: ``/proc/self/fd/N`` reads
  ``anon_inode:[userfaultfd]``. ``poll()`` reports ``POLLERR`` on a uffd that
  is blocking or not yet handshaken (``UFFDIO_API``). ``O_NONBLOCK`` belongs to
  the open file description, shared with the sender, so setting it here is
  seen there too (Firecracker never reads its copy).
* The memfd is a regular file (shmem or hugetlbfs); its size bounds the
  mappings' offsets.
* The sender did the ``UFFDIO_API`` handshake, which succeeds once per fd
  (:mod:`uffd_async._core._open`): which features it enabled cannot be
  learned, so the handle records none. Both ends run on the same kernel,
  though, so the features the kernel *offers* (``UFFDIO_POISON`` among them,
  the safe answer when a resolver fails) are learned once per process on a
  throwaway uffd. No range ioctl depends on the features the sender enabled.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import os
import select
import socket
import stat
import struct
import termios
from collections.abc import Collection, Sequence

import anyio
import attrs

from .._core._abi import Feature
from .._core._checks import check_int, check_seconds
from .._core._errors import (
    HandoffError,
    HandoffRefused,
    HandoffTimeout,
    InvalidArgument,
    InvalidArgumentType,
)
from .._core._open import available_features, methods_for
from .._core._uffd import Userfaultfd
from ._wire import (
    DEFAULT_MAX_REGIONS,
    GuestMapping,
    MessageShape,
    check_limits,
    encode_mappings,
    parse_message,
)

#: Bound on the mappings message a receiver reads; Firecracker's fits in 1 KiB.
DEFAULT_MAX_MESSAGE = 64 * 1024
#: Seconds a connected peer has to send its uffd.
DEFAULT_TIMEOUT = 5.0
#: The largest message whose fds and bytes arrive together on a stream socket.
STREAM_MESSAGE_LIMIT = 32 * 1024

_ANCILLARY_SIZE = socket.CMSG_SPACE(2 * array.array("i").itemsize)
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_UFFD_LINK = "anon_inode:[userfaultfd]"


def _fd_cell(fd: int | None) -> list[int]:
    return [] if fd is None else [fd]


@attrs.frozen(kw_only=True, eq=False)
class Handoff:
    """What a peer handed over: its uffd, its mappings, maybe its memfd, and who it is.

    The handoff owns the uffd and the memfd: :meth:`close` (or ``with``)
    closes both, after which :attr:`memfd` is ``None``. To keep the memfd past
    that, ``os.dup`` it. ``pid``, ``uid`` and ``gid`` are the peer's, from
    ``SO_PEERCRED`` (``pid`` is 0 when the peer is in another pid namespace).
    ``shape`` says which Firecracker release the message looks like, and so
    whether the peer's hangup can mean that it exited.
    """

    uffd: Userfaultfd
    mappings: tuple[GuestMapping, ...]
    pid: int
    uid: int
    gid: int
    shape: MessageShape = MessageShape.PAGE_SIZE
    # A mutable cell, so that close() can forget the number (the class is frozen).
    _memfd: list[int] = attrs.field(
        alias="memfd", converter=_fd_cell, repr=lambda cell: repr(cell[0] if cell else None)
    )

    @property
    def memfd(self) -> int | None:
        """The guest memory file's fd, when the peer sent one; ``None`` once closed."""
        return self._memfd[0] if self._memfd else None

    def close(self) -> None:
        """Close the uffd (waking the peer's blocked threads) and the memfd. Idempotent."""
        try:
            self.uffd.close()
        finally:
            if self._memfd:
                os.close(self._memfd.pop())

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def send_uffd(
    sock: socket.socket,
    uffd: Userfaultfd | int,
    regions: Sequence[GuestMapping] | bytes,
    *,
    memfd: int | None = None,
) -> None:
    """Hand ``uffd`` (and ``memfd``) to the peer in one ``sendmsg``, exactly as Firecracker does.

    ``regions`` are encoded with :func:`encode_mappings`; raw ``bytes`` are
    sent as they are. The sender keeps its own fds open.
    """
    payload = regions if isinstance(regions, bytes) else encode_mappings(regions)
    if not payload:
        raise InvalidArgument(
            errno.EINVAL, "the message is empty: a stream socket would drop the fds with it"
        )
    if sock.type == socket.SOCK_STREAM and len(payload) > STREAM_MESSAGE_LIMIT:
        raise InvalidArgument(
            errno.EMSGSIZE,
            f"the {len(payload)}-byte message is larger than {STREAM_MESSAGE_LIMIT} bytes: on a "
            "stream socket the receiver would get only its first part with the fds",
        )
    fds = array.array("i", [_fd_number("uffd", uffd)])
    if memfd is not None:
        fds.append(_fd_number("memfd", memfd))
    sent = sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if sent != len(payload):
        raise HandoffError(
            f"only {sent} of the {len(payload)} message bytes were sent (is the socket "
            "non-blocking and full?): the peer got the fds with a truncated message"
        )


def _fd_number(name: str, fd: Userfaultfd | int) -> int:
    if isinstance(fd, Userfaultfd):
        return fd.fileno()
    if check_int(name, fd, expected="an open fd") < 0:
        raise InvalidArgumentType(f"{name} must be an open fd, not {fd!r}")
    return fd


def allowed_uid_set(allowed_uids: Collection[int] | None) -> frozenset[int]:
    """Our own effective uid, plus ``allowed_uids``: who may hand a uffd over."""
    extra = frozenset() if allowed_uids is None else frozenset(allowed_uids)
    for uid in extra:
        check_int("each of allowed_uids", uid, minimum=0, expected="a uid (an int >= 0)")
    return extra | {os.geteuid()}


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from ``SO_PEERCRED``."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


async def receive_uffd(
    sock: socket.socket,
    *,
    allowed_uids: Collection[int] | None = None,
    max_message: int = DEFAULT_MAX_MESSAGE,
    timeout: float = DEFAULT_TIMEOUT,
    backing_size: int | None = None,
    max_regions: int = DEFAULT_MAX_REGIONS,
) -> Handoff:
    """Receive a peer's uffd handoff from the connected Unix socket ``sock``.

    The peer is untrusted. Its uid must be our own effective uid or one of
    ``allowed_uids`` (pass the uid Firecracker runs as, e.g. the jailer's,
    to accept it), checked before anything is read. It has
    ``timeout`` seconds to send one message of at most ``max_message`` bytes
    carrying one fd (the uffd) or two (the uffd and the guest memfd), whose
    mappings must lie within ``backing_size`` bytes (default: the memfd's
    size, when one came; unchecked otherwise).

    Any failure raises :class:`HandoffError` (:class:`HandoffRefused` for the
    uid, :class:`HandoffTimeout` for silence) after closing every fd that
    arrived. ``sock`` is left non-blocking and open: the caller closes it.
    """
    if sock.family != socket.AF_UNIX:
        raise InvalidArgument(errno.EINVAL, f"a handoff needs a Unix socket, not {sock!r}")
    check_int("max_message", max_message, minimum=1)
    check_seconds("timeout", timeout)
    check_limits(backing_size, max_regions)
    pid, uid, gid = peer_credentials(sock)
    allowed = allowed_uid_set(allowed_uids)
    if uid not in allowed:
        raise HandoffRefused(
            f"refused the handoff from pid {pid}: it runs as uid {uid}, not one of "
            f"{sorted(allowed)} (add it to allowed_uids to accept it)",
            pid=pid,
            uid=uid,
        )
    sock.setblocking(False)
    received: list[int] = []
    try:
        try:
            with anyio.fail_after(timeout):
                data, flags = await _receive(sock, max_message + 1, received)
        except TimeoutError:
            raise HandoffTimeout(
                f"pid {pid} connected but sent no uffd within {timeout} seconds"
            ) from None
        try:
            return _accept(
                data,
                flags,
                received,
                pid=pid,
                uid=uid,
                gid=gid,
                max_message=max_message,
                backing_size=backing_size,
                max_regions=max_regions,
            )
        except HandoffError as exc:
            _refuse_a_cut_message(sock, len(data), max_message, received, exc)
            raise
    except BaseException:
        for fd in received:
            os.close(fd)
        raise


async def _receive(sock: socket.socket, size: int, received: list[int]) -> tuple[bytes, int]:
    """One ``recvmsg``; the fds it brought go into ``received`` before anything can fail."""
    while True:
        await anyio.wait_readable(sock)
        try:
            data, ancillary, flags, _ = sock.recvmsg(size, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise HandoffError(f"receiving the handoff failed: {exc}") from exc
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                received.extend(fds)
        return data, flags


def _refuse_a_cut_message(
    sock: socket.socket, arrived: int, max_message: int, fds: list[int], exc: HandoffError
) -> None:
    """A message that arrived with its fds, was refused, and has more bytes queued behind
    it was cut where the kernel stops a ``recvmsg`` with fds: say it is too long, not that
    its first part is bad JSON."""
    if not fds or sock.type != socket.SOCK_STREAM:
        return
    queued = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, queued)
    except OSError:
        return
    if not queued[0]:
        return
    total = arrived + queued[0]
    if total > max_message:
        raise HandoffError(
            f"the message is longer than max_message={max_message} bytes ({total} or more arrived)"
        ) from exc
    raise HandoffError(
        f"the message is longer than the {arrived} bytes a stream delivers with its fds "
        f"({total} or more were sent): keep it under {STREAM_MESSAGE_LIMIT} bytes"
    ) from exc


def _accept(
    data: bytes,
    flags: int,
    fds: list[int],
    *,
    pid: int,
    uid: int,
    gid: int,
    max_message: int,
    backing_size: int | None,
    max_regions: int,
) -> Handoff:
    """Validate what one ``recvmsg`` brought; the caller closes ``fds`` if this raises."""
    if flags & socket.MSG_CTRUNC:
        raise HandoffError(
            "the peer sent more than two fds (or other control data): a handoff carries "
            "the uffd and at most the guest memfd"
        )
    if flags & socket.MSG_TRUNC or len(data) > max_message:
        raise HandoffError(f"the message is longer than max_message={max_message} bytes")
    if not data and not fds:
        raise HandoffError("peer closed the connection before sending its uffd")
    if not fds:
        raise HandoffError("the message carried no fd: the uffd must come with it (SCM_RIGHTS)")
    if len(fds) > 2:
        raise HandoffError(f"the message carried {len(fds)} fds; a handoff has one or two")
    uffd_fd = fds[0]
    _check_uffd(uffd_fd)
    memfd = fds[1] if len(fds) == 2 else None
    if memfd is not None:
        size = _memfd_size(memfd)
        if backing_size is None:
            backing_size = size
    mappings, shape = parse_message(data, backing_size=backing_size, max_regions=max_regions)
    return Handoff(
        uffd=Userfaultfd._adopt(uffd_fd, available=kernel_features()),
        mappings=tuple(mappings),
        shape=shape,
        memfd=memfd,
        pid=pid,
        uid=uid,
        gid=gid,
    )


@functools.cache
def kernel_features() -> Feature:
    """The features this kernel offers, learned once; none if this process may open no uffd."""
    for method in methods_for(None):
        try:
            return available_features(method)
        except OSError:
            continue
    return Feature(0)


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise HandoffError(f"cannot inspect the received fd {fd}: {exc}") from exc


def _check_uffd(fd: int) -> None:
    """The first fd must be a handshaken userfaultfd; make it non-blocking, as readers need."""
    what = _describe(fd)
    if what != _UFFD_LINK:
        raise HandoffError(f"the first fd must be a userfaultfd, not {what}")
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if any(events & select.POLLERR for _, events in poller.poll(0)):
        raise HandoffError("the peer's userfaultfd was never handshaken (UFFDIO_API)")


def _memfd_size(fd: int) -> int:
    """The second fd must be the guest memory file; its size bounds the mappings."""
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        raise HandoffError(
            f"the second fd must be the guest memory file (a memfd), not {_describe(fd)}"
        )
    return status.st_size
