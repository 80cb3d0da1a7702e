"""PAGEMAP_SCAN: which write-protected pages were written, re-protected in one walk.

Kernel facts (Documentation/admin-guide/mm/pagemap.rst, "PAGEMAP_SCAN"):

* On a range registered WP with ``UFFD_FEATURE_WP_ASYNC``, a write to a
  protected page is resolved by the kernel itself (no event, no wait): it
  clears the page's uffd-wp bit, which PAGEMAP_SCAN reports as
  ``PAGE_IS_WRITTEN``.
* ``PM_SCAN_WP_MATCHING`` write-protects every reported page during the same
  walk, so no write can fall between "read the set" and "protect again";
  ``PM_SCAN_CHECK_WPASYNC`` makes the call fail unless the range really is
  in async WP mode.
* The walk stops early when the output vector is full; ``walk_end`` says
  where, and the next call continues from there.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from . import _abi
from ._errors import UffdError

_VECTOR_LEN = 512


def scan_written(start: int, end: int, *, reprotect: bool = True) -> list[tuple[int, int]]:
    """The written ranges in ``[start, end)`` of this process, re-protecting them."""
    vector = (ctypes.c_uint64 * (3 * _VECTOR_LEN))()
    flags = _abi.PM_SCAN_CHECK_WPASYNC | (_abi.PM_SCAN_WP_MATCHING if reprotect else 0)
    ranges: list[tuple[int, int]] = []
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        position = start
        while position < end:
            arg = bytearray(
                _abi.PM_SCAN_ARG.pack(
                    _abi.PM_SCAN_ARG.size,
                    flags,
                    position,
                    end,
                    0,
                    ctypes.addressof(vector),
                    _VECTOR_LEN,
                    0,
                    0,
                    _abi.PAGE_IS_WRITTEN,
                    0,
                    _abi.PAGE_IS_WRITTEN,
                )
            )
            try:
                count = fcntl.ioctl(fd, _abi.PAGEMAP_SCAN, arg, True)
            except OSError as exc:
                hint = ""
                if exc.errno == errno.EPERM:
                    hint = " (the range is not registered WP on a uffd with WP_ASYNC)"
                raise UffdError(
                    exc.errno or errno.EIO, f"PAGEMAP_SCAN failed: {exc.strerror}{hint}"
                ) from None
            for i in range(count):
                ranges.append((vector[3 * i], vector[3 * i + 1]))
            walk_end = _abi.PM_SCAN_ARG.unpack(arg)[4]
            if walk_end <= position:
                break
            position = walk_end
    finally:
        os.close(fd)
    return ranges
