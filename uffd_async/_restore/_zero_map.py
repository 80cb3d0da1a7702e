"""Which pages of a snapshot file hold only zeros: those are mapped with ``UFFDIO_ZEROPAGE``.

Facts this module relies on:

* ``lseek(SEEK_DATA)`` / ``lseek(SEEK_HOLE)`` name a file's holes without reading
  anything (a file system that does not track holes reports one data range: the
  whole file). A hole reads as zeros; so may a page of data, which only a read of
  it tells.
* The data ranges are read with ``pread`` (a file cut short meanwhile reads short,
  where its mapping would raise SIGBUS) and scanned by the C helper
  (``ua_zero_pages``, no GIL held): it stops at a page's first non-zero 64
  bytes. Holes are never read (reading a hole through a shared mapping would fill
  the page cache with zeros), and neither is a page not in the page cache
  (``mincore`` on the mapping): the scan never waits for a disk, so a cold
  snapshot restored lazily does not read all of itself first. Such a page is
  taken for data: copied, as it always was.
* The map is one byte per base page (``PAGE_SIZE``), 1 for a zero page. A page
  the file only partly holds (a size not a multiple of pages) is never zero: the
  map stays conservative. Computed once per open snapshot, and kept in memory
  (scanning 256 MiB takes tens of milliseconds here: no sidecar): a handoff server
  scans in a worker thread as soon as it listens (``Snapshot.prepare``), so its first
  restore does not wait for it; without one, on first need. The snapshot keeps its
  file open until then.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re

from .._core._abi import PAGE_SIZE
from .._core._native import lib, libc

__all__ = ["data_ranges", "scan_zero_pages"]


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(first page, end page) of each range of the file that is not a hole, in order,
    widened to whole pages; ``[(0, pages)]`` when the file system cannot tell."""
    pages = -(-size // PAGE_SIZE)
    ranges: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here on
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            first, last = start // PAGE_SIZE, min(-(-end // PAGE_SIZE), pages)
            if ranges and ranges[-1][1] >= first:
                ranges[-1] = (ranges[-1][0], last)
            else:
                ranges.append((first, last))
            offset = end
    except OSError:  # no SEEK_DATA here (EINVAL): all of it is data
        return [(0, pages)]
    return ranges


#: Pages read into the scan's buffer at a time (1 MiB).
_WINDOW = 256
#: Runs of pages in memory, in ``mincore``'s vector (bit 0: resident).
_RESIDENT = re.compile(rb"[\x01-\xff]+")


def scan_zero_pages(fd: int, address: int, size: int, ranges: list[tuple[int, int]]) -> bytearray:
    """One byte per base page of the file open as ``fd`` and mapped at ``address`` (``size``
    bytes when opened), 1 where the page is all zeros: every page outside ``ranges``
    (holes), and those within that the scan finds zero.

    The pages are read with ``pread``, not through the mapping: a file cut short since
    it was opened gives a short read here (its pages from there on are taken for data:
    serving them fails as it always did), where the mapping would raise SIGBUS."""
    pages = -(-size // PAGE_SIZE)
    zeros = bytearray(b"\1") * pages
    whole = size // PAGE_SIZE
    window = bytearray(_WINDOW * PAGE_SIZE)
    window_at = ctypes.addressof((ctypes.c_uint8 * len(window)).from_buffer(window))
    out = ctypes.addressof((ctypes.c_uint8 * pages).from_buffer(zeros)) if pages else 0
    for first, end in ranges:
        end = min(end, whole)
        if first >= end:
            continue
        zeros[first:end] = bytes(end - first)  # data, but what the scan finds zero
        vector = (ctypes.c_uint8 * (end - first))()
        if libc.mincore(address + first * PAGE_SIZE, (end - first) * PAGE_SIZE, vector) != 0:
            continue  # cannot tell what is in memory: read none of it
        for match in _RESIDENT.finditer(bytes(vector)):
            run, stop = first + match.start(), first + match.end()
            while run < stop:
                length = min(stop - run, _WINDOW)
                got = os.preadv(fd, [memoryview(window)[: length * PAGE_SIZE]], run * PAGE_SIZE)
                got //= PAGE_SIZE
                lib.ua_zero_pages(window_at, got, PAGE_SIZE, out + run)
                if got < length:  # cut short since it was opened (see below)
                    break
                run += length
    cut = os.fstat(fd).st_size // PAGE_SIZE  # the last page held in part is not zero either
    if cut < pages:  # cut short since it was opened: nothing is zero from its end on
        zeros[cut:] = bytes(pages - cut)
    return zeros
