"""The kernel's userfaultfd ABI: numbers, flags and struct layouts, nothing else.

Kernel facts this module relies on (uapi ``linux/userfaultfd.h`` and
``man 2 ioctl_userfaultfd``):

* ``UFFD_API`` is 0xAA; ioctl numbers live in type 0xAA, ``nr`` 0x00-0x3F.
  The installed uapi header predates ``UFFDIO_MOVE`` (nr 0x05, Linux 6.8) and
  ``UFFDIO_POISON`` (nr 0x08, Linux 6.6), so both are spelled out here.
* Every struct is a sequence of native 64-bit words; the result field that
  some ioctls write back (``copy``, ``zeropage``, ``mapped``, ``updated``,
  ``move``) is a *signed* 64-bit: bytes done, or a negative errno. Reading it
  unsigned turns -EAGAIN into an enormous byte count.
* ``struct uffd_msg`` is packed and exactly 32 bytes (``read()`` returns whole
  ones: :mod:`._events`).
* Newer kernels add feature and ioctl bits. The flag enums below keep bits
  they do not name (``IntFlag`` boundary KEEP), so an unknown bit is carried,
  never rejected.

Careful: ``~Flag.X`` on these enums inverts only the *named* bits; mask with
plain ints when bits beyond the named ones may be present.
"""

from __future__ import annotations

import enum
import mmap
import struct

PAGE_SIZE: int = mmap.PAGESIZE

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int, type_: int = 0xAA) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


# Struct layouts. "=" keeps native byte order with no padding: every field is
# a full word, matching the kernel's __u64/__s64 layout.
API = struct.Struct("=QQQ")  # api, features (in/out), ioctls (out)
RANGE = struct.Struct("=QQ")  # start, len
REGISTER = struct.Struct("=QQQQ")  # range, mode, ioctls (out)
COPY = struct.Struct("=QQQQq")  # dst, src, len, mode, copy (out, signed)
ZEROPAGE = struct.Struct("=QQQq")  # range, mode, zeropage (out, signed)
WRITEPROTECT = struct.Struct("=QQQ")  # range, mode
CONTINUE = struct.Struct("=QQQq")  # range, mode, mapped (out, signed)
POISON = struct.Struct("=QQQq")  # range, mode, updated (out, signed)
MOVE = struct.Struct("=QQQQq")  # dst, src, len, mode, move (out, signed)
MSG = struct.Struct("=BBHI24s")  # event, reserved x3, 24-byte union

assert API.size == 24 and RANGE.size == 16 and REGISTER.size == 32
assert COPY.size == 40 and ZEROPAGE.size == 32 and WRITEPROTECT.size == 24
assert CONTINUE.size == 32 and POISON.size == 32 and MOVE.size == 40
assert MSG.size == 32

# The union members of uffd_msg, unpacked from its 24 bytes.
MSG_PAGEFAULT = struct.Struct("=QQI4x")  # flags, address, feat.ptid
MSG_FORK = struct.Struct("=I20x")  # ufd
MSG_REMAP = struct.Struct("=QQQ")  # from, to, len
MSG_REMOVE = struct.Struct("=QQ8x")  # start, end (UNMAP shares it)

# ioctl command numbers.
USERFAULTFD_IOC_NEW = _ioc(_IOC_NONE, 0x00, 0)  # on /dev/userfaultfd
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0x00, REGISTER.size)
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0x01, RANGE.size)
UFFDIO_WAKE = _ioc(_IOC_READ, 0x02, RANGE.size)
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, 0x03, COPY.size)
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, 0x04, ZEROPAGE.size)
UFFDIO_MOVE = _ioc(_IOC_READ | _IOC_WRITE, 0x05, MOVE.size)
UFFDIO_WRITEPROTECT = _ioc(_IOC_READ | _IOC_WRITE, 0x06, WRITEPROTECT.size)
UFFDIO_CONTINUE = _ioc(_IOC_READ | _IOC_WRITE, 0x07, CONTINUE.size)
UFFDIO_POISON = _ioc(_IOC_READ | _IOC_WRITE, 0x08, POISON.size)
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, API.size)

assert UFFDIO_API == 0xC018AA3F and UFFDIO_REGISTER == 0xC020AA00
assert UFFDIO_COPY == 0xC028AA03 and UFFDIO_WAKE == 0x8010AA02

