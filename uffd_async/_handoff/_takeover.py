"""Handing a running server's peers to its successor: the control socket and the exchange.

A successor (``serve --takeover``, ``HandoffServer(..., takeover=True)``) connects
to the running server's control socket, and gets its listening socket, every
live uffd with what serving it needs (:mod:`._succession`), and the peers'
connections; the running server then exits. Kernel facts this relies on:

* The control socket is abstract (a name that starts with NUL), derived from
  the handoff socket's path: no file to leave behind when a server is killed,
  no mode to get wrong; who connects is checked with ``SO_PEERCRED`` on both
  ends (the same effective uid, or nothing is said). Abstract names live in
  the network namespace: a successor runs in the same one.
* ``SOCK_SEQPACKET`` keeps message boundaries, and each message carries its
  own fds: at most ``SCM_MAX_FD`` (253) fds per ``sendmsg``, so they travel
  in batches. Passed fds are new references to the same open files: a uffd
  stays registered while any process holds it, so the running server may
  close its copies once the successor has them (a fork child's uffd too,
  which nobody else holds).
* The kernel delivers a fault once, to whoever reads it. The running server
  stops reading before it sends anything, and wakes the faults it read and
  did not answer (``UFFDIO_WAKE``: each thread faults again, and the successor
  reads it); faults that come meanwhile wait in the uffd. So nothing is lost
  and nothing is read twice, and no thread waits longer than the exchange.
* The successor says ``ACK`` once it holds every fd; from then on the running
  server never serves again, and says ``DONE``. Before ``ACK`` (the successor
  died, refused, or is silent past the timeout) it resumes serving: the
  successor serves only after ``DONE``, so the two never read at once.
* The state is a sealed memfd (``F_SEAL_WRITE``): whatever its size, it goes
  as one fd, and the receiver reads it knowing nobody can change it under it.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable

import anyio
import attrs

from .._core._errors import TakeoverError
from ._succession import (
    MAX_LINE,
    MAX_STATE,
    VERSIONS,
    Reply,
    Succession,
    choose_version,
    decode_state,
    encode_acceptance,
    encode_hello,
    encode_refusal,
    encode_state,
    parse_hello,
    parse_reply,
)
from ._transfer import peer_credentials

__all__ = [
    "ControlSocket",
    "Taken",
    "control_address",
    "offer",
    "read_state",
    "sealed_memfd",
    "take_over",
]

logger = logging.getLogger("uffd_async")

#: Seconds each step of the exchange may take before the other end counts as gone.
DEFAULT_TIMEOUT = 5.0
#: ``SCM_MAX_FD``: the most fds one ``sendmsg`` may carry.
FDS_PER_MESSAGE = 253
_STATE = b"STATE"
_FDS = b"FDS"
_COUNT = struct.Struct("<I")
_ANCILLARY = socket.CMSG_SPACE(FDS_PER_MESSAGE * array.array("i").itemsize)
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK


def control_address(path: str) -> str:
    """The abstract control socket of the handoff socket at ``path``."""
    key = path if path.startswith("\0") else os.path.abspath(path)
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    return f"\0uffd_async/takeover/{digest}"


class ControlSocket:
    """The listening control socket a running server offers its successor."""

    def __init__(self, path: str, sock: socket.socket | None = None) -> None:
        self.address = control_address(path)
        if sock is not None:  # a predecessor's, handed over
            self.sock = sock
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                self.sock.bind(self.address)
                self.sock.listen()
            except OSError as exc:
                self.sock.close()
                raise TakeoverError(
                    f"cannot offer a takeover on {path}: another server holds its control "
                    f"socket ({exc.strerror})"
                ) from None
        self.sock.setblocking(False)

    async def accept(self) -> socket.socket:
        while True:
            await anyio.wait_readable(self.sock)
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                continue
            conn.setblocking(False)
            return conn

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            try:
                anyio.notify_closing(self.sock)
            except RuntimeError:
                pass
        self.sock.close()

    def __enter__(self) -> ControlSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- the running server's end ------------------------------------------------------------


@attrs.define(eq=False)
class Offered:
    """What a running server, stopped for its successor, sends: the state and its fds (the
    state's indexes are positions in ``fds``); ``resume`` if the successor fails it, and
    ``commit`` once it has everything."""

    state: Succession
    fds: list[int]
    resume: Callable[[], None]
    commit: Callable[[], None]


async def offer(
    conn: socket.socket,
    stop: Callable[[int], Awaitable[Offered]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """Run the running server's end of one exchange on ``conn``; True once handed over.

    ``stop(version)`` stops serving and returns what to send. Nothing raises
    out of here: a refusal or a broken exchange is logged, and the server,
    resumed, goes on serving.
    """
    pid, uid, _ = peer_credentials(conn)
    if uid != os.geteuid():
        logger.warning(
            "refused a takeover by pid %d: it runs as uid %d, not %d", pid, uid, os.geteuid()
        )
        return False
    try:
        offered = parse_hello(await _receive(conn, MAX_LINE + 1, timeout))
    except (TakeoverError, TimeoutError, OSError) as exc:
        logger.warning("refused a takeover by pid %d: %s", pid, exc)
        _send_quietly(conn, encode_refusal(f"not a takeover hello ({exc})"))
        return False
    version = choose_version(offered)
    if version is None:
        reason = (
            f"this server (pid {os.getpid()}) speaks takeover protocol versions "
            f"{', '.join(map(str, VERSIONS))}; the successor offered "
            f"{', '.join(map(str, offered))}"
        )
        logger.warning("refused a takeover by pid %d: %s; serving on", pid, reason)
        _send_quietly(conn, encode_refusal(reason))
        return False
    conn.send(encode_acceptance(version))
    logger.info("handing over to pid %d (takeover protocol version %d)", pid, version)
    try:
        offered_state = await stop(version)
    except TakeoverError as exc:  # it resumed serving already
        logger.warning("cannot hand over to pid %d: %s; serving on", pid, exc)
        _send_quietly(conn, encode_refusal(str(exc)))
        return False
    try:
        await _send_state(conn, encode_state(offered_state.state), offered_state.fds)
        answer = await _receive(conn, MAX_LINE, timeout)
        if answer != Reply.ACK.value:
            raise TakeoverError(f"the successor did not acknowledge: {answer[:40]!r}")
    except BaseException as exc:
        offered_state.resume()
        if not isinstance(exc, Exception):
            raise
        logger.warning("the handover to pid %d failed (%s): serving on", pid, exc)
        return False
    offered_state.commit()
    _send_quietly(conn, Reply.DONE.value)
    logger.info("handed over to pid %d", pid)
    return True


def sealed_memfd(data: bytes) -> int:
    """A memfd holding ``data``, sealed: nobody can change it afterwards."""
    memfd = os.memfd_create("uffd_async-succession", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _write_all(memfd, data)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


async def _send_state(conn: socket.socket, state: bytes, fds: list[int]) -> None:
    memfd = sealed_memfd(state)
    try:
        await _send(conn, _STATE + _COUNT.pack(len(fds)), [memfd])
    finally:
        os.close(memfd)
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        await _send(conn, _FDS, fds[start : start + FDS_PER_MESSAGE])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _send(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while True:
        try:
            conn.sendmsg([data], ancillary)
            return
        except BlockingIOError:
            await anyio.wait_writable(conn)


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.send(data)
    except OSError:
        pass


async def _receive(conn: socket.socket, size: int, timeout: float) -> bytes:
    """One message (a line); TimeoutError after ``timeout`` seconds of silence."""
    with anyio.fail_after(timeout):
        while True:
            await anyio.wait_readable(conn)
            try:
                return conn.recv(size)
            except BlockingIOError:
                continue


async def _receive_fds(conn: socket.socket, timeout: float, into: list[int]) -> bytes:
    """One message and its fds (appended to ``into`` before anything can fail)."""
    with anyio.fail_after(timeout):
        while True:
            await anyio.wait_readable(conn)
            try:
                data, ancillary, flags, _ = conn.recvmsg(64, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                continue
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    into.extend(fds)
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                raise TakeoverError("a takeover message was cut short (too many fds or bytes)")
            return data


# -- the successor's end --------------------------------------------------------------------


@attrs.define(eq=False)
class Taken:
    """What a successor received: the state, its fds (owned here until taken), the exchange."""

    state: Succession
    fds: list[int | None]
    #: The exchange with the running server (None: the fds came from systemd's fd store).
    conn: socket.socket | None
    timeout: float

    def take(self, index: int) -> int:
        """Own fd ``index`` from now on (it is no longer closed by :meth:`close`)."""
        fd = self.fds[index]
        if fd is None:
            raise TakeoverError(f"fd {index} of the takeover was taken twice")
        self.fds[index] = None
        return fd

    async def confirm(self) -> None:
        """Say every fd is held; return once the running server stopped for good."""
        assert self.conn is not None
        await _send(self.conn, Reply.ACK.value, [])
        try:
            answer = await _receive(self.conn, MAX_LINE, self.timeout)
        except TimeoutError:
            raise TakeoverError("the running server did not confirm the handover") from None
        if answer != Reply.DONE.value:
            raise TakeoverError(
                "the running server went on serving (the handover timed out there): "
                "nothing was taken over"
            )

    def close(self) -> None:
        """Close the exchange and every fd not taken."""
        for index, fd in enumerate(self.fds):
            if fd is not None:
                self.fds[index] = None
                os.close(fd)
        if self.conn is not None:
            self.conn.close()


async def take_over(path: str, *, timeout: float = DEFAULT_TIMEOUT) -> Taken:
    """Connect to the server running on ``path`` and receive everything it serves.

    Raises :class:`TakeoverError` (and the running server goes on serving) if
    nobody runs there, it runs as another uid, it refuses (another protocol
    version), or the exchange breaks off. The caller takes the fds it uses,
    calls :meth:`Taken.confirm`, then :meth:`Taken.close`.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            conn.connect(control_address(path))
        except (ConnectionRefusedError, FileNotFoundError):
            raise TakeoverError(
                f"no server runs on {path} to take over from (nothing listens for a successor)"
            ) from None
        conn.setblocking(False)
        pid, uid, _ = peer_credentials(conn)
        if uid != os.geteuid():
            raise TakeoverError(
                f"the server on {path} (pid {pid}) runs as uid {uid}, not {os.geteuid()}: "
                "only the same user may take it over"
            )
        conn.send(encode_hello())
        try:
            parse_reply(await _receive(conn, MAX_LINE + 1, timeout))
            received: list[int] = []
            try:
                head = await _receive_fds(conn, timeout, received)
                taken = _received(head, received, conn, timeout)
            except BaseException:
                for fd in received:
                    os.close(fd)
                raise
            try:
                await _receive_all_fds(taken)
            except BaseException:
                taken.close()
                raise
            return taken
        except TimeoutError:
            raise TakeoverError(f"the server on {path} (pid {pid}) did not answer") from None
    except BaseException:
        conn.close()
        raise


def _received(head: bytes, received: list[int], conn: socket.socket, timeout: float) -> Taken:
    if head.startswith(b"NO "):  # it accepted, then could not stop
        parse_reply(head)
    if not head.startswith(_STATE) or len(head) != len(_STATE) + _COUNT.size or len(received) != 1:
        raise TakeoverError("the running server's first message is not its state")
    (count,) = _COUNT.unpack_from(head, len(_STATE))
    memfd = received.pop()
    try:
        state_bytes = read_state(memfd)
    finally:
        os.close(memfd)
    state = decode_state(state_bytes, fds=count)
    return Taken(state=state, fds=[], conn=conn, timeout=timeout)


async def _receive_all_fds(taken: Taken) -> None:
    """Receive the fds the state names, in batches, into ``taken.fds``."""
    expected = taken.state.fds
    assert taken.conn is not None
    while len(taken.fds) < expected:
        batch: list[int] = []
        try:
            head = await _receive_fds(taken.conn, taken.timeout, batch)
        finally:
            taken.fds.extend(batch)
        if head != _FDS or not batch or len(taken.fds) > expected:
            raise TakeoverError(f"the takeover sent other than the {expected} fds its state names")


def read_state(fd: int) -> bytes:
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_STATE + 64:
        raise TakeoverError("the takeover state is not a memfd of a sane size")
    if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE:
        raise TakeoverError("the takeover state memfd is not sealed against writes")
    chunks = []
    offset = 0
    while offset < status.st_size:
        chunk = os.pread(fd, status.st_size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
