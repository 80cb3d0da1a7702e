"""Memory to register, and ways to touch it without holding the GIL.

Kernel facts this module relies on:

* MISSING mode works on private anonymous memory, shmem (a memfd mapped
  MAP_SHARED) and hugetlbfs; WP on anonymous memory (and on shmem/hugetlbfs
  with WP_HUGETLBFS_SHMEM); MINOR only on shmem and hugetlbfs, where a page
  can be in the page cache yet not mapped in the registered view. Writing
  the contents through a second, unregistered view of the same memfd puts
  them in the page cache; UFFDIO_CONTINUE then maps them.
* Every access here goes through ctypes (``memmove`` or the ``_native``
  library), which releases the GIL: a registered page may fault and block
  the caller until an event loop in this same process resolves it.
* Hugetlb mappings fail with ENOMEM unless huge pages are reserved
  (``vm.nr_hugepages``).
* A thread that faults waits for the handler: when that thread is the one
  running the event loop that serves the fault, nothing ever resolves it.
  A page faults when its pte is empty (``/proc/self/pagemap``: neither
  present nor swapped) and its VMA is registered MISSING or MINOR
  (``um``/``ui`` in ``/proc/self/smaps``); a read never faults on WP. So a
  Region access on a thread where a fault server runs checks that first,
  and refuses (EDEADLK) rather than hang silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import struct
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ._abi import PAGE_SIZE
from ._checks import check_int
from ._errors import InvalidArgument, UffdError
from ._native import lib, libc

__all__ = [
    "BYTES_DATA_OFFSET",
    "MAP_ANONYMOUS",
    "MAP_HUGETLB",
    "MAP_NORESERVE",
    "MAP_PRIVATE",
    "MAP_SHARED",
    "Region",
    "buffer_address",
    "huge_page_size",
    "map_memory",
    "serving_here",
    "touch",
]

#: ``mmap(2)`` flags, for :func:`map_memory`.
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE = 0
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MADV_DONTNEED = 4
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_MFD_HUGETLB = 0x0004


def huge_page_size() -> int:
    """The default huge page size (``Hugepagesize`` in /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as meminfo:
            match = re.search(r"^Hugepagesize:\s+(\d+) kB", meminfo.read(), re.M)
    except OSError:
        match = None
    return int(match.group(1)) * 1024 if match else 2 * 1024 * 1024


def map_memory(length: int, flags: int, fd: int = -1, prot: int = _PROT_RW, addr: int = 0) -> int:
    """``mmap(2)`` through libc, outside Python's ``mmap`` objects: the address of the
    mapping, which the caller unmaps. Fails with :class:`UffdError`."""
    address = libc.mmap(addr or None, length, prot, flags, fd, 0)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise UffdError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    return int(address)


def _bytes_data_offset() -> int | None:
    """Where a ``bytes`` object's data starts from its ``id()`` (CPython), once checked."""
    if sys.implementation.name != "cpython":
        return None
    probe = bytes(range(16))
    offset = (ctypes.cast(ctypes.c_char_p(probe), ctypes.c_void_p).value or 0) - id(probe)
    return offset if 0 < offset <= 64 else None


#: Where a ``bytes`` object's data starts from its ``id()``, or None (not CPython, or
#: not as expected): the copy fast path's way to a ``bytes`` address without ctypes.
BYTES_DATA_OFFSET = _bytes_data_offset()


def buffer_address(data: Any) -> tuple[int, int, object]:
    """(address, nbytes, keepalive) of a contiguous bytes-like object.

    Hold ``keepalive`` until the address is no longer used. A read-only
    buffer that is not ``bytes`` is copied once.
    """
    if type(data) is bytes and BYTES_DATA_OFFSET is not None:
        return id(data) + BYTES_DATA_OFFSET, len(data), data  # what ctypes.c_char_p would hold
    if isinstance(data, bytes):
        pointer = ctypes.c_char_p(data)
        return ctypes.cast(pointer, ctypes.c_void_p).value or 0, len(data), pointer
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise TypeError(
            f"expected a contiguous bytes-like object, not {type(data).__name__}"
        ) from exc
    if view.readonly:
        return buffer_address(bytes(view))
    array = (ctypes.c_char * len(view)).from_buffer(view)
    return ctypes.addressof(array), len(view), array


#: Threads where a fault server runs now, and how many (see ``serving_here``).
_serving: dict[int, int] = {}
_FAULTING_VMFLAGS = frozenset({"um", "ui"})
_VMA_HEADER = re.compile(r"([0-9a-f]+)-([0-9a-f]+) ")
_PAGEMAP_PRESENT_OR_SWAPPED = 3 << 62


@contextlib.contextmanager
def serving_here() -> Iterator[None]:
    """Mark the calling thread (an event loop's) as serving faults while the block runs."""
    ident = threading.get_ident()
    _serving[ident] = _serving.get(ident, 0) + 1
    try:
        yield
    finally:
        if _serving[ident] == 1:
            del _serving[ident]
        else:
            _serving[ident] -= 1


def _would_fault(address: int, n: int) -> bool:
    """Whether touching ``[address, address + n)`` here would wait on a userfaultfd."""
    first, last = address // PAGE_SIZE, (address + n - 1) // PAGE_SIZE
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first * 8)
            entries = pagemap.read((last - first + 1) * 8)
    except OSError:
        return False  # cannot tell: let the access go ahead, as before
    empty = [
        (first + i) * PAGE_SIZE
        for i, (entry,) in enumerate(struct.iter_unpack("=Q", entries))
        if not entry & _PAGEMAP_PRESENT_OR_SWAPPED
    ]
    if not empty:
        return False
    with open("/proc/self/smaps") as smaps:
        start = end = 0
        for line in smaps:
            if line.startswith("VmFlags:"):
                if _FAULTING_VMFLAGS & set(line.split()[1:]) and any(
                    start <= page < end for page in empty
                ):
                    return True
            else:
                header = _VMA_HEADER.match(line)
                if header:
                    start, end = int(header[1], 16), int(header[2], 16)
    return False


