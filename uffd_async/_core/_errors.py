"""Every exception the library raises, in one place.

Each one subclasses :class:`UffdError` (an :class:`OSError`, so ``errno`` is
set) and, where a caller already catches a builtin for that situation, the
builtin too: ``except FileExistsError`` sees :class:`PageExists`,
``except ValueError`` sees :class:`InvalidArgument`. Messages say what to do.
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar

from ._abi import Feature


class UffdError(OSError):
    """A userfaultfd operation failed.

    ``done`` is how many bytes a range operation had completed (and, unless it
    ran with ``wake=False``, woken) before it failed; 0 when nothing was done.
    """

    done: int

    def __init__(self, err: int, message: str, *, done: int = 0) -> None:
        super().__init__(err, message)
        self.done = done

    def __str__(self) -> str:
        return str(self.strerror)


class UnsupportedFeature(UffdError):
    """The kernel (or this handle's handshake) lacks what was asked for."""

    missing: Feature

    def __init__(self, missing: Feature, message: str) -> None:
        super().__init__(_errno.EINVAL, message)
        self.missing = missing


class UffdPermissionError(UffdError, PermissionError):
    """This process may not open a userfaultfd the way it asked; see the message."""


class PageExists(UffdError, FileExistsError):
    """EEXIST: a page in the range was already populated.

    The kernel does *not* wake threads faulting on that page. Call
    :meth:`Userfaultfd.wake` for the range, or they stay blocked.
    """


class MappingChanged(UffdError):
    """EAGAIN: a non-cooperative event (remove, remap, unmap, fork) is unread.

    Every resolving ioctl fails this way until the handler reads the pending
    events. Read them, apply them, and retry; ``done`` bytes already landed.
    """


class ProcessExited(UffdError, ProcessLookupError):
    """ESRCH: the process whose memory this uffd serves has exited."""


class InvalidArgument(UffdError, ValueError):
    """An argument the kernel would reject (or did reject with EINVAL), or that the
    library refuses before any syscall (see ``_checks``); the message names it."""


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument of the wrong type (a bool or a float where an int belongs, ...).

    Also a :class:`TypeError`, which is what a caller catches for a wrong type.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)


class UffdClosed(UffdError):
    """The handle was closed; its fd number may already belong to someone else."""

    def __init__(self, message: str = "the userfaultfd handle is closed") -> None:
        super().__init__(_errno.EBADF, message)


class DecodeError(UffdError, ValueError):
    """Bytes that are not a sequence of whole, known ``uffd_msg`` records."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EPROTO, message)


class HandoffError(UffdError, ValueError):
    """A peer's uffd handoff (Firecracker's page-fault-handler protocol) was refused.

    Every fd that arrived with the message has been closed. ``mapping`` is the
    index of the offending mapping and ``field`` its JSON field, when the
    fault lies there; both are ``None`` otherwise.
    """

    _ERRNO: ClassVar[int] = _errno.EPROTO

    mapping: int | None
    field: str | None

    def __init__(
        self, message: str, *, mapping: int | None = None, field: str | None = None
    ) -> None:
        super().__init__(self._ERRNO, message)
        self.mapping = mapping
        self.field = field


class HandoffRefused(HandoffError, PermissionError):
    """The peer runs as a uid that may not hand us a uffd; nothing was read from it."""

    _ERRNO: ClassVar[int] = _errno.EACCES

    pid: int
    uid: int

    def __init__(self, message: str, *, pid: int, uid: int) -> None:
        super().__init__(message)
        self.pid = pid
        self.uid = uid


class HandoffTimeout(HandoffError, TimeoutError):
    """The peer did not send its uffd in time (it connected, then said nothing)."""

    _ERRNO: ClassVar[int] = _errno.ETIMEDOUT


class TakeoverError(HandoffError):
    """Taking over from a running server failed: it is not there, it refused (another
    control protocol version, another uid), or the exchange broke off. The running
    server keeps serving whatever it served."""


class NoSourcePage(UffdError, LookupError):
    """The fault is outside what the resolver can serve (past the source, or unmapped)."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)


class WorkingSetError(UffdError, ValueError):
    """A working-set file that is not one, is damaged, or is of a version this cannot read."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)


class SnapshotClosed(UffdError):
    """A snapshot was closed while a resolver made from it was still serving."""

    def __init__(self, path: str) -> None:
        super().__init__(
            _errno.EBADF,
            f"the snapshot {path!r} is closed: stop the servers that use it before closing it",
        )


class LayerError(UffdError, ValueError):
    """A snapshot layer that cannot be used: a file that is not one, or is damaged,
    truncated or of another version; a layer for another image; a chain whose layer does
    not apply on top of what is below it; or pages left unwritten at commit.

    The message names the file and what is wrong with it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)


class FetchError(UffdError):
    """A snapshot's bytes could not be fetched (HTTP): after the retries, or not retriable.

    The message names the URL without its query string (a presigned URL carries
    credentials there), the byte range and the HTTP status; ``status`` is
    ``None`` when no response came (connection refused or dropped, timeout).
    The faults that waited on those bytes get what the server's ``on_error``
    says (poison by default): never bytes that were not checked.
    """

    url: str
    start: int
    end: int
    status: int | None

    def __init__(
        self,
        message: str,
        *,
        url: str,
        start: int,
        end: int,
        status: int | None = None,
        err: int = _errno.EIO,
    ) -> None:
        super().__init__(err, message)
        self.url = url
        self.start = start
        self.end = end
        self.status = status


class SourceChanged(FetchError):
    """The object changed since the source was opened (its ETag or Last-Modified did).

    Nothing more is fetched from it: a process restored from two versions of a
    snapshot would hold memory that never existed. Open a new source.
    """

    def __init__(
        self, message: str, *, url: str, start: int, end: int, status: int | None = None
    ) -> None:
        super().__init__(message, url=url, start=start, end=end, status=status, err=_errno.ESTALE)
