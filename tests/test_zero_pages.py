"""Zero pages of a snapshot are mapped with UFFDIO_ZEROPAGE, never copied.

A page mapped by ZEROPAGE is the kernel's shared zero page: ``/proc/self/pagemap``
shows its frame (the same one a read of fresh anonymous memory maps), where a copied
page has a frame of its own. Faulting threads touch memory through ctypes
(``Lab.touch``, ``Region.read``), never from the event loop's thread.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import uffd_async as ua
from uffd_async._core._native import libc
from uffd_async._restore._native_replay import native_replay
from uffd_async._restore._zero_map import data_ranges, scan_zero_pages
from uffd_async._serve._resolvers import CopyFrom

from ._support import TIMEOUT, Lab, finished, pattern, with_huge_pages

pytestmark = pytest.mark.anyio
P = ua.PAGE_SIZE

#: The snapshot: D a data page, H a hole, Z a data page of zeros.
LAYOUT = "DDHHZZDHZDDZZZHD"
PAGES = len(LAYOUT)
ZERO = [i for i, kind in enumerate(LAYOUT) if kind != "D"]


def page_bytes(i: int) -> bytes:
    return pattern(i) if LAYOUT[i] == "D" else bytes(P)


IMAGE = b"".join(page_bytes(i) for i in range(PAGES))


def write_sparse(path: Path, layout: str) -> None:
    """A file of ``layout`` (as LAYOUT), its H pages holes."""
    with open(path, "wb") as f:
        f.truncate(len(layout) * P)
        for i, kind in enumerate(layout):
            if kind != "H":
                f.seek(i * P)
                f.write(pattern(i) if kind == "D" else bytes(P))


@pytest.fixture
def snapshot(tmp_path: Path) -> Iterator[ua.Snapshot]:
    path = tmp_path / "sparse.bin"
    write_sparse(path, LAYOUT)
    with ua.Snapshot(path) as snapshot:
        yield snapshot


def mapping(base: int, pages: int = PAGES, offset_pages: int = 0) -> ua.GuestMapping:
    return ua.GuestMapping(
        base_host_virt_addr=base, size=pages * P, offset=offset_pages * P, page_size=P
    )


def frame(address: int) -> int:
    """The page frame number of the present page at ``address`` (0: not present)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // P * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    return entry & ((1 << 55) - 1) if entry >> 63 else 0


