"""One way to write a file that must survive a crash: every writer of the library uses it.

Live images, layers, squashed images and working sets are written here. Facts
this relies on (``man 2 rename``, ``man 2 fsync``, ``man 2 open``):

* ``rename`` within one filesystem is atomic: a reader sees the old file or
  the whole new one. So the new file is written under a temporary name in the
  target's directory (``.NAME.<random>.partial``) and renamed over it only
  once complete; an error or a cancellation before that removes it, and the
  old file stays as it was.
* Data reaches the disk only after ``fsync`` of the file (``msync`` first for
  bytes written through a shared mapping), and the rename only after
  ``fsync`` of the directory: without the second, a crash can bring back the
  old file, or no file, after a commit returned.
* ``open(O_CREAT)`` applies the umask to its mode, so the file is created
  with the final mode and then ``fchmod``-ed to exactly that mode (0600 for
  anything holding memory): no window in which another user could open it,
  and no umask, however permissive or strict, changes it.
* ``O_EXCL`` on the temporary name: never write into a file someone else
  made there.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
from typing import IO, Any

from ._errors import InvalidArgument
from ._memory import MAP_SHARED, map_memory
from ._native import libc

__all__ = ["PRIVATE", "AtomicFile", "MappedFile", "write_atomically"]

#: The mode of every file that holds memory: its owner's alone.
PRIVATE = 0o600
_MS_SYNC = 4


class AtomicFile:
    """A file of ``size`` bytes written under a temporary name next to ``path``, created
    with ``mode``; :meth:`commit` makes it appear at ``path``, :meth:`abort` removes it."""

    def __init__(
        self, path: str | os.PathLike[str], size: int = 0, *, reserve: bool = False,
        mode: int = PRIVATE,
    ) -> None:  # fmt: skip
        self.path = os.fspath(path)
        directory, name = os.path.split(os.path.abspath(self.path))
        self._directory = directory
        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.partial")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.fd = os.open(temporary, flags, mode)
        self._temporary: str | None = temporary
        try:
            os.fchmod(self.fd, mode)  # whatever the umask took away, or left
            if reserve and size:
                try:
                    os.posix_fallocate(self.fd, 0, size)
                except OSError as exc:  # a filesystem without it: no reservation, that is all
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
            os.ftruncate(self.fd, size)
        except BaseException:
            self.abort()
            raise

    @property
    def closed(self) -> bool:
        """Committed or aborted."""
        return self._temporary is None

    def pwrite(self, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def commit(self) -> None:
        """fsync, rename over ``path``, fsync the directory (so the rename is durable too)."""
        assert self._temporary is not None, "committed or aborted already"
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self._temporary, self.path)
        self._temporary = None
        fsync_directory(self._directory)

    def abort(self) -> None:
        """Close and remove the temporary file; ``path`` keeps what it held. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        temporary, self._temporary = self._temporary, None
        if temporary is not None:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = PRIVATE) -> None:
    """``data`` at ``path``, whole, or (on any error) the old file untouched."""
    file = AtomicFile(path, mode=mode)
    try:
        file.pwrite(data, 0)
        file.commit()
    except BaseException:
        file.abort()
        raise


class MappedFile:
    """A file of ``size`` bytes mapped shared at :attr:`address`, so that pages are written
    straight into it (the C loop saves a live snapshot's pages there).

    ``dest``: a path (written through an :class:`AtomicFile`, renamed over it at commit),
    or an open binary file, truncated and written in place (its mode is the caller's).
    """

    def __init__(self, dest: str | os.PathLike[str] | IO[bytes], size: int) -> None:
        self.size = size
        self.address = 0
        self._atomic: AtomicFile | None = None
        if isinstance(dest, (str, os.PathLike)):
            self._atomic = AtomicFile(dest, size)
            self.fd = self._atomic.fd
        else:
            try:
                dest.flush()  # what it buffered must not land over the image later
                self.fd = dest.fileno()
            except (AttributeError, OSError) as exc:
                raise InvalidArgument(
                    errno.EINVAL, f"dest must be a path or a binary file with a fileno: {exc}"
                ) from None
        try:
            if self._atomic is None:
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, size)
            self.address = map_memory(
                size, MAP_SHARED, self.fd, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        """msync and fsync; then, for a path, the rename and the directory's fsync."""
        if libc.msync(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size), _MS_SYNC):
            raise OSError(ctypes.get_errno(), "msync of the image failed")
        self._unmap()
        if self._atomic is not None:
            self._atomic.commit()
        else:
            os.fsync(self.fd)
        self.fd = -1

    def abort(self) -> None:
        """Unmap, and for a path remove the temporary file. Idempotent."""
        self._unmap()
        if self._atomic is not None:
            self._atomic.abort()
        self.fd = -1

    def _unmap(self) -> None:
        address, self.address = self.address, 0
        if address:
            libc.munmap(address, self.size)
