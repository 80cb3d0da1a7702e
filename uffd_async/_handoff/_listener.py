"""The handoff server's listening Unix socket: its file, who may connect, and accepting.

Kernel facts this module relies on:

* ``connect()`` to a filesystem Unix socket needs write permission on the
  socket file (and search permission on every directory above it). ``bind()``
  creates the file with the process's umask (``srwxr-xr-x`` under the usual
  022), so by default nobody but its owner may connect: a jailed Firecracker
  running as another uid gets EACCES. The mode and group are set here after
  ``bind()`` and before ``listen()``: nobody can connect in between.
* An abstract socket (a name starting with NUL) has no file, no mode and no
  owner: any process in the network namespace may connect.
* A path left behind by a server that died is a socket nobody listens on
  (``connect`` gets ECONNREFUSED): it is replaced. A path where someone
  listens, or that is not a socket, is left alone. On the way out the socket
  file is removed, unless something else has replaced it since.
* A listening socket passed in (systemd's socket activation, a predecessor's
  handover) has its file made and owned by whoever bound it: systemd keeps
  listening on its own copy after ours is closed, so closing ours never
  removes the file. ``SO_ACCEPTCONN`` says whether a socket listens.
* ``accept()`` fails with EMFILE, ENFILE, ENOBUFS or ENOMEM when fds or
  memory run out for a moment: worth a retry after a pause, not the end.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat
from collections.abc import Sequence

import anyio

from .._core._errors import InvalidArgument

__all__ = ["LISTEN_FD_NAME", "Listener", "passed_listening_socket"]

logger = logging.getLogger("uffd_async")

_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESOURCE_BACKOFF = 0.1
#: The name (``FileDescriptorName=``, ``systemd-socket-activate --fdname``) that marks the
#: handoff socket among the fds socket activation passes.
LISTEN_FD_NAME = "handoff"


def check_socket_access(path: str, mode: int | None, group: int | str | None) -> int | None:
    """Refuse a mode or group for a socket that has no file, before anything is created;
    the group's gid. (Their values were checked by :class:`~._options.PeerPolicy`.)"""
    if (mode is not None or group is not None) and _abstract(path):
        raise InvalidArgument(
            errno.EINVAL,
            "an abstract socket has no file, so no mode or group: drop socket_mode/socket_group "
            "or use a filesystem path",
        )
    if group is None:
        return None
    if isinstance(group, str):
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise InvalidArgument(errno.EINVAL, f"no group named {group!r}") from None
    return group


