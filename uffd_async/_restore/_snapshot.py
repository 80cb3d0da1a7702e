"""A memory snapshot file, mapped read-only once: the source every resolver of it copies from.

Kernel facts this module relies on:

* A snapshot file holds the guest's memory regions laid end to end; a mapping
  (:class:`~uffd_async._restore._guest_mapping.GuestMapping`) says where its bytes
  start in the file. Serving them is :mod:`._snapshot_resolver`'s.
* The file is mapped read-only, once: ``UFFDIO_COPY`` then copies straight
  from the page cache into the faulting process, with no copy in Python. An
  access the file cannot back (it was truncated) makes the ioctl fail with
  EFAULT; nothing here ever touches the bytes itself (but ``read``, and the
  identity's samples).
* Pages that hold only zeros (holes, and data pages found all zero: :mod:`._zero_map`)
  are mapped with ``UFFDIO_ZEROPAGE``, never copied; not for hugetlbfs mappings,
  which have no ZEROPAGE (their huge pages are copied like any other).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import stat
import threading

from .._capture._identity import snapshot_identity
from .._capture._layer_file import MAGIC as LAYER_MAGIC
from .._core._abi import PAGE_SIZE
from .._core._errors import InvalidArgument, SnapshotClosed
from .._core._memory import MAP_SHARED, Region, map_memory
from .._core._native import libc
from .._serve._resolvers import CopyFrom
from ._guest_mapping import GuestMapping
from ._source import SnapshotSource
from ._zero_map import data_ranges, scan_zero_pages

__all__ = ["Snapshot"]


class Snapshot(SnapshotSource):
    """A memory snapshot file, mapped read-only once and shared by every resolver made from it.

    Close it (or leave its ``with`` block) only once no resolver of it is
    serving: a resolver of a closed snapshot refuses to serve (its faults
    then get what the server's ``on_error`` says) rather than copy from an
    address that may hold something else by then.

    With ``zero_pages`` (the default), its pages that hold only zeros are mapped with
    ``UFFDIO_ZEROPAGE`` rather than copied (learnt on first need: holes, then a scan).
    """

    def __init__(self, path: str | os.PathLike[str], *, zero_pages: bool = True) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise InvalidArgument(
                    errno.EINVAL, f"the snapshot {self.path!r} is not a regular file"
                )
            if status.st_size == 0:
                raise InvalidArgument(
                    errno.EINVAL, f"the snapshot {self.path!r} is empty: there is nothing to serve"
                )
            if os.pread(fd, len(LAYER_MAGIC), 0) == LAYER_MAGIC:
                raise InvalidArgument(
                    errno.EINVAL,
                    f"{self.path!r} is a layer file, not a snapshot: serve its base image with "
                    "the layer on top (LayeredSnapshot(BASE, LAYER); on the command line: "
                    "serve BASE --layer LAYER)",
                )
            self.size = status.st_size
            self._data_ranges = data_ranges(fd, self.size) if zero_pages else None
            self._address = map_memory(self.size, MAP_SHARED, fd, prot=mmap.PROT_READ)
            # Kept for the zero-page scan (see _zero_map), closed once it is done.
            self._scan_fd = os.dup(fd) if zero_pages else -1
            self._zeros: bytearray | None = None
            self._scanning = threading.Lock()
        finally:
            os.close(fd)  # the mapping keeps the file

    @property
    def closed(self) -> bool:
        return self._address == 0

    @functools.cached_property
    def identity(self) -> bytes:
        """What a working set recorded for this snapshot carries (see ``snapshot_identity``)."""
        if self.closed:
            raise SnapshotClosed(self.path)
        return snapshot_identity(self._address, self.size)

    @functools.cached_property
    def zero_map(self) -> bytes:
        """One byte per base page (``PAGE_SIZE``), 1 where the page holds only zeros; all
        0 when made with ``zero_pages=False``. Scanned on first use, then kept."""
        return bytes(self._zero_map)

    @property
    def _zero_map(self) -> bytearray:
        zeros = self._zeros
        if zeros is None:
            with self._scanning:  # one scan, in whichever thread gets here first
                if self._zeros is None:
                    self._zeros = self._scan()
                zeros = self._zeros
        return zeros

    def _scan(self) -> bytearray:
        self.check_open()
        if self._data_ranges is None:
            return bytearray(-(-self.size // PAGE_SIZE))
        try:
            return scan_zero_pages(self._scan_fd, self._address, self.size, self._data_ranges)
        finally:
            self._close_scan_fd()

    def prepare(self) -> None:
        """Scan for zero pages now (thread-safe): a server does it while it waits for its
        first process, so that process's restore does not wait for the scan."""
        if not self.closed:
            self._zero_map  # noqa: B018 (scanned and kept)

    def _close_scan_fd(self) -> None:
        fd, self._scan_fd = self._scan_fd, -1
        if fd >= 0:
            os.close(fd)

    def _zeros_of(self, mapping: GuestMapping) -> bytearray | None:
        """The zero map of ``mapping``'s base pages, or None (``zero_pages=False``); a
        copier of huge pages ignores it (hugetlbfs has no ZEROPAGE)."""
        if self._data_ranges is None:
            return None
        first = mapping.offset // PAGE_SIZE
        return self._zero_map[first : first + mapping.size // PAGE_SIZE]

    # -- the SnapshotSource interface ------------------------------------------------------

    @property
    def fetch_unit(self) -> int:
        """A page: any page is copied alone, straight from the mapping."""
        return PAGE_SIZE

    @property
    def mappable(self) -> bool:
        return True

    def check_open(self) -> None:
        if self.closed:
            raise SnapshotClosed(self.path)

    async def version(self) -> bytes:
        """Its :attr:`identity`."""
        return self.identity

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the snapshot from ``offset`` (a copy)."""
        self.check_open()
        self.check_span(offset, length)
        return self._read(offset, length)

    def _read(self, offset: int, length: int) -> bytes:
        return ctypes.string_at(self._address + offset, length)

    def copier(self, mapping: GuestMapping, *, readahead: int = 0, wp: bool = False) -> CopyFrom:
        """The resolver of one mapping's pages (``readahead``: as for ``copy_from``; the
        pages of a file are never write-protected)."""
        if wp:
            raise InvalidArgument(errno.EINVAL, "wp=True is not offered for a Snapshot source")
        return self._copier(mapping, readahead)

    def _copier(self, mapping: GuestMapping, readahead: int) -> CopyFrom:
        """The resolver of one mapping's pages: UFFDIO_COPY straight from the page cache."""
        return CopyFrom(
            self._view(mapping),
            base=mapping.base_host_virt_addr,
            size=mapping.size,
            readahead=readahead,
            wp=False,
            page_size=mapping.page_size,
            zeros=self._zeros_of(mapping),
        )

    def _view(self, mapping: GuestMapping) -> Region:
        """The mapping's bytes in the file, as a source for ``copy_from`` (never closed)."""
        if self.closed:
            raise SnapshotClosed(self.path)
        return Region(self._address + mapping.offset, mapping.size, page_size=mapping.page_size)

    def close(self) -> None:
        """Unmap the file (once a scan under way in another thread is done). Idempotent."""
        with self._scanning:
            address, self._address = self._address, 0
            self._close_scan_fd()
        if address:
            libc.munmap(address, self.size)

    async def aclose(self) -> None:
        """:meth:`close` (for ``async with``)."""
        self.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<Snapshot{state} {self.path!r} size={self.size}>"
