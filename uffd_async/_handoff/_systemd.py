"""systemd's notify and socket-activation protocols, over the socket module.

No dependency: the whole protocol is a datagram and a few environment
variables, and the maintained libraries (``sdnotify``, ``systemd-python``)
either lack fd passing or need libsystemd and a compiler.

Kernel and systemd facts this module relies on:

* ``$NOTIFY_SOCKET`` names a Unix datagram socket: a filesystem path
  (starts with ``/``) or an abstract name (starts with ``@``, which stands
  for the leading NUL). A message is newline-separated ``KEY=value`` lines
  (``READY=1``, ``STOPPING=1``, ``STATUS=...``, ``FDSTORE=1``,
  ``FDNAME=...``, ``FDSTOREREMOVE=1``), sent as one datagram; fds for the fd
  store ride along as ``SCM_RIGHTS``. systemd learns the sender from the
  socket's credentials, so nothing else is needed. An unset variable means
  no service manager is listening: nothing to do. (``vsock:`` addresses,
  used inside VMs, are not supported here and count as "not under systemd".)
* Socket activation passes fds from 3 up: ``$LISTEN_FDS`` says how many,
  ``$LISTEN_PID`` which process they are for (a child that inherited the
  environment must not take them), ``$LISTEN_FDNAMES`` their
  colon-separated names (``FileDescriptorName=``, ``--fdname``; missing
  names are ``"unknown"``, as in libsystemd). The fds arrive without
  ``FD_CLOEXEC``: set it, or every child process inherits a copy of the
  listening socket. The variables are unset once read so children do not
  see fds that are not theirs.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Sequence

from .._core._errors import InvalidArgument

__all__ = ["LISTEN_FDS_START", "listen_fds", "notify"]

logger = logging.getLogger("uffd_async")

LISTEN_FDS_START = 3


def notify(*fields: str, fds: Sequence[int] = ()) -> bool:
    """Send ``KEY=value`` fields (and ``fds``, for ``FDSTORE=1``) to the service manager.

    True once the datagram is delivered; False when not under a service
    manager (no ``$NOTIFY_SOCKET``) or when delivery failed (logged as a
    warning: readiness or status is never worth stopping the server for).
    """
    for field in fields:
        if "=" not in field or "\n" in field or "\0" in field:
            raise InvalidArgument(
                errno.EINVAL,
                f"a notify field is one KEY=value line with no NUL, not {field!r}",
            )
    for fd in fds:
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise InvalidArgument(errno.EINVAL, f"an fd to pass is a non-negative int, not {fd!r}")
    address = _notify_address()
    if address is None:
        return False
    message = "\n".join(fields).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never wait for a service manager that stopped reading (its queue is 10
            # datagrams by default): that would stop the event loop. EAGAIN is a failed
            # delivery; the fd store pushes again what did not get there.
            sock.sendmsg([message], ancillary, socket.MSG_DONTWAIT, address)
    except OSError as exc:
        logger.warning("could not notify the service manager at %r: %s", address, exc)
        return False
    return True


def _notify_address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("/"):
        return path
    if path.startswith("@") and len(path) > 1:
        return "\0" + path[1:]
    if path:
        logger.warning("NOTIFY_SOCKET=%r is not a path or an @abstract name: not notifying", path)
    return None


def listen_fds(unset_environment: bool = True) -> list[tuple[int, str]]:
    """The fds socket activation passed to this process, as ``(fd, name)``; ``[]`` if none.

    Each fd gets ``FD_CLOEXEC``. With ``unset_environment`` (the default)
    the ``LISTEN_*`` variables are removed, whatever they held.
    """
    try:
        return _read_listen_fds()
    finally:
        if unset_environment:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)


def _read_listen_fds() -> list[tuple[int, str]]:
    pid_text = os.environ.get("LISTEN_PID")
    if not pid_text:
        return []
    pid = _parse_count("LISTEN_PID", pid_text)
    if pid != os.getpid():
        return []  # inherited from a parent: they are not ours
    count = _parse_count("LISTEN_FDS", os.environ.get("LISTEN_FDS", "0"))
    names_text = os.environ.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text is not None else ["unknown"] * count
    if len(names) != count:
        raise InvalidArgument(
            errno.EINVAL,
            f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} fds: "
            "the service manager's environment is inconsistent",
        )
    passed = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names, strict=True):
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as exc:
            raise InvalidArgument(
                errno.EBADF, f"LISTEN_FDS={count} but fd {fd} is not open: {exc.strerror}"
            ) from None
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        passed.append((fd, name))
    return passed


def _parse_count(variable: str, text: str) -> int:
    if not text.isdigit():
        raise InvalidArgument(
            errno.EINVAL, f"{variable}={text!r} is not a non-negative decimal number"
        )
    return int(text)
