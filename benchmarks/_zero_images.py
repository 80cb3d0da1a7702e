"""Scenario 6's zero-heavy snapshots: what real snapshots look like, mostly zeros.

Two images, each the size of scenario 6's snapshot:

* **memory image**: a real Python process's memory (``_memory_image``, the one
  scenario 10 serves), its untouched pages zeros;
* **guest-like**: 10% data (runs of 1 to 64 pages at seeded places, each page
  distinct), the rest zeros, half of them holes (never written: the file is
  sparse there) and half written zero pages (in the file, all zero bytes), as a
  guest's snapshot holds both.

:func:`zero_share` says what share of an image's pages are zero, and what share
are holes, so the report shows what each image is.

Kernel facts this module relies on:

* On tmpfs (and ext4, xfs), ``lseek(SEEK_DATA)``/``lseek(SEEK_HOLE)`` find the
  holes of a sparse file; a range written with zero bytes is data, not a hole.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from pathlib import Path

from ._c import native
from ._runs import boot_set

PAGE = 4096
DATA = 0.1  # of the guest-like image's pages
BLOCK = 128  # pages: the first half of each block is written zeros, the rest holes
SEED = 21


def guest_like_image(path: Path, pages: int) -> None:
    """Write the guest-like image of ``pages`` pages at ``path`` (see the module's note)."""
    runs = boot_set(pages, random.Random(SEED), fraction=DATA)
    size = pages * PAGE
    zeros = bytes(BLOCK // 2 * PAGE)
    with open(path, "w+b") as f:
        f.truncate(size)
        for block in range(0, pages, BLOCK):
            f.seek(block * PAGE)
            f.write(zeros[: min(BLOCK // 2, pages - block) * PAGE])
        f.flush()
        with mmap.mmap(f.fileno(), size) as view:
            buffer = (ctypes.c_char * size).from_buffer(view)
            for first, length in runs:
                native().fill_pattern(ctypes.addressof(buffer) + first * PAGE, length, PAGE)
            del buffer


def zero_share(path: Path) -> dict[str, float]:
    """The share of ``path``'s pages that are zero (holes included), and of holes alone."""
    size = path.stat().st_size
    pages = size // PAGE
    if not pages:
        return {"zero_pages": 0.0, "holes": 0.0}
    hole_bytes = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        at = 0
        while at < size:
            try:
                hole = os.lseek(fd, at, os.SEEK_HOLE)
            except OSError:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:  # ENXIO: a hole to the end
                data = size
            hole_bytes += data - hole
            at = data
    finally:
        os.close(fd)
    zero_page = bytes(PAGE)
    zeros = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            zeros += sum(1 for i in range(0, len(chunk), PAGE) if chunk[i : i + PAGE] == zero_page)
    return {"zero_pages": zeros / pages, "holes": hole_bytes // PAGE / pages}