class Listener:
    """A listening, non-blocking Unix stream socket at ``path``; closing removes its file."""

    def __init__(self, path: str, *, mode: int | None = None, gid: int | None = None) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._identity: tuple[int, int] | None = None
        try:
            self._bind()
            if not _abstract(path):
                if gid is not None:
                    os.chown(path, -1, gid)
                if mode is not None:
                    os.chmod(path, mode)
            self._sock.listen()
            self._sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    @classmethod
    def adopt(cls, sock: socket.socket) -> Listener:
        """Wrap a listening socket passed in (socket activation); closing it closes this
        copy only and never removes its file, which belongs to whoever bound it.
        Anything but a listening Unix stream socket is refused (:class:`InvalidArgument`)."""
        problem = _not_listening(sock)
        if problem:
            raise InvalidArgument(
                errno.EINVAL,
                f"the socket passed in (fd {sock.fileno()}) {problem}: the handoff server "
                "needs a listening Unix stream socket",
            )
        listener = cls.__new__(cls)
        name = sock.getsockname()
        listener.path = name if isinstance(name, str) else name.decode(errors="replace")
        listener._sock = sock
        listener._identity = None  # not ours to unlink
        sock.setblocking(False)
        return listener

    def fileno(self) -> int:
        return self._sock.fileno()

    def keep_file(self) -> None:
        """Leave the socket file when closing: a successor listens on it now."""
        self._identity = None

    def _bind(self) -> None:
        path = self.path
        try:
            try:
                self._sock.bind(path)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or _abstract(path):
                    raise
                _remove_stale(path)
                self._sock.bind(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT,
                f"cannot create the socket {path}: its directory "
                f"{os.path.dirname(os.path.abspath(path))} does not exist",
            ) from None
        except (FileExistsError, InvalidArgument):
            raise
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot create the socket {path}: {exc.strerror}") from None
        if not _abstract(path):
            status = os.stat(path)
            self._identity = (status.st_dev, status.st_ino)

    async def accept(self) -> socket.socket | None:
        """The next connection, or None when accept() failed in a way worth retrying."""
        await anyio.wait_readable(self._sock)
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return None
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRORS:
                raise
            logger.error("accepting a connection failed (%s); retrying shortly", exc)
            await anyio.sleep(_RESOURCE_BACKOFF)
            return None
        return conn

    def close(self) -> None:
        """Stop listening and remove the socket file, unless it was replaced meanwhile."""
        if self._sock.fileno() >= 0:
            try:
                anyio.notify_closing(self._sock)
            except RuntimeError:
                pass  # no event loop here: nobody waits on it
        self._sock.close()
        identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            status = os.lstat(self.path)
            if (status.st_dev, status.st_ino) == identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def passed_listening_socket(
    passed: Sequence[tuple[int, str]],
) -> tuple[socket.socket | None, list[tuple[int, str]]]:
    """The handoff socket among the ``(fd, name)`` socket activation passed, and the fds
    left for others (a service's fd store). It is the one named :data:`LISTEN_FD_NAME`,
    else the only listening socket passed (or the only socket); None when no socket was
    passed (bind as usual).
    Several unnamed listening sockets, or a named fd that is no listening Unix stream
    socket, are refused (:class:`InvalidArgument`)."""
    named = [fd for fd, name in passed if name == LISTEN_FD_NAME]
    if len(named) > 1:
        raise InvalidArgument(
            errno.EINVAL, f"socket activation passed {len(named)} fds named {LISTEN_FD_NAME!r}"
        )
    if named:
        chosen = named[0]
    else:
        listening = [fd for fd, _ in passed if _listens(fd)]
        if not listening:  # the only socket passed, if one: refused below, saying why
            listening = [fd for fd, _ in passed if stat.S_ISSOCK(os.fstat(fd).st_mode)]
        if not listening:
            return None, list(passed)
        if len(listening) > 1:
            raise InvalidArgument(
                errno.EINVAL,
                f"socket activation passed {len(listening)} sockets: name the handoff "
                f"one FileDescriptorName={LISTEN_FD_NAME} (--fdname={LISTEN_FD_NAME})",
            )
        chosen = listening[0]
    try:
        sock = socket.socket(fileno=chosen)
    except OSError as exc:
        raise InvalidArgument(
            errno.EINVAL, f"the fd passed as the handoff socket ({chosen}) is not a socket: {exc}"
        ) from None
    problem = _not_listening(sock)
    if problem:
        sock.detach()  # still the service manager's fd: left as it came
        raise InvalidArgument(
            errno.EINVAL,
            f"the socket passed in (fd {chosen}) {problem}: the handoff server needs a "
            "listening Unix stream socket (ListenStream=/a/path in the .socket unit)",
        )
    return sock, [(fd, name) for fd, name in passed if fd != chosen]


def _listens(fd: int) -> bool:
    """Whether ``fd`` is a listening socket (of any kind), without taking it over."""
    try:
        probe = socket.socket(fileno=fd)
    except OSError:
        return False  # not a socket: a uffd, a memfd
    try:
        return bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    finally:
        probe.detach()


def _not_listening(sock: socket.socket) -> str | None:
    """What keeps ``sock`` from being a listening Unix stream socket, or None."""
    if sock.family != socket.AF_UNIX:
        return f"is not a Unix socket ({getattr(sock.family, 'name', sock.family)})"
    if sock.type != socket.SOCK_STREAM:
        return f"is not a stream socket ({getattr(sock.type, 'name', sock.type)})"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "does not listen"
    return None


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