def _refuse_on_the_serving_thread(what: str, address: int, n: int) -> None:
    if n and threading.get_ident() in _serving and _would_fault(address, n):
        raise UffdError(
            errno.EDEADLK,
            f"Region.{what}() of [{address:#x}, {address + n:#x}) would fault on the thread "
            "of the event loop that serves the faults: it would wait forever, since that "
            f"loop cannot run while it waits. Call it from a worker thread (await "
            f"anyio.to_thread.run_sync(region.{what}, ...)) or from native code in another "
            "thread",
        )


def touch(address: int, length: int, *, write: bool = True) -> None:
    """Access every page overlapping ``[address, address + length)``, without the GIL.

    ``write=True`` faults as a write but leaves the bytes as they were (an
    atomic ``or 0``). Call it from a thread: it blocks until each fault on a
    registered page is resolved.
    """
    check_int("address", address)
    check_int("length", length)
    if address <= 0 or length <= 0 or address + length > 1 << 64:
        raise InvalidArgument(
            errno.EINVAL, f"cannot touch {length} bytes at {address:#x}: not a valid range"
        )
    lib.ua_touch(address, length, PAGE_SIZE, 1 if write else 0)


class Region:
    """A mapping to register with a userfaultfd, unmapped by :meth:`close`.

    ``alias`` is a second view of the same pages (``shared`` and hugetlb
    ``shared=True`` regions only): writes through it fill the page cache
    without faulting, which is how MINOR faults get their contents.
    """

    address: int
    length: int
    page_size: int
    alias: Region | None
    memfd: int | None

    def __init__(
        self,
        address: int,
        length: int,
        *,
        page_size: int = PAGE_SIZE,
        alias: Region | None = None,
        memfd: int | None = None,
    ) -> None:
        for name, value in (("address", address), ("length", length), ("page_size", page_size)):
            check_int(name, value, minimum=1)
        if address % page_size or length % page_size:
            raise InvalidArgument(
                errno.EINVAL,
                f"[{address:#x}, +{length:#x}) is not aligned to the page size ({page_size})",
            )
        self.address = address
        self.length = length
        self.page_size = page_size
        self.alias = alias
        self.memfd = memfd
        self._mapped = True

    @classmethod
    def anonymous(cls, length: int) -> Region:
        """Private anonymous memory: MISSING and WP modes."""
        length = cls._checked_length(length, PAGE_SIZE)
        return cls(map_memory(length, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE), length)

    @classmethod
    def shared(cls, length: int) -> Region:
        """Shared memory backed by a memfd: MISSING, WP and MINOR modes."""
        return cls._memfd_backed(cls._checked_length(length, PAGE_SIZE), PAGE_SIZE, 0)

    @classmethod
    def hugetlb(cls, length: int, *, shared: bool = False) -> Region:
        """Huge pages (``MAP_HUGETLB``); ``shared=True`` is memfd-backed, for MINOR mode."""
        size = huge_page_size()
        length = cls._checked_length(length, size)
        try:
            if shared:
                return cls._memfd_backed(length, size, _MFD_HUGETLB)
            address = map_memory(length, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB)
        except OSError as exc:
            if exc.errno != errno.ENOMEM:
                raise
            raise UffdError(
                errno.ENOMEM,
                f"no free {size // 1024} KiB huge pages for {length} bytes: reserve some "
                f"with `sysctl vm.nr_hugepages={length // size}` (as root)",
            ) from exc
        return cls(address, length, page_size=size)

    @classmethod
    def _memfd_backed(cls, length: int, page_size: int, memfd_flags: int) -> Region:
        fd = os.memfd_create("uffd_async", os.MFD_CLOEXEC | memfd_flags)
        view = alias = 0
        try:
            os.ftruncate(fd, length)
            view = map_memory(length, MAP_SHARED, fd)
            alias = map_memory(length, MAP_SHARED, fd)
        except BaseException:
            for address in (view, alias):
                if address:
                    libc.munmap(address, length)
            os.close(fd)
            raise
        return cls(
            view,
            length,
            page_size=page_size,
            alias=cls(alias, length, page_size=page_size),
            memfd=fd,
        )

    @staticmethod
    def _checked_length(length: int, page_size: int) -> int:
        check_int("length", length)
        if length <= 0 or length % page_size or length >= 1 << 63:
            raise InvalidArgument(
                errno.EINVAL,
                f"length must be a positive multiple of the page size ({page_size}), not {length}",
            )
        return length

    @property
    def closed(self) -> bool:
        return not self._mapped

    def _span(self, offset: int, n: int) -> int:
        check_int("offset", offset)
        check_int("n", n)
        if not self._mapped:
            raise InvalidArgument(errno.EBADF, "the region is closed (unmapped)")
        if offset < 0 or n < 0 or offset + n > self.length:
            raise InvalidArgument(
                errno.EINVAL,
                f"[{offset}, {offset + n}) is outside the region's {self.length} bytes",
            )
        return self.address + offset

    def read(self, offset: int, n: int) -> bytes:
        """Copy ``n`` bytes out, without the GIL (a fault here waits for its handler;
        on the thread of the event loop that serves it, this raises EDEADLK instead)."""
        source = self._span(offset, n)
        if _serving:
            _refuse_on_the_serving_thread("read", source, n)
        out = bytearray(n)
        if n:
            ctypes.memmove((ctypes.c_char * n).from_buffer(out), source, n)
        return bytes(out)

    def write(self, offset: int, data: Any) -> None:
        """Copy ``data`` in, without the GIL (see :meth:`read` on faults)."""
        source, n, keepalive = buffer_address(data)
        target = self._span(offset, n)
        if _serving:
            _refuse_on_the_serving_thread("write", target, n)
        if n:
            ctypes.memmove(target, source, n)
        del keepalive

    def fill(self, offset: int, n: int, byte: int) -> None:
        """Set ``n`` bytes to ``byte``, without the GIL."""
        check_int("byte", byte, minimum=0, maximum=255)
        target = self._span(offset, n)
        if _serving:
            _refuse_on_the_serving_thread("fill", target, n)
        if n:
            ctypes.memset(target, byte, n)

    def discard(self, offset: int, n: int) -> None:
        """``madvise(MADV_DONTNEED)``: drop the pages; with EVENT_REMOVE this blocks
        until the handler reads the Remove event, so call it from a thread."""
        target = self._span(offset, n)
        if libc.madvise(target, n, _MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise(MADV_DONTNEED) failed: {os.strerror(err)}")

    def move(self) -> int:
        """``mremap()`` the whole region to a new address and return it.

        With EVENT_REMAP this blocks until the handler reads the Remap event,
        so call it from a thread. The registration moves with the pages.
        """
        self._span(0, 0)
        target = map_memory(
            self.length, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, prot=_PROT_NONE
        )
        moved = libc.mremap(
            self.address, self.length, self.length, _MREMAP_MAYMOVE | _MREMAP_FIXED, target
        )
        if moved is None or moved == _MAP_FAILED:
            err = ctypes.get_errno()
            libc.munmap(target, self.length)
            raise OSError(err, f"mremap failed: {os.strerror(err)}")
        self.address = int(moved)
        return self.address

    def close(self) -> None:
        """Unmap (with EVENT_UNMAP this blocks until the Unmap event is read)."""
        if not self._mapped:
            return
        self._mapped = False
        libc.munmap(self.address, self.length)
        if self.alias is not None:
            self.alias.close()
        if self.memfd is not None:
            os.close(self.memfd)
            self.memfd = None

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if not self._mapped else f"{self.address:#x}"
        return f"<Region {state} length={self.length} page_size={self.page_size}>"