@pytest.fixture(scope="module")
def zero_frame() -> int:
    """The frame of the shared zero page (a read of fresh private anonymous memory)."""
    memory = mmap.mmap(-1, P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        assert memory[0] == 0
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        found = frame(address)
        del address
    finally:
        try:
            memory.close()
        except BufferError:
            pass
    if not found:
        pytest.skip("pagemap shows no frames here (not root?)")
    return found


def zero_mapped(region: ua.Region, zero_frame: int) -> list[int]:
    return [i for i in range(region.length // P) if frame(region.address + i * P) == zero_frame]


# -- what the map says ------------------------------------------------------------------


def test_the_map_names_holes_and_zero_data(snapshot: ua.Snapshot) -> None:
    assert [i for i, zero in enumerate(snapshot.zero_map) if zero] == ZERO


def test_holes_are_found_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "holes.bin"
    write_sparse(path, "HHDDHHHD")
    fd = os.open(path, os.O_RDONLY)
    try:
        ranges = data_ranges(fd, 8 * P)
    finally:
        os.close(fd)
    if ranges == [(0, 8)]:
        pytest.skip("this file system does not report holes")
    assert ranges == [(2, 4), (7, 8)]


def test_pages_not_in_memory_are_not_read(tmp_path: Path) -> None:
    """A snapshot out of the page cache: its holes are zero pages, its zero data pages are
    taken for data (reading them would wait for the disk)."""
    path = tmp_path / "cold.bin"
    write_sparse(path, LAYOUT)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if data_ranges(fd, PAGES * P) == [(0, PAGES)]:
            pytest.skip("this file system does not report holes")
        with ua.Snapshot(path) as snapshot:  # (which reads its first bytes)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            cold(snapshot)
    finally:
        os.close(fd)


def cold(snapshot: ua.Snapshot) -> None:
    """Its zero map, none of it in memory: only the holes are zero."""
    resident = (ctypes.c_uint8 * PAGES)()
    libc.mincore(snapshot._address, PAGES * P, resident)
    if any(resident[i] & 1 for i in range(PAGES)):
        pytest.skip("the page cache kept some of the file (tmpfs?)")
    holes = [i for i, kind in enumerate(LAYOUT) if kind == "H"]
    assert [i for i, zero in enumerate(snapshot.zero_map) if zero] == holes


def test_a_file_cut_short_is_not_read_past_its_end(tmp_path: Path) -> None:
    """Truncated after it was opened, before the scan: no SIGBUS, and nothing from the new
    end on is zero (serving those pages fails, as it did before zero pages)."""
    path = tmp_path / "cut.bin"
    write_sparse(path, "DZDZHHZD")
    with ua.Snapshot(path) as snapshot:
        os.truncate(path, 3 * P)
        assert list(snapshot.zero_map) == [0, 1, 0, 0, 0, 0, 0, 0]


def test_a_partial_last_page_is_never_zero(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(2 * P + 100))
    with ua.Snapshot(path) as snapshot:
        assert list(snapshot.zero_map) == [1, 1, 0]


def test_without_zero_pages_the_map_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "sparse.bin"
    write_sparse(path, LAYOUT)
    with ua.Snapshot(path, zero_pages=False) as snapshot:
        assert not any(snapshot.zero_map)


# -- demand faults ------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["snapshot", "c_loop"])
@pytest.mark.parametrize("readahead", [0, 7])
async def test_zero_pages_are_mapped_as_the_zero_page(
    lab: Lab, snapshot: ua.Snapshot, zero_frame: int, readahead: int, via: str
) -> None:
    """Each fault maps its page, and with readahead the run of pages like it (zero pages
    with zero pages, data with data). A snapshot's resolver answers in Python; a bare
    ``CopyFrom`` with a zero map is the server's resolver, answered by the C loop."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver: ua.Resolver
    if via == "snapshot":
        resolver = snapshot.resolver([mapping(region.address)], readahead=readahead)
        copier = resolver._parts[0].copier
    else:
        zeros = bytes(kind != "D" for kind in LAYOUT)
        resolver = copier = CopyFrom(
            IMAGE, base=region.address, size=None, readahead=readahead, wp=False, page_size=P,
            zeros=zeros,
        )  # fmt: skip
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver) as server:
            await finished(lab.touch(region.address, region.length, write=False))
            assert await finished(lab.run(lambda: region.read(0, region.length))) == IMAGE
    assert zero_mapped(region, zero_frame) == ZERO
    runs = sum(1 for i in range(PAGES) if i == 0 or (i in ZERO) != (i - 1 in ZERO))
    assert server.stats.faults == (runs if readahead else PAGES)
    assert server.stats.pages == PAGES  # the zero runs count as mapped
    if via == "c_loop":  # Python issued nothing
        assert (copier.copies, copier.zeropages) == (0, 0)
    else:
        zero_runs = sum(1 for i in ZERO if i - 1 not in ZERO)
        assert copier.zeropages == (zero_runs if readahead else len(ZERO))


@pytest.mark.parametrize("readahead", [0, 7])
async def test_the_python_path_maps_zero_pages_too(
    lab: Lab, snapshot: ua.Snapshot, zero_frame: int, readahead: int
) -> None:
    """An event turns the C loop and the one-page shortcut off: the general path."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver = snapshot.resolver([mapping(region.address)], readahead=readahead)
    resolver.apply(ua.Unmap(start=0x1000_0000, end=0x1000_0000 + P))  # elsewhere
    copier = resolver._parts[0].copier
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver):
            await finished(lab.touch(region.address, region.length, write=False))
            assert await finished(lab.run(lambda: region.read(0, region.length))) == IMAGE
    assert zero_mapped(region, zero_frame) == ZERO
    zero_runs = sum(1 for i in ZERO if i - 1 not in ZERO)
    assert copier.zeropages == (zero_runs if readahead else len(ZERO))
    assert copier.copies == (PAGES - len(ZERO) if not readahead else zero_runs + 1)


async def test_the_recorder_sees_zero_pages(lab: Lab, snapshot: ua.Snapshot) -> None:
    """The one-page shortcut maps zero pages, and records them like any other."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    recorder = ua.WorkingSetRecorder(snapshot.size, snapshot.identity)
    resolver = snapshot.resolver([mapping(region.address)], recorder=recorder)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver):
            await finished(lab.touch(region.address + 4 * P, 3 * P, write=False))
    assert resolver._parts[0].copier.zeropages == 2
    assert recorder.working_set().pages == (4, 5, 6)


async def test_a_write_after_the_zero_fill_sticks(
    lab: Lab, snapshot: ua.Snapshot, zero_frame: int
) -> None:
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    resolver = snapshot.resolver([mapping(region.address)])
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver):
            await finished(lab.touch(region.address + 2 * P, 2 * P, write=False))  # zero-filled
            await finished(lab.touch(region.address + 4 * P, P, write=True))  # a write fault
            await finished(lab.run(lambda: region.write(2 * P + 10, b"written")))
            await finished(lab.run(lambda: region.write(4 * P + 20, b"also")))
            got = await finished(lab.run(lambda: region.read(0, region.length)))
    expected = bytearray(IMAGE)
    expected[2 * P + 10 : 2 * P + 17] = b"written"
    expected[4 * P + 20 : 4 * P + 24] = b"also"
    assert got == expected
    assert zero_mapped(region, zero_frame) == [i for i in ZERO if i not in (2, 4)]  # own pages


async def test_a_removed_zero_page_is_zero_again(lab: Lab, snapshot: ua.Snapshot) -> None:
    region = lab.anonymous(PAGES)
    uffd = lab.uffd(ua.Feature.EVENT_REMOVE)
    uffd.register(region.address, region.length)
    resolver = snapshot.resolver([mapping(region.address)])
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver):
            await finished(lab.run(lambda: region.write(4 * P, b"dirty")))
            await finished(lab.run(lambda: region.discard(4 * P, P)))
            assert await finished(lab.run(lambda: region.read(4 * P, P))) == bytes(P)


# -- write-protect tracking -----------------------------------------------------------


class WriteLog(ua.Resolver):
    """Unprotects write-protect faults, noting their pages."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.pages: list[int] = []

    def resolve_now(self, fault: ua.PageFault, uffd: ua.Userfaultfd) -> bool:
        page = fault.address & ~(P - 1)
        self.pages.append((page - self.base) // P)
        uffd.writeprotect(page, P, protect=False)
        return True


async def test_tracking_across_a_zero_range_sees_the_first_write(
    lab: Lab, snapshot: ua.Snapshot
) -> None:
    """Zero-filled pages of a range registered MISSING|WP, write-protected afterwards (as a
    tracker does): the first write to one is a write-protect fault, and then sticks."""
    region = lab.anonymous(PAGES)
    uffd = lab.uffd(ua.Feature.PAGEFAULT_FLAG_WP)
    uffd.register(region.address, region.length, ua.Mode.MISSING | ua.Mode.WP)
    log = WriteLog(region.address)
    resolver = ua.by_kind(missing=snapshot.resolver([mapping(region.address)]), wp=log)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, resolver):
            await finished(lab.touch(region.address, region.length, write=False))
            uffd.writeprotect(region.address, region.length)
            await finished(lab.run(lambda: region.write(12 * P, b"first")))
            await finished(lab.run(lambda: region.write(12 * P + 8, b"second")))
            await finished(lab.run(lambda: region.write(0, b"data")))
            got = await finished(lab.run(lambda: region.read(0, region.length)))
    assert log.pages == [12, 0]
    assert got[12 * P : 12 * P + 14] == b"first\0\0\0second"
    assert got[16:P] == IMAGE[16:P] and got[:4] == b"data"


async def test_a_write_protecting_copier_copies_zero_pages(lab: Lab, zero_frame: int) -> None:
    """COPY_MODE_WP maps the page protected; ZEROPAGE cannot: with wp, zeros are copied, and
    the first write to such a page still faults."""
    region = lab.anonymous(4)
    uffd = lab.uffd(ua.Feature.PAGEFAULT_FLAG_WP)
    uffd.register(region.address, region.length, ua.Mode.MISSING | ua.Mode.WP)
    source = bytes(2 * P) + pattern(2) + bytes(P)
    copier = CopyFrom(
        source, base=region.address, size=None, readahead=0, wp=True, page_size=P,
        zeros=b"\1\1\0\1",
    )  # fmt: skip
    log = WriteLog(region.address)
    with anyio.fail_after(TIMEOUT):
        async with ua.FaultServer(uffd, ua.by_kind(missing=copier, wp=log)):
            await finished(lab.touch(region.address, region.length, write=False))
            await finished(lab.run(lambda: region.write(P, b"x")))
    assert copier.zeropages == 0 and zero_mapped(region, zero_frame) == []
    assert log.pages == [1]


# -- populating everything ------------------------------------------------------------


MOSTLY_ZERO = ("D" + "H" * 5 + "Z" * 4) * 12 + "DDZZ"


@pytest.mark.parametrize("zero_pages", [True, False])
async def test_populate_maps_zero_runs_in_one_ioctl_each(
    lab: Lab, tmp_path: Path, zero_frame: int, zero_pages: bool
) -> None:
    pages = len(MOSTLY_ZERO)
    path = tmp_path / "mostly_zero.bin"
    write_sparse(path, MOSTLY_ZERO)
    image = b"".join(pattern(i) if kind == "D" else bytes(P) for i, kind in enumerate(MOSTLY_ZERO))
    region = lab.anonymous(pages)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    with ua.Snapshot(path, zero_pages=zero_pages) as snapshot:
        resolver = snapshot.resolver([mapping(region.address, pages)])
        copier = resolver._parts[0].copier
        with anyio.fail_after(TIMEOUT):
            async with ua.FaultServer(uffd, resolver) as server:
                with native_replay(False):  # the loop's ioctls, counted by the copier
                    stats = await ua.prefetch(uffd, resolver, None, populate=True, run_bytes=64 * P)
                assert stats.populated and stats.prefetched == pages
                got = await finished(lab.run(lambda: region.read(0, region.length)))
    assert got == image
    assert server.stats.faults == 0
    data_runs = MOSTLY_ZERO.count("D") - 1  # "DD" at the end is one run
    assert resolver.fill_ioctls() == {"COPY": copier.copies, "ZEROPAGE": copier.zeropages}
    if zero_pages:
        assert copier.copies == data_runs
        # each zero run once, and once more where a 64-page run boundary cuts one
        assert 13 <= copier.zeropages <= 13 + pages // 64
        assert zero_mapped(region, zero_frame) == [
            i for i, kind in enumerate(MOSTLY_ZERO) if kind != "D"
        ]
    else:
        assert (copier.copies, copier.zeropages) == (-(-pages // 64), 0)
        assert zero_mapped(region, zero_frame) == []


# -- huge pages: no ZEROPAGE -----------------------------------------------------------


@with_huge_pages(2)
async def test_huge_pages_copy_their_zeros(lab: Lab, tmp_path: Path) -> None:
    region = lab.adopt_region(ua.Region.hugetlb(2 * (2 << 20)))
    huge = region.page_size
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:  # a huge page of holes, then one with data
        f.truncate(2 * huge)
        f.seek(huge + 5 * P)
        f.write(pattern(5))
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    with ua.Snapshot(path) as snapshot:
        resolver = snapshot.resolver(
            [ua.GuestMapping(base_host_virt_addr=region.address, size=2 * huge, offset=0,
                             page_size=huge)]
        )  # fmt: skip
        copier = resolver._parts[0].copier
        with anyio.fail_after(TIMEOUT):
            async with ua.FaultServer(uffd, resolver, page_size=huge) as server:
                got = await finished(lab.run(lambda: region.read(0, region.length)))
    assert got == bytes(huge + 5 * P) + pattern(5) + bytes(huge - 6 * P)
    assert copier.zeropages == 0 and server.stats.errors == 0


# -- layers ---------------------------------------------------------------------------


async def test_layers_zero_where_the_top_says_so(lab: Lab, tmp_path: Path, zero_frame: int) -> None:
    """A layer's zero page over base data, a layer's data over a base hole, and base holes
    and zeros no layer covers: zero pages exactly where the composed image is zero."""
    base = tmp_path / "base.bin"
    write_sparse(base, LAYOUT)
    with ua.Snapshot(base) as plain:
        parent = plain.identity
    layer = tmp_path / "top.layer"
    top = {0: bytes(P), 2: pattern(102), 9: bytes(P), 13: pattern(113)}
    with ua.LayerWriter(
        layer, page_size=P, image_size=PAGES * P, pages=list(top), parent=parent
    ) as writer:
        for page, data in top.items():
            writer.write_page(page, data)
        writer.commit()
    image = bytearray(IMAGE)
    for page, data in top.items():
        image[page * P : (page + 1) * P] = data
    expected_zero = [i for i in range(PAGES) if image[i * P : (i + 1) * P] == bytes(P)]
    region = lab.anonymous(PAGES)
    uffd = lab.uffd()
    uffd.register(region.address, region.length)
    with ua.LayeredSnapshot(base, layer) as layered:
        resolver = layered.resolver([mapping(region.address)], readahead=3)
        with anyio.fail_after(TIMEOUT):
            async with ua.FaultServer(uffd, resolver):
                await finished(lab.touch(region.address, region.length, write=False))
                got = await finished(lab.run(lambda: region.read(0, region.length)))
    assert got == image
    assert zero_mapped(region, zero_frame) == expected_zero


# -- the scan, off the first restore's critical path -------------------------------------


async def test_a_server_scans_while_it_waits_for_its_first_process(
    snapshot: ua.Snapshot, tmp_path: Path
) -> None:
    """``serve_handoffs`` scans the snapshot's zero pages in a worker thread as soon as it
    listens: the map is there before any process came."""
    assert snapshot._zeros is None
    async with anyio.create_task_group() as tg:
        await tg.start(ua.serve_handoffs, str(tmp_path / "sock"), snapshot)
        with anyio.fail_after(TIMEOUT):
            while snapshot._zeros is None:
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    assert [i for i, zero in enumerate(snapshot.zero_map) if zero] == ZERO


def test_one_scan_whoever_asks_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``prepare()`` in two threads and a resolver's first need: one scan, one map."""
    path = tmp_path / "sparse.bin"
    write_sparse(path, LAYOUT)
    scans: list[int] = []

    def counted(*args: Any) -> bytearray:
        scans.append(1)
        return scan_zero_pages(*args)

    monkeypatch.setattr("uffd_async._restore._snapshot.scan_zero_pages", counted)
    with ua.Snapshot(path) as snapshot:
        threads = [threading.Thread(target=snapshot.prepare) for _ in range(2)]
        for thread in threads:
            thread.start()
        zeros = snapshot._zeros_of(mapping(0x10000000))
        for thread in threads:
            thread.join(TIMEOUT)
        assert scans == [1]
        assert zeros is not None and [i for i, z in enumerate(zeros) if z] == ZERO
    snapshot.prepare()  # closed: nothing to do, no error