# Mode bits of the individual ioctls.
COPY_MODE_DONTWAKE = 1 << 0
COPY_MODE_WP = 1 << 1
ZEROPAGE_MODE_DONTWAKE = 1 << 0
WRITEPROTECT_MODE_WP = 1 << 0
WRITEPROTECT_MODE_DONTWAKE = 1 << 1
CONTINUE_MODE_DONTWAKE = 1 << 0
CONTINUE_MODE_WP = 1 << 1  # Linux 6.1
POISON_MODE_DONTWAKE = 1 << 0
MOVE_MODE_DONTWAKE = 1 << 0
MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

# uffd_msg.event codes (they start at 0x12 on purpose, to catch stray zeros).
EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16


class Feature(enum.IntFlag):
    """``UFFD_FEATURE_*``: bits asked for at the API handshake.

    Some turn behaviour on (events, SIGBUS, THREAD_ID, WP_ASYNC); others only
    report what the kernel can do (the *_SHMEM and *_HUGETLBFS bits, POISON,
    MOVE). Asking for a bit the kernel lacks fails the handshake.
    """

    #: Write-protect faults are reported (register with Mode.WP).
    PAGEFAULT_FLAG_WP = 1 << 0
    #: fork() of a registered process duplicates the uffd: a Fork event.
    EVENT_FORK = 1 << 1
    #: mremap() of a registered range: a Remap event.
    EVENT_REMAP = 1 << 2
    #: MADV_DONTNEED / MADV_REMOVE on a registered range: a Remove event.
    EVENT_REMOVE = 1 << 3
    #: MISSING mode works on hugetlbfs.
    MISSING_HUGETLBFS = 1 << 4
    #: MISSING mode works on shmem (memfd, MAP_SHARED anonymous, tmpfs).
    MISSING_SHMEM = 1 << 5
    #: munmap() of a registered range: an Unmap event.
    EVENT_UNMAP = 1 << 6
    #: Faults raise SIGBUS in the faulting thread instead of an event.
    SIGBUS = 1 << 7
    #: Page fault events carry the faulting thread's id.
    THREAD_ID = 1 << 8
    #: MINOR mode works on hugetlbfs.
    MINOR_HUGETLBFS = 1 << 9
    #: MINOR mode works on shmem.
    MINOR_SHMEM = 1 << 10
    #: Fault addresses are exact, not rounded down to the page.
    EXACT_ADDRESS = 1 << 11
    #: WP mode works on shmem and hugetlbfs.
    WP_HUGETLBFS_SHMEM = 1 << 12
    #: Write-protecting covers pages never touched (empty ptes) too.
    WP_UNPOPULATED = 1 << 13
    #: UFFDIO_POISON is available.
    POISON = 1 << 14
    #: The kernel resolves WP faults itself; read dirtiness with PAGEMAP_SCAN.
    WP_ASYNC = 1 << 15
    #: UFFDIO_MOVE is available.
    MOVE = 1 << 16


class Mode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``: which faults a registered range reports."""

    #: Faults on pages not present yet.
    MISSING = 1 << 0
    #: Writes to write-protected pages.
    WP = 1 << 1
    #: Faults on pages in the page cache but not mapped (shmem, hugetlbfs).
    MINOR = 1 << 2


class Ioctl(enum.IntFlag):
    """Bit ``1 << nr`` for each ioctl, as the kernel reports availability."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    API = 1 << 0x3F


class FaultFlags(enum.IntFlag):
    """``UFFD_PAGEFAULT_FLAG_*``: why a page fault event was raised."""

    #: The access was a write (absent: a read).
    WRITE = 1 << 0
    #: A write hit a write-protected page (Mode.WP).
    WP = 1 << 1
    #: A minor fault: the page is cached but not mapped here (Mode.MINOR).
    MINOR = 1 << 2


ALL_MODES = int(Mode.MISSING | Mode.WP | Mode.MINOR)

# PAGEMAP_SCAN (Linux 6.7) on /proc/<pid>/pagemap: report pages by category
# and, with PM_SCAN_WP_MATCHING, write-protect the matching ones in the same
# walk. This is how WP_ASYNC dirty tracking is read.
PM_SCAN_ARG = struct.Struct("=12Q")  # size, flags, start, end, walk_end (out), vec, vec_len,
# max_pages, category_inverted, category_mask, category_anyof_mask, return_mask
PAGE_REGION = struct.Struct("=QQQ")  # start, end, categories
PAGEMAP_SCAN = _ioc(_IOC_READ | _IOC_WRITE, 16, PM_SCAN_ARG.size, type_=ord("f"))
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
assert PM_SCAN_ARG.size == 96 and PAGE_REGION.size == 24
