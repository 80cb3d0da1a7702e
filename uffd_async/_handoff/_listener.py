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

import anyio

from .._core._errors import InvalidArgument

__all__ = ["Listener"]

logger = logging.getLogger("uffd_async")

_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESOURCE_BACKOFF = 0.1


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
